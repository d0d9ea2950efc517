"""The engine interface: what runs a validated config and writes its results to a folder.

An engine is one module that registers a subclass of :class:`Engine` under the name used in config
(``engine``)::

    from fedeq.engines.base import Engine
    from fedeq.registry import ENGINES

    @ENGINES.register("my_engine")
    class MyEngine(Engine):
        def run(self, cfg, out_dir, quiet=False, resume=False) -> None: ...

Keep heavy imports (Ray, Flower, torch) inside ``run``: the registry imports every built-in engine
module to learn the names, and config validation reads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from fedeq.registry import ENGINES

__all__ = ["Engine", "get_engine", "resumable_engines", "resume_refused"]


class Engine(ABC):
    """Runs a validated config; the results (``summary.json``, CSVs, plots) go to ``out_dir``."""

    supports_resume: ClassVar[bool] = False
    """Whether :meth:`run` can continue an interrupted run from its folder (``resume=True``)."""
    no_resume_reason: ClassVar[str] = ""
    """Why runs on this engine cannot be resumed (shown with the ``--resume`` refusal)."""

    @abstractmethod
    def run(self, cfg: Any, out_dir: Path, quiet: bool = False, resume: bool = False) -> None:
        """Run ``cfg``; write its results to ``out_dir`` (``resume``: continue the run found there)."""


def get_engine(name: str) -> Engine:
    """A new instance of the engine registered as ``name`` (``ValueError`` listing the names otherwise)."""
    engine = ENGINES.get(name)
    return engine() if isinstance(engine, type) else engine


def resumable_engines() -> tuple[str, ...]:
    """Names of the registered engines that can resume a run."""
    return tuple(name for name in ENGINES.names() if getattr(ENGINES.get(name), "supports_resume", False))


def resume_refused(name: str) -> str | None:
    """Why ``--resume`` is refused for a run on engine ``name`` (``None`` when the engine can resume)."""
    engine = ENGINES.get(name)
    if getattr(engine, "supports_resume", False):
        return None
    reason = getattr(engine, "no_resume_reason", "")
    allowed = " | ".join(f"engine={n}" for n in resumable_engines()) or "none"
    return (
        f"--resume: runs on engine={name} cannot be resumed{f' ({reason})' if reason else ''}; "
        f"allowed: {allowed}"
    )
