"""Where a deployment's pieces live: the Flower app folder, certificates, the results of a run.

Argument problems raise :class:`DeployError` naming the argument, before anything is started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedeq.engines.deploy.certs import CertError, CertLayout, check_layout
from fedeq.results.recorder import run_dir

__all__ = [
    "OUTPUT_FILES",
    "DeployError",
    "app_dir",
    "check_certs",
    "default_out_dir",
    "default_run_name",
    "verify_outputs",
]

OUTPUT_FILES = ("config.yaml", "rounds.csv", "clients.csv", "summary.json")


class DeployError(ValueError):
    """A bad launcher argument or a deployment that could not be brought up; ``key`` names the argument."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def check_certs(folder: str | Path, **need: Any) -> CertLayout:
    """:func:`~fedeq.engines.deploy.certs.check_layout` with key ``--certs``; its errors as
    :class:`DeployError`."""
    try:
        return check_layout(folder, key="--certs", **need)
    except CertError as err:
        raise DeployError(err.key, str(err).split(": ", 1)[1]) from None


def app_dir(path: str | Path | None = None) -> Path:
    """The Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``): ``path`` or this checkout."""
    candidate = Path(path) if path is not None else Path(__file__).resolve().parents[3]
    pyproject = candidate / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise DeployError(
            "--app", f"{candidate} is not a Flower app folder (pyproject.toml with [tool.flwr.app])"
        )
    return candidate.resolve()


def verify_outputs(out_dir: Path, rounds: int) -> dict[str, Any]:
    """Check the output folder of a finished run; return ``summary.json`` (RuntimeError if incomplete)."""
    missing = [name for name in OUTPUT_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"the run finished without {', '.join(missing)} in {out_dir}")
    if not list(out_dir.glob("*.png")):
        raise RuntimeError(f"the run finished without plots in {out_dir}")
    summary = json.loads((out_dir / "summary.json").read_text())
    done = summary.get("rounds_completed")
    if done != rounds:
        raise RuntimeError(f"the run completed {done} of {rounds} rounds (see {out_dir / 'rounds.csv'})")
    return summary


def default_run_name() -> str:
    """``deploy-<timestamp>``."""
    return "deploy-" + time.strftime("%Y%m%d-%H%M%S")


def default_out_dir(cfg: Any) -> Path:
    """``output_dir/run_name`` of ``cfg``, the run name defaulting to :func:`default_run_name`."""
    return run_dir(cfg.output_dir, cfg.run_name or default_run_name())
