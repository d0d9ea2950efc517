"""Every measurement runs in a fresh child process of ``cohort.py`` (its own Ray instance, its own peak
memory); the parent reads the child's one tagged result line and stops whatever the child left behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from engine_bench.runner import ChildFailed, run_tagged

ENTRY = Path(__file__).resolve().parents[1] / "cohort.py"
RESULT_TAG = "@@cohort-benchmark-result "

__all__ = ["ChildFailed", "child_main", "run_child"]


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`cohort_bench.child.child_run` on ``spec`` in a new process and return its result
    (:func:`engine_bench.runner.run_tagged`; :class:`ChildFailed` when it ends without one)."""
    label = str(spec.get("label", "run"))
    return run_tagged(ENTRY, ["--child", json.dumps(spec)], RESULT_TAG, label, timeout_s)


def child_main(spec_text: str) -> None:
    """In the child: measure the run ``spec_text`` describes and print the result as one tagged line."""
    from engine_bench.report import quiet_logs

    from cohort_bench.child import child_run

    quiet_logs()
    result = child_run(json.loads(spec_text))
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()
