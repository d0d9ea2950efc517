"""One run submitted with ``flwr run``: its run config (a TOML file carrying the fedeq config), the
submission itself, and the outcome once it finished."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedeq.config import RUN_CONFIG_KEY, RUN_OVERRIDES_KEY, apply_overrides, to_yaml
from fedeq.engines.deploy.layout import DeployError, verify_outputs
from fedeq.engines.deploy.processes import ManagedProcess, ProcessRegistry
from fedeq.engines.deploy.superlink import CONNECTION_NAME, flwr_cli, run_status, toml_items

__all__ = ["RunOutcome", "Submission", "prepare_run_config", "submit_argv", "write_run_config"]


def submit_argv(app: Path, run_config: Path) -> list[str]:
    """``flwr run APP fedeq --run-config RUN.toml --stream``."""
    return ["flwr", "run", str(app), CONNECTION_NAME, "--run-config", str(run_config), "--stream"]


def prepare_run_config(cfg: Any, num_nodes: int, out_dir: Path) -> Any:
    """The config of a deployed run: one partition per SuperNode, results in the absolute ``out_dir``."""
    if num_nodes < 1:
        raise DeployError("--nodes", f"must be >= 1 (got {num_nodes})")
    out_dir = Path(out_dir).resolve()
    items = [
        f"num_clients={num_nodes}",
        f"clients_per_round={min(int(cfg.clients_per_round), num_nodes)}",
        f"output_dir={json.dumps(str(out_dir.parent))}",
        f"run_name={json.dumps(out_dir.name)}",
    ]
    min_nodes = cfg.strategy.min_available_nodes
    if min_nodes is not None and int(min_nodes) > num_nodes:
        items.append(f"strategy.min_available_nodes={num_nodes}")
    return apply_overrides(cfg, items)


def write_run_config(cfg: Any, path: Path) -> Path:
    """Write the ``flwr run --run-config`` TOML file carrying the resolved config as YAML text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {RUN_CONFIG_KEY: to_yaml(cfg), RUN_OVERRIDES_KEY: ""}
    path.write_text(toml_items(items), encoding="utf-8")
    return path


@dataclass
class RunOutcome:
    """What a finished deployment run produced (``summary`` is empty when the results are elsewhere)."""

    out_dir: Path
    run_id: int | None
    status: str
    summary: dict[str, Any]
    wall_s: float
    node_ids: list[int] = field(default_factory=list)


class Submission:
    """One ``flwr run --stream`` against the connection in ``cli_env``'s ``FLWR_HOME``, then its results.

    ``cfg`` must already be prepared (:func:`prepare_run_config`): its ``output_dir/run_name`` is where
    the ServerApp, on the SuperLink's machine, writes the results.
    """

    def __init__(
        self,
        registry: ProcessRegistry,
        cli_env: Mapping[str, str],
        app: Path,
        cfg: Any,
        log: Callable[[str], None],
        name: str = "flwr-run",
    ) -> None:
        self.registry = registry
        self.name = name
        self.cli_env = dict(cli_env)
        self.app = app
        self.cfg = cfg
        self.out_dir = (Path(cfg.output_dir) / str(cfg.run_name)).resolve()
        self.run_id: int | None = None
        self._log = log
        self._proc: ManagedProcess | None = None
        self._t0 = time.perf_counter()

    def start(self) -> ManagedProcess:
        """Submit the run (returns at once; see :meth:`wait`)."""
        run_toml = write_run_config(self.cfg, self.registry.log_dir.parent / f"{self.name}.toml")
        self._t0 = time.perf_counter()
        self._proc = self.registry.start(
            self.name, submit_argv(self.app, run_toml), env=self.cli_env, cwd=self.app
        )
        self._log(f"submitted the run (flwr run pid {self._proc.pid}); results go to {self.out_dir}")
        return self._proc

    def _find_run_id(self) -> int | None:
        assert self._proc is not None
        m = re.search(r"Successfully started run (\d+)", self._proc.log_text())
        return int(m.group(1)) if m else None

    def wait(self, timeout: float = 1800.0, require_outputs: bool = True, poll: float = 1.0) -> RunOutcome:
        """Wait for the run to finish (RuntimeError on timeout or failure); check the output folder.

        With ``require_outputs=False`` a missing output folder is not an error (the SuperLink runs
        elsewhere and the results stay on its machine).
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("the run was not submitted")
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            if self.run_id is None:
                self.run_id = self._find_run_id()
                if self.run_id is not None:
                    self._log(f"run {self.run_id} started")
            time.sleep(poll)
        self.run_id = self.run_id or self._find_run_id()
        if self.run_id is None and not proc.alive():
            raise RuntimeError(f"flwr run could not submit the run:\n{proc.log_tail(30)}")
        status = "unknown"
        while self.run_id is not None and time.monotonic() < deadline + 10.0:
            # The log stream normally ends with the run; the status may lag it a little.
            status = run_status(self.run_id, self.cli_env)
            if status.startswith("finished"):
                break
            time.sleep(2.0)
        if not status.startswith("finished"):
            if self.run_id is not None:
                flwr_cli(["stop", str(self.run_id), CONNECTION_NAME], self.cli_env)
            raise RuntimeError(
                f"the run did not finish within {timeout:.0f}s (status {status}; "
                f"logs in {self.registry.log_dir})"
            )
        if status != "finished:completed":
            raise RuntimeError(
                f"run {self.run_id} ended with status {status}:\n{proc.log_tail(30)}\n"
                f"(logs in {self.registry.log_dir})"
            )
        summary: dict[str, Any] = {}
        if require_outputs or self.out_dir.is_dir():
            summary = verify_outputs(self.out_dir, int(self.cfg.rounds))
        wall_s = time.perf_counter() - self._t0
        self._log(f"run {self.run_id} {status} in {wall_s:.1f}s")
        return RunOutcome(
            out_dir=self.out_dir, run_id=self.run_id, status=status, summary=summary, wall_s=wall_s
        )
