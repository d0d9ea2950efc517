"""What the subcommands that take a run config share: the ``[CONFIG.yaml] [key=value ...]`` arguments and
the checks a config must pass before any work starts."""

from __future__ import annotations

from collections.abc import Sequence

from fedeq.config import ConfigError

__all__ = ["check_runnable", "split_config_args"]


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest must be key=value overrides."""
    path: str | None = None
    overrides: list[str] = []
    for i, arg in enumerate(args):
        if "=" in arg:
            overrides.append(arg)
        elif i == 0:
            path = arg
        else:
            raise ConfigError(
                "overrides", "expected key=value", "key=value after an optional CONFIG.yaml", arg
            )
    return path, overrides


def check_runnable(cfg: object) -> None:
    """Checks that need the registries (strategy name and kwargs) and the data (the dataset's own
    check, its contents and the partition over clients), still before any work."""
    from fedeq.data import check_data
    from fedeq.server.app import strategy_for

    report = check_data(cfg, warn=False)
    strategy_for(cfg)
    report.warn()  # after every check: an invalid config prints its error line alone
