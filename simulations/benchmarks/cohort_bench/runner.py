"""Every measurement runs in a fresh child process of ``cohort.py`` (its own Ray instance, its own peak
memory); the parent reads the child's one tagged result line and stops whatever the child left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ENTRY = Path(__file__).resolve().parents[1] / "cohort.py"
ROOT = ENTRY.parents[2]
RESULT_TAG = "@@cohort-benchmark-result "


class ChildFailed(RuntimeError):
    """A measurement process that ended without a result (its error output is in the message)."""


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`cohort_bench.child.child_run` on ``spec`` in a new process (own session) and return its
    result."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), str(ENTRY.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    cmd = [sys.executable, str(ENTRY), "--child", json.dumps(spec)]
    proc = subprocess.Popen(
        cmd,
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
        raise ChildFailed(f"{spec.get('label', 'run')}: no result within {timeout_s:g} s") from None
    finally:
        try:  # Ray's processes of the child's session, if any are left
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    raise ChildFailed(f"{spec.get('label', 'run')} failed (exit {proc.returncode}):\n{stderr[-4000:]}")


def child_main(spec_text: str) -> None:
    """In the child: measure the run ``spec_text`` describes and print the result as one tagged line."""
    from engine_bench.report import quiet_logs

    from cohort_bench.child import child_run

    quiet_logs()
    result = child_run(json.loads(spec_text))
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
