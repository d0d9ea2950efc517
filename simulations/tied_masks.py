"""Convolutional weight-tied model (``tied_conv``): accuracy vs depth and density, shared vs distinct masks.

For every depth and density the same model is trained centrally with one mask shared by all layers
(``mask_overlap = 1``) and with a distinct mask per layer (independent draws, and, for each value of
``--overlaps``, masks with that fixed consecutive-layer overlap), next to the dense weight-tied model
(density 1); the mask seed is the training seed. Prints Markdown tables of test and training-set accuracy
(mean ± std over seeds) and writes ``<out>/tied_masks.csv`` (one row per run: both accuracies, parameters,
training time).

Example (the numbers in docs/model_families.md)::

    python simulations/tied_masks.py --data mnist5k --depths 2 4 8 --densities 0.5 0.25 --overlaps 0 \
        --seeds 3 --epochs 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from fedeq.data import load_dataset
from fedeq.models import build_model, num_parameters
from fedeq.train import evaluate, train_local

TRAIN = {"digits": {"lr": 0.01, "batch_size": 32}, "mnist5k": {"lr": 0.003, "batch_size": 64}}


def run(data: Any, seed: int, epochs: int, **kwargs: Any) -> dict[str, Any]:
    """Train ``tied_conv`` with ``model.kwargs = kwargs`` and evaluate it on the test split."""
    torch.manual_seed(seed)
    model = build_model("tied_conv", data.input_shape, data.num_classes, SimpleNamespace(kwargs=kwargs))
    tr = TRAIN[data.name]
    t0 = time.perf_counter()
    for epoch in range(epochs):
        train_local(
            model,
            data.x_train,
            data.y_train,
            epochs=1,
            lr=tr["lr"],
            batch_size=tr["batch_size"],
            seed=seed * 1000 + epoch,
        )
    train_s = time.perf_counter() - t0
    ev = evaluate(model, data.x_test, data.y_test)
    fit = evaluate(model, data.x_train, data.y_train)
    return {
        "test_acc": ev.accuracy,
        "train_acc": fit.accuracy,
        "params": num_parameters(model),
        "train_s": train_s,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist5k", choices=list(TRAIN))
    p.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument(
        "--overlaps",
        nargs="*",
        type=float,
        default=[],
        help="distinct masks with these fixed consecutive-layer overlaps, besides independent draws",
    )
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("outputs/tied_masks"))
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    data = load_dataset(ns.data)
    specs: list[tuple[str, float, float | None]] = [("dense", 1.0, None)]
    for density in ns.densities:
        specs += [("shared", density, 1.0), ("distinct", density, None)]
        specs += [(f"overlap {o:g}", density, o) for o in ns.overlaps]
    rows = []
    for depth in ns.depths:
        for masks, density, overlap in specs:
            for seed in range(ns.seeds):
                kwargs = {"channels": ns.channels, "depth": depth, "mask_density": density}
                kwargs.update(mask_overlap=overlap, mask_seed=seed)
                r = {
                    "depth": depth,
                    "masks": masks,
                    "density": density,
                    "seed": seed,
                    **run(data, seed, ns.epochs, **kwargs),
                }
                print(r, flush=True)
                rows.append(r)
    df = pd.DataFrame(rows)
    ns.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(ns.out / "tied_masks.csv", index=False)
    setting = f"{ns.data}, tied_conv channels {ns.channels}, {ns.epochs} epochs, {ns.seeds} seeds"
    for metric, title in (("test_acc", "test accuracy"), ("train_acc", "training-set accuracy")):
        print(f"\n{setting}: {title}")
        print(table(df, metric, ns.depths, ns.densities, ns.overlaps))


def table(
    df: pd.DataFrame, metric: str, depths: list[int], densities: list[float], overlaps: list[float]
) -> str:
    """Markdown table of ``metric`` (mean ± std over seeds): one row per depth and density, one column per
    kind of mask."""
    g = df.groupby(["depth", "density", "masks"], sort=False)[metric]
    stats = pd.concat([g.mean().rename("mean"), g.std(ddof=0).rename("std")], axis=1).reset_index()

    def cell(depth: int, density: float, masks: str) -> str:
        row = stats[(stats.depth == depth) & (stats.density == density) & (stats.masks == masks)].iloc[0]
        return f"{row['mean']:.4f} ± {row['std']:.4f}"

    columns = ["shared", "distinct"] + [f"overlap {o:g}" for o in overlaps]
    extra = "".join(f" distinct, overlap {o:g} |" for o in overlaps)
    lines = [
        f"| depth | density | dense | shared mask | distinct masks |{extra}",
        "|---" * (len(columns) + 3) + "|",
    ]
    for depth in depths:
        for density in densities:
            if not ((stats.depth == depth) & (stats.density == density)).any():
                continue  # a grid merged from several runs need not be complete
            cells = [cell(depth, 1.0, "dense")] + [cell(depth, density, masks) for masks in columns]
            lines.append(f"| {depth} | {density:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
