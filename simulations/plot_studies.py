"""One figure from several finished sweeps: mean test accuracy (95% band over seeds) against simulated time or
round, one line per grid point of every sweep, e.g. a setting's methods, its bounds and FedBuff together.

    python simulations/plot_studies.py OUT.png SWEEP_DIR[=LABEL] ... [--axis sim_time|round|bytes] [--title T]

A sweep folder is what ``fedeq sweep --out`` wrote (its ``sweep.csv`` lists the runs); ``=LABEL`` names its
lines instead of the grid point (a sweep with several grid points gets ``LABEL, point``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fedeq.results.sweep_plots import PLOT_FILES, build_sweep_figures
from fedeq.results.sweep_summary import AXES, SweepRun


def sweep_folder_runs(folder: Path, label: str | None) -> list[SweepRun]:
    """The finished runs of the sweep in ``folder``, their grid points renamed by ``label``."""
    table = pd.read_csv(folder / "sweep.csv")
    table = table[table["status"] == "done"]
    points = list(dict.fromkeys(table["point"]))
    runs = []
    for row in table.to_dict("records"):
        point = str(row["point"])
        if label:
            point = label if len(points) == 1 else f"{label}, {point}"
        runs.append(SweepRun(point, {}, int(row["seed"]), folder / str(row["run_dir"])))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--axis", choices=list(AXES), default="sim_time")
    parser.add_argument("--title", default=None)
    ns = parser.parse_args(argv)
    runs: list[SweepRun] = []
    for spec in ns.sweeps:
        path, _, label = spec.partition("=")
        folder = Path(path)
        if not (folder / "sweep.csv").is_file():
            print(
                f"plot_studies: error: {folder} has no sweep.csv (run fedeq sweep --out {folder})",
                file=sys.stderr,
            )
            return 2
        runs += sweep_folder_runs(folder, label or None)
    figures = build_sweep_figures(runs, ns.title or ns.out.stem)
    name = PLOT_FILES[ns.axis][0]
    if name not in figures:
        print(f"plot_studies: error: no data for --axis {ns.axis}", file=sys.stderr)
        return 2
    fig = figures.pop(name)
    fig.tight_layout()
    fig.savefig(ns.out, dpi=100)
    import matplotlib.pyplot as plt

    for other in [fig, *figures.values()]:
        plt.close(other)
    print(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
