"""``fedeq simulate --resume DIR [rounds=N]``: the checks before a run is continued from its folder.

A run continues with the config saved in its folder. The one key that may change is ``rounds``: a finished
or interrupted run is extended to ``N >= `` the rounds it completed. Anything else would make the continued
run differ from one configured that way from the start, so it is refused, naming the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedeq.cli.config_args import split_config_args
from fedeq.config import ConfigError, apply_overrides, load_config

__all__ = ["EXTENSIBLE_KEYS", "changed_keys", "resume_config"]

EXTENSIBLE_KEYS = frozenset({"rounds"})
"""Config keys a resumed run may change."""


def _flatten(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        yield f"{key}.length", len(value)
        for i, v in enumerate(value):
            yield from _flatten(v, f"{key}[{i}]")
    else:
        yield key, value


def changed_keys(before: Any, after: Any) -> dict[str, Any]:
    """Dotted keys (``devices.tiers[0].f_max_iter``) whose value differs between two configs, with the
    value in ``after``."""
    old, new = dict(_flatten(before.model_dump())), dict(_flatten(after.model_dump()))
    keys = [*new, *(k for k in old if k not in new)]
    return {k.removesuffix(".length"): new.get(k) for k in keys if old.get(k) != new.get(k)}


def resume_config(resume: Path, args: Sequence[str]) -> Any:
    """The config to continue the run in ``resume`` with (``args``: optional ``rounds=N``).

    ``ConfigError`` naming ``--resume`` (not a resumable run folder, a damaged checkpoint), ``rounds``
    (fewer than the rounds already done) or the key that an override would change.
    """
    from fedeq.engines import resumable_engines, resume_refused
    from fedeq.results.checkpoint import load_checkpoint

    path, overrides = split_config_args(args)
    usage = "--resume OUTPUT_DIR [rounds=N]"
    if path is not None:
        raise ConfigError("--resume", "takes no config file (the run's config.yaml is used)", usage, path)
    if not (resume / "checkpoint.pkl").is_file() or not (resume / "config.yaml").is_file():
        raise ConfigError("--resume", "no checkpoint.pkl and config.yaml", "a fedeq run folder", str(resume))
    saved = load_config(resume / "config.yaml")
    if resume_refused(saved.engine) is not None:
        allowed = " | ".join(f"engine={name}" for name in resumable_engines())
        raise ConfigError("--resume", f"only runs on {allowed} can be resumed", allowed, saved.engine)
    cfg = apply_overrides(saved, overrides) if overrides else saved
    refused = {k: v for k, v in changed_keys(saved, cfg).items() if k not in EXTENSIBLE_KEYS}
    if refused:
        key, got = next(iter(refused.items()))
        raise ConfigError(key, "cannot be changed when a run is resumed", f"{usage} only", got)
    try:  # a damaged checkpoint or journal stops here, not mid-run
        done = int(load_checkpoint(resume, truncate=False)["round"])
    except ValueError as err:
        problem = str(err).removeprefix("--resume: ")
        allowed = "checkpoint.pkl and checkpoint.journal as fedeq wrote them"
        raise ConfigError("--resume", problem, allowed, str(resume)) from err
    if cfg.rounds < done:
        problem = f"the run in {resume} has already completed {done} rounds"
        raise ConfigError("rounds", problem, f"an integer >= {done}", cfg.rounds)
    return cfg
