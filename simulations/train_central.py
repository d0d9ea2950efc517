"""Train any registered model centrally (no federation) and print test accuracy per epoch and wall time.

The model, its sizes and the data set come from the usual config keys (``key=value`` overrides of the
embedded default, or a YAML file with ``--config``); the DEQ settings are those of one device tier
(``--tier``, default: the last, i.e. the largest budget) unless overridden with ``--solver`` etc. Training
uses :func:`fedeq.train.train_local` one epoch at a time with a cosine learning-rate decay across epochs,
and :func:`fedeq.train.evaluate` on the test split after each epoch.

    python simulations/train_central.py model.name=conv_deq data.name=mnist5k --epochs 6
    python simulations/train_central.py --config simulations/configs/mnist5k_conv.yaml --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from fedeq.config import load_config
from fedeq.data import client_dataset
from fedeq.devices.settings import tier_deq_settings
from fedeq.models import build_model, num_parameters
from fedeq.train import accuracy_vs_budget, evaluate, train_local


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (model.*, data.*, seed, ...)")
    p.add_argument("--config", default=None, help="YAML config file (values under the overrides)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: train.lr)")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--tier", default=None, help="device tier whose DEQ settings train (default: the last)")
    p.add_argument("--solver", default=None)
    p.add_argument("--f-max-iter", type=int, default=None)
    p.add_argument("--b-max-iter", type=int, default=None)
    p.add_argument("--backward", default=None)
    p.add_argument("--randomize-budget", action="store_true", help="draw each step's budget in 1..f_max_iter")
    p.add_argument("--curve", type=int, nargs="*", default=None, help="budgets of a final anytime curve")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the per-epoch rows and totals to this file")
    return p.parse_args(argv)


def deq_settings(cfg: Any, ns: argparse.Namespace) -> dict[str, Any]:
    """The chosen tier's DEQ settings with the command-line overrides applied."""
    tiers = {t.name: t for t in cfg.devices.tiers}
    tier = tiers[ns.tier] if ns.tier else list(tiers.values())[-1]
    settings = tier_deq_settings(cfg, tier)
    for key in ("solver", "f_max_iter", "b_max_iter", "backward"):
        value = getattr(ns, key)
        if value is not None:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ns = parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cfg = load_config(ns.config, ns.overrides)
    torch.manual_seed(cfg.seed)
    splits = client_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)
    settings = deq_settings(cfg, ns)
    lr0 = ns.lr or cfg.train.lr
    batch = ns.batch_size or cfg.train.batch_size
    print(
        f"{cfg.model.name} on {cfg.data.name}: {num_parameters(model):,} parameters, "
        f"{len(splits.y_train):,} train / {len(splits.y_test):,} test, threads {torch.get_num_threads()}, "
        f"DEQ {settings}"
    )
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(ns.epochs):
        lr = lr0 * 0.5 * (1 + math.cos(math.pi * epoch / ns.epochs))
        st = train_local(
            model,
            splits.x_train,
            splits.y_train,
            epochs=1,
            lr=lr,
            batch_size=batch,
            optimizer=cfg.train.optimizer,
            weight_decay=cfg.train.weight_decay,
            deq=settings,
            randomize_budget=ns.randomize_budget,
            seed=cfg.seed + epoch,
        )
        ev = evaluate(model, splits.x_test, splits.y_test, **settings)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": st.loss,
            "test_acc": ev.accuracy,
            "test_residual": ev.fp_residual,
            "nfe_fwd": st.nfe_fwd,
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"epoch {epoch + 1:2d}  lr {lr:.2e}  loss {st.loss:.4f}  test_acc {ev.accuracy:.4f}  "
            f"residual {ev.fp_residual:.1e}  nfe {st.nfe_fwd:.1f}  wall {row['wall_s']:.1f}s",
            flush=True,
        )
    result: dict[str, Any] = {"parameters": num_parameters(model), "epochs": rows}
    if ns.curve:
        curve = accuracy_vs_budget(model, splits.x_test, splits.y_test, ns.curve, **settings)
        result["curve"] = curve
        print("budget curve: " + "  ".join(f"{r['budget']}:{r['accuracy']:.4f}" for r in curve))
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
