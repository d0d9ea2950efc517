"""Helpers of ``simulations/benchmarks/cohort.py``: the measurement child, its runner, the report, GPU.

- :mod:`cohort_bench.child`: runs one engine on one config in a fresh process and measures it.
- :mod:`cohort_bench.runner`: starts such a child and reads its result line.
- :mod:`cohort_bench.summary`: per-engine numbers, tables, ratios and the final line.
- :mod:`cohort_bench.gpu`: the ``--gpu`` mode (ConvDEQ on 32×32 images, client updates per second).
"""
