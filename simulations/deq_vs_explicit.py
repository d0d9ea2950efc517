"""DEQ vs an explicit (non-weight-tied) baseline in federated training: bytes per round, rounds to target.

Both models run the same federated setting (default: mnist5k, the embedded default tiers). The table reports
parameters, bytes each client downloads/uploads per round, final/best accuracy, and the first round (and the
bytes sent up to it) at which each model reaches the target accuracy (default: 95% of the lower of the two
best accuracies, so both reach it).

    python simulations/deq_vs_explicit.py --rounds 20 --out outputs/deq_vs_explicit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fedeq.config import load_config
from fedeq.engines.simulate import simulate

MODELS = {"mlp_deq": ["model.name=mlp_deq"], "explicit": ["model.name=explicit"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=None, help="accuracy to reach (default: see above)")
    parser.add_argument("--out", default="outputs/deq_vs_explicit")
    args = parser.parse_args()
    runs = {}
    for name, model_overrides in MODELS.items():
        overrides = [
            f"data.name={args.data}",
            f"rounds={args.rounds}",
            f"seed={args.seed}",
            f"output_dir={args.out}",
            f"run_name={name}",
            *model_overrides,
            *args.overrides,
        ]
        out = simulate(load_config(None, overrides), quiet=True)
        runs[name] = (json.loads((out / "summary.json").read_text()), pd.read_csv(out / "rounds.csv"))
    target = args.target or 0.95 * min(s["best_test_acc"] for s, _ in runs.values())
    rows = []
    for name, (summary, rounds) in runs.items():
        hit = rounds[rounds["test_acc"] >= target]
        first = int(hit["round"].iloc[0]) if len(hit) else None
        upto = rounds[rounds["round"] <= first] if first else rounds
        rows.append(
            {
                "model": name,
                "parameters": summary["num_parameters"],
                "bytes_per_client_round": summary["model_bytes"],
                "final_acc": round(summary["final_test_acc"], 4),
                "best_acc": round(summary["best_test_acc"], 4),
                f"round_to_{target:.3f}": first,
                "MB_up_to_target": round((upto["bytes_up"].sum() + upto["bytes_down"].sum()) / 1e6, 2)
                if first
                else None,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(Path(args.out) / "comparison.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
