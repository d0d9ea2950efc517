"""Compare aggregation strategies on the same federated setting over several seeds.

Runs FedAvg and the quality-weighted average with each quality function (and any other strategy given) on one
config, for each seed, and prints final/best test accuracy (mean ± std) and the accuracy of the final global
model at every evaluation budget (the anytime curve).

    python simulations/compare_strategies.py                      # embedded default, 3 seeds
    python simulations/compare_strategies.py --seeds 0 1 --rounds 10 --out outputs/compare
    python simulations/compare_strategies.py CONFIG.yaml key=value ... --strategies fedavg quality:budget
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from fedeq.config import load_config
from fedeq.engines.simulate import simulate

DEFAULT_STRATEGIES = (
    "fedavg",
    "quality:uniform",
    "quality:residual",
    "quality:residual@0.1",
    "quality:budget",
    "quality:val_loss",
)


def strategy_overrides(spec: str) -> list[str]:
    """``name``, ``quality:<function>`` or ``quality:<function>@<temperature>`` → config overrides."""
    name, _, quality = spec.partition(":")
    quality, _, temperature = quality.partition("@")
    out = [f"strategy.name={name}", "strategy.kwargs={}"]
    if quality:
        out.append(f"strategy.kwargs.quality={quality}")
    if temperature:
        out.append(f"strategy.kwargs.temperature={temperature}")
    return out


def run(args: argparse.Namespace) -> pd.DataFrame:
    console = Console()
    rows = []
    for spec in args.strategies:
        for seed in args.seeds:
            name = f"{spec.replace(':', '-').replace('@', '-t')}-s{seed}"
            overrides = [
                *args.overrides,
                f"seed={seed}",
                f"output_dir={args.out}",
                f"run_name={name}",
                *strategy_overrides(spec),
            ]
            if args.rounds:
                overrides.append(f"rounds={args.rounds}")
            cfg = load_config(args.config, overrides)
            out = Path(args.out) / name
            if not (args.reuse and (out / "summary.json").exists()):
                simulate(cfg, quiet=True)
            summary = json.loads((out / "summary.json").read_text())
            row = {
                "strategy": spec,
                "seed": seed,
                "final_acc": summary["final_test_acc"],
                "best_acc": summary["best_test_acc"],
            }
            row.update({f"acc@{k}": v for k, v in summary.get("budget_curve", {}).items()})
            rows.append(row)
            console.print(f"{spec:>18} seed {seed}: final {row['final_acc']:.4f} best {row['best_acc']:.4f}")
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    metrics = [c for c in df.columns if c not in ("strategy", "seed")]
    agg = df.groupby("strategy", sort=False)[metrics].agg(["mean", "std"])
    out = pd.DataFrame(index=agg.index)
    for m in metrics:
        out[m] = [f"{100 * a:.1f} ± {100 * (0.0 if pd.isna(b) else b):.1f}" for a, b in agg[m].to_numpy()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML config (default: embedded default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose summary.json exists")
    args = parser.parse_args()
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    df = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "runs.csv", index=False)
    table = summarize(df)
    table.to_csv(Path(args.out) / "summary.csv")
    rich_table = Table(title="test accuracy (%) over seeds: mean ± std")
    rich_table.add_column("strategy")
    for col in table.columns:
        rich_table.add_column(col, justify="right")
    for strategy, values in table.iterrows():
        rich_table.add_row(str(strategy), *values.tolist())
    Console().print(rich_table)
    print(table.to_string())


if __name__ == "__main__":
    main()
