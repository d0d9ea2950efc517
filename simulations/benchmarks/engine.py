"""Benchmark fedeq's Ray device engine against Flower's.

``python simulations/benchmarks/engine.py [SECTION ...] [options]``.

The sections (``overhead``, ``efficiency``, ``scale``, ``throughput``) live in ``engine_bench/``, one module
each; ``python simulations/benchmarks/engine.py --help`` lists them and their options.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parents[1], HERE):  # the checkout (fedeq, clients, strategies) and engine_bench
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from engine_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
