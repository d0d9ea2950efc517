"""``--gpu``: client updates per second of ConvDEQ clients sharing one GPU, cohorts vs. one client per call
vs. Flower's engine (each at the GPU shares given; the best share of each engine counts)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from engine_bench.report import table

from cohort_bench.runner import ChildFailed, run_child
from cohort_bench.summary import EngineNumbers, numbers, ratio, ratio_table

HERE = Path(__file__).resolve().parents[1]
IMAGES = 28_480
"""Generated 32×32 RGB images: 80% train split over 64 clients = 356 each, of which 36 validate and
320 train (5 steps of batch 64 per client and round)."""


def cuda_problem() -> str | None:
    """Why the GPU mode cannot run here (``None`` when a CUDA device is visible)."""
    try:
        import torch
    except ImportError as err:
        return f"torch cannot be imported ({err})"
    if not torch.cuda.is_available():
        return (
            f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none; "
            "run --gpu on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    return None


def gpu_overrides(args: argparse.Namespace, npz: Path, share: float, cohort_size: str) -> list[str]:
    """ConvDEQ 64 channels on 32×32 images, one tier (Anderson 12 / IFT 8, every client online) whose
    clients take ``share`` of the GPU each."""
    tier = {
        "name": "gpu",
        "share": 1.0,
        "solver": "anderson",
        "f_max_iter": 12,
        "b_max_iter": 8,
        "backward": "ift",
        "num_cpus": 1.0,
        "num_gpus": share,
    }
    n = args.gpu_clients
    return [
        f"num_clients={n}",
        f"clients_per_round={n}",
        f"rounds={args.gpu_rounds}",
        "train.device=cuda",
        "data.name=npz",
        f"data.path={npz}",
        "data.partition=iid",
        "model.name=conv_deq",
        "model.channels=64",
        "train.local_epochs=1",
        "train.batch_size=64",
        "eval.budgets=[1,12]",
        f"devices.tiers=[{json.dumps(tier)}]",
        f"ray.cohort_size={cohort_size}",
        *args.overrides,
    ]


def section_gpu(args: argparse.Namespace, tmp: Path) -> int:
    """Run every engine at its GPU shares, print the table and the ratios; 2 without a CUDA device."""
    problem = cuda_problem()
    if problem is not None:
        print(f"cohort.py --gpu: {problem}", file=sys.stderr)
        return 2
    npz = tmp / "images32.npz"
    subprocess.run([sys.executable, str(HERE / "make_images32.py"), str(npz), str(IMAGES)], check=True)
    plans = [("cohorts", "ray", "auto", s) for s in args.gpu_cohort_shares]
    plans += [("per-client", "ray", "1", s) for s in args.gpu_per_client_shares]
    plans += [("flower", "flower", "1", s) for s in args.gpu_flower_shares]
    runs: dict[str, list[EngineNumbers]] = {}
    for i, (name, engine, size, share) in enumerate(plans):
        label = f"{name} (GPU share {share:g})"
        spec = {
            "label": label,
            "engine": engine,
            "overrides": gpu_overrides(args, npz, share, size),
            "out": str(tmp / f"gpu-{i}"),
        }
        try:
            res = run_child(spec, args.child_timeout)
        except ChildFailed as err:
            print(f"  {label}: {err}", flush=True)
            continue
        n = numbers(label, res)
        print(f"  {label}: {n.updates_per_s:.1f} client updates/s ({n.run_s:.0f} s)", flush=True)
        runs.setdefault(name, []).append(n)
    table(
        f"GPU: ConvDEQ 64 ch, 32x32, {args.gpu_clients} clients/round, 5 steps of batch 64, Anderson 12 / "
        f"IFT 8; rounds 2..{args.gpu_rounds}",
        ["engine", "client updates/s", "median round s", "train calls/round (largest)", "actors"],
        [
            [
                n.label,
                f"{n.updates_per_s:.1f}",
                f"{n.median_round_s:.2f}",
                f"{n.calls_per_round:.1f} ({n.largest_call})",
                str(n.actors),
            ]
            for group in runs.values()
            for n in group
        ],
    )
    best = {name: max((n.updates_per_s for n in group), default=float("nan")) for name, group in runs.items()}
    nan = float("nan")
    vs_pc = ratio(best.get("cohorts", nan), best.get("per-client", nan))
    vs_fl = ratio(best.get("cohorts", nan), best.get("flower", nan))
    ratio_table(
        "GPU ratios (client updates/s, each engine at its best share)",
        [("cohorts / per-client engine", vs_pc, ""), ("cohorts / Flower's engine", vs_fl, ">= 5")],
    )
    print(f"gpu_speedup_vs_per_client {vs_pc:.2f} gpu_speedup_vs_flower {vs_fl:.2f}", flush=True)
    return 0 if len(runs) == 3 else 1
