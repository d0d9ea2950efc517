"""Every measurement runs in a fresh child process: start it, read its result line, stop what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENTRY = Path(__file__).resolve().parents[1] / "engine.py"
"""The script each child runs (``engine.py --child KIND --spec JSON``)."""
ROOT = ENTRY.parents[2]
RESULT_TAG = "@@engine-benchmark-result "
CHILDREN = {
    "overhead-fedeq": "engine_bench.overhead:child_overhead_fedeq",
    "overhead-flower": "engine_bench.overhead:child_overhead_flower",
    "efficiency": "engine_bench.efficiency:child_efficiency",
    "scale": "engine_bench.scale:child_scale",
    "throughput": "engine_bench.throughput:child_throughput",
}
"""Child kind -> ``module:function`` that measures it in the child process."""


class ChildFailed(RuntimeError):
    """A measurement process that ended without a result (its error output is in the message)."""


def run_tagged(entry: Path, args: list[str], tag: str, label: str, timeout_s: float) -> dict[str, Any]:
    """Run ``entry args`` in a fresh process (its own session, so leftovers can be stopped by group) and
    return the JSON of its output line that starts with ``tag``; :class:`ChildFailed` names ``label``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), str(entry.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    proc = subprocess.Popen(
        [sys.executable, str(entry), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ChildFailed(f"{label}: no result within {timeout_s:g} s") from None
    finally:
        try:  # whatever the run left behind in its session (Ray's own processes, if any)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for line in stdout.splitlines():
        if line.startswith(tag):
            return dict(json.loads(line[len(tag) :]))
    raise ChildFailed(f"{label} failed (exit {proc.returncode}):\n{stderr[-4000:]}")


def run_child(kind: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one measurement ``kind`` in a fresh process (:func:`run_tagged`)."""
    spec = {**spec, "spawned_at": time.time()}
    args = ["--child", kind, "--spec", json.dumps(spec)]
    result = run_tagged(ENTRY, args, RESULT_TAG, kind, timeout_s)
    result["spawned_at"] = spec["spawned_at"]
    return result


def child_main(kind: str, spec_text: str) -> None:
    """In the child: run the measurement ``kind`` and print its result as one tagged JSON line."""
    import importlib

    from engine_bench.report import quiet_logs

    quiet_logs()
    module, _, name = CHILDREN[kind].partition(":")
    result = getattr(importlib.import_module(module), name)(json.loads(spec_text))
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
