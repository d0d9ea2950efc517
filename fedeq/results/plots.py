"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(out_dir: Path, rounds: pd.DataFrame, curve: Sequence[dict[str, Any]]) -> list[Path]:
    """Test accuracy per round (overall and at each tier's budget), accuracy vs simulated time, and the
    anytime curve (accuracy vs forward budget) when available."""
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds["round"], rounds["test_acc"], marker="o", label="global model (largest tier budget)")
    for col in [c for c in rounds.columns if c.startswith("test_acc@")]:
        ax.plot(
            rounds["round"], rounds[col], linestyle="--", alpha=0.8, label=col.replace("test_acc@", "at ")
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "accuracy.png"))

    if "cum_sim_time_s" in rounds and rounds["cum_sim_time_s"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds["cum_sim_time_s"], rounds["test_acc"], marker="o")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "accuracy_vs_sim_time.png"))

    if curve:
        df = pd.DataFrame(curve)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(df["budget"], df["accuracy"], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("forward budget (function evaluations)")
        ax.set_ylabel("test accuracy")
        ax.set_title("anytime curve of the final global model")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "accuracy_vs_budget.png"))
    return paths
