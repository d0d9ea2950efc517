"""JIIO vs the naive loop (full DEQ solve + adjoint solve + projected gradient step, repeated).

Two input problems on digits, each solved for a batch of test images by four methods sharing the same
step ``α`` (so they target the same stationary points):

- ``attack``: ``max_{x ∈ B∞(x₀, ε) ∩ [0,1]} CE(h(z*(x)), y)`` on a trained :class:`~fedeq.models.MLPDEQ`
  (written as minimising ``-CE``); ``α_i = 0.25·ε / mean_j |∇_x CE_i(x₀)|``.
- ``inpainting``: ``min_c ½||M ⊙ (x̂(c) - y)||² + ½μ||c||²`` over the code of a trained
  :class:`~fedeq.robust.inverse.DEQDecoder` (half of the pixels missing, noise 0.1).

Methods: ``naive`` (each step solves ``z*`` from zero and the adjoint with Anderson to ``tol``),
``naive-warm`` (each solve starts from the previous one), ``jiio`` (plain joint iteration) and
``jiio-anderson`` (Anderson acceleration on the stacked state). The objective ``ℓ(z*(x), x)`` of every
recorded iterate is re-evaluated afterwards with a tight solve (untimed). *Equal quality*: the target is
the naive loop's final batch-mean objective plus ``--gap`` times its total decrease; each method's time
(median of ``--repeats`` runs), function evaluations and VJPs are read off at the first iterate reaching
the target.

Three more comparisons on an ``MLPDEQ`` (hidden 64) trained on digits (``--problems pgd backward training``):

- ``pgd``: robust accuracy (whole test split, ε-ball in L∞) under PGD and under the JIIO attack at equal
  iteration counts ``--attack-steps``, with the attack's function evaluations and VJPs per sample;
- ``backward``: VJPs of the parameter backward at JIIO's state, warm-started from JIIO's adjoint ``-λ/B``
  or started from ``w = ∂L/∂z``, and the difference of the parameter gradients;
- ``training``: PGD-AT vs JIIO-AT from the same initialisation (clean and PGD-20 accuracy, evaluations per
  sample per training step).

Examples::

    python simulations/benchmarks/jiio.py
    python simulations/benchmarks/jiio.py --batch 64 --quick
    python simulations/benchmarks/jiio.py --problems pgd backward training
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeq.data import load_dataset  # noqa: E402
from fedeq.models import MLPDEQ  # noqa: E402
from fedeq.models.parts import deq_parts  # noqa: E402
from fedeq.robust import AttackConfig, jiio_adversarial_loss, robust_accuracy, run_attack  # noqa: E402
from fedeq.robust.ball import project_ball_box  # noqa: E402
from fedeq.robust.input_problem import InputProblem, JIIOResult  # noqa: E402
from fedeq.robust.inverse import inpainting_problem, make_observation, train_decoder  # noqa: E402
from fedeq.robust.jiio import jiio  # noqa: E402
from fedeq.robust.naive import naive_input_optimization, solve_objective, solve_state_and_adjoint  # noqa: E402
from fedeq.train import train_local  # noqa: E402
from fedeq.train.adversarial import AdversarialConfig  # noqa: E402

DEQ = {"solver": "anderson", "f_max_iter": 12, "b_max_iter": 12, "tol": 1e-4}


def digits_model(
    args: argparse.Namespace, adversarial: AdversarialConfig | None = None
) -> tuple[MLPDEQ, Any]:
    """An ``MLPDEQ`` (hidden 64) trained on digits with ``DEQ`` (and ``adversarial``); (model, TrainStats)."""
    sp = load_dataset("digits", seed=args.seed)
    torch.manual_seed(args.seed)
    model = MLPDEQ(64, 10, hidden=64)
    stats = train_local(
        model,
        sp.x_train,
        sp.y_train,
        epochs=args.train_epochs,
        lr=0.01,
        deq=DEQ,
        seed=args.seed,
        adversarial=adversarial,
    )
    model.eval()
    return model, stats


def attack_problem(args: argparse.Namespace) -> tuple[InputProblem, torch.Tensor, torch.Tensor]:
    sp = load_dataset("digits", seed=args.seed)
    model, _ = digits_model(args)
    for p in model.parameters():
        p.requires_grad_(False)
    parts = deq_parts(model)
    x0 = torch.from_numpy(sp.x_test[: args.batch].copy())
    y = torch.from_numpy(sp.y_test[: args.batch].copy())
    eps = args.eps

    def proj(x: torch.Tensor) -> torch.Tensor:
        return project_ball_box(x, x0, eps, "linf")

    def objective(z: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(parts.readout(z), y, reduction="none")

    problem = InputProblem(parts.f, objective, lambda x: parts.z0(parts.inject(x)), proj)
    _, _, gx, _, _ = solve_state_and_adjoint(problem, x0, tol=1e-8)
    alpha = 0.25 * eps / gx.flatten(1).abs().mean(dim=1).clamp_min(1e-12)
    return problem, x0, alpha


def inpainting(args: argparse.Namespace) -> tuple[InputProblem, torch.Tensor, float]:
    sp = load_dataset("digits", seed=args.seed)
    xtr = torch.from_numpy(sp.x_train.copy())
    dec, _ = train_decoder(
        xtr, code_dim=16, hidden=64, epochs=args.decoder_epochs, seed=args.seed, f_max_iter=20, b_max_iter=20
    )
    for p in dec.parameters():
        p.requires_grad_(False)
    truth = torch.from_numpy(sp.x_test[: args.batch].copy())
    y, mask = make_observation(truth, missing=0.5, noise=0.1, seed=args.seed)
    problem = inpainting_problem(dec, y, mask, mu=1e-2)
    return problem, torch.zeros(truth.shape[0], 16), args.inpaint_step


def _curve(problem: InputProblem, res: JIIOResult, points: int) -> list[tuple[int, float, int, float]]:
    """``(history index, seconds, f evaluations, batch-mean objective)`` at up to ``points`` iterates."""
    hist = res.history or []
    if not hist:
        return []
    grid = torch.logspace(0, torch.log10(torch.tensor(len(hist))), points).tolist()
    out = []
    for i in sorted({min(max(round(v), 1), len(hist)) - 1 for v in grid}):
        t, nfe, x = hist[i]
        out.append((i, t, nfe, float(solve_objective(problem, x).mean())))
    return out


def run_problem(
    name: str, problem: InputProblem, x0: torch.Tensor, alpha: Any, args: argparse.Namespace
) -> list[dict[str, Any]]:
    naive_kw = {
        "outer_steps": args.outer_steps,
        "x_tol": args.x_tol,
        "solver": "anderson",
        "f_max_iter": 50,
        "b_max_iter": 50,
        "tol": args.tol,
        "record": True,
    }
    jiio_kw = {"max_iter": args.jiio_iters, "tol": args.tol, "record": True}
    methods = {
        "naive": lambda: naive_input_optimization(problem, x0, alpha, **naive_kw),
        "naive-warm": lambda: naive_input_optimization(problem, x0, alpha, warm_start=True, **naive_kw),
        "jiio": lambda: jiio(problem, x0, alpha, **jiio_kw),
        "jiio-anderson": lambda: jiio(problem, x0, alpha, solver="anderson", m=5, **jiio_kw),
    }
    results = {}
    for method, run in methods.items():
        runs = [run() for _ in range(args.repeats)]  # the same iterates each time: only the clock differs
        results[method] = (runs, _curve(problem, runs[0], args.points))
    start = float(solve_objective(problem, problem.proj(x0)).mean())
    final_naive = results["naive"][1][-1][3]
    target = final_naive + args.gap * abs(start - final_naive)
    rows = []
    for method, (runs, curve) in results.items():
        res = runs[0]
        hit = next(((i, n) for i, _, n, v in curve if v <= target), None)
        t_hit = None if hit is None else statistics.median(r.history[hit[0]][0] for r in runs)
        vjp_per_f = res.vjps / max(res.f_evals, 1)
        total = statistics.median(r.time_s for r in runs)
        rows.append(
            {
                "problem": name,
                "method": method,
                "start_objective": start,
                "target_objective": target,
                "final_objective": curve[-1][3],
                "time_to_target_s": t_hit,
                "f_evals_to_target": None if hit is None else hit[1],
                "vjps_to_target": None if hit is None else round(hit[1] * vjp_per_f),
                "iterations": res.iterations,
                "total_s": total,
                "s_per_iteration": total / max(res.iterations, 1),
                "gradient_mapping": float(res.residuals.gradient_mapping.max()),
                "equilibrium_residual": float(res.residuals.equilibrium.max()),
                "adjoint_residual": float(res.residuals.adjoint.max()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["method"] == "naive")["time_to_target_s"]
    for r in rows:
        t = r["time_to_target_s"]
        r["speedup"] = None if (t is None or base is None or t == 0) else base / t
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    cols = [
        "problem",
        "method",
        "time to target s",
        "speedup vs naive",
        "f evals",
        "VJPs",
        "objective (start → final)",
        "final ‖grad map‖",
        "final eq. / adjoint residual",
    ]
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        cells = [
            r["problem"],
            r["method"],
            f(r["time_to_target_s"], ".2f"),
            f(r["speedup"], ".1f") + "×",
            f(r["f_evals_to_target"], "d"),
            f(r["vjps_to_target"], "d"),
            f"{r['start_objective']:.4f} → {r['final_objective']:.4f} (target {r['target_objective']:.4f})",
            f"{r['gradient_mapping']:.1e}",
            f"{r['equilibrium_residual']:.1e} / {r['adjoint_residual']:.1e}",
        ]
        out += "| " + " | ".join(cells) + " |\n"
    return out


def simple_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        out += "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |\n"
    return out


ATTACK_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "pgd": ("pgd", {}),
    "jiio": ("jiio", {}),
    "jiio select=best": ("jiio", {"select": "best"}),
    "jiio anderson m=5": ("jiio", {"solver": "anderson", "m": 5}),
    "jiio cold start": ("jiio", {"warm_start": False}),
}


def pgd_comparison(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Robust accuracy under PGD and JIIO at equal iteration counts (whole digits test split)."""
    sp = load_dataset("digits", seed=args.seed)
    xt, yt = torch.from_numpy(sp.x_test.copy()), torch.from_numpy(sp.y_test.copy())
    model, _ = digits_model(args)
    rows = []
    for steps in args.attack_steps:
        for name, (kind, opts) in ATTACK_VARIANTS.items():
            cfg = AttackConfig(kind, epsilon=args.eps, steps=steps, options=opts)
            t0 = time.perf_counter()
            st = robust_accuracy(model, xt, yt, cfg, deq=DEQ)
            wall = time.perf_counter() - t0
            cost = run_attack(model, xt, yt, cfg, deq=DEQ, generator=torch.Generator().manual_seed(0))
            rows.append(
                {
                    "iterations": steps,
                    "attack": name,
                    "robust acc": float(st.robust_acc),
                    "f evals / sample": round(cost.nfe_fwd, 1),
                    "VJPs / sample": round(cost.nfe_bwd, 1),
                    "wall s": wall,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def backward_comparison(args: argparse.Namespace) -> list[dict[str, Any]]:
    """VJPs of the parameter backward at JIIO's state: warm-started from ``-λ/B`` vs started from ``w``."""
    sp = load_dataset("digits", seed=args.seed)
    x, y = torch.from_numpy(sp.x_train.copy()), torch.from_numpy(sp.y_train.copy())
    model, _ = digits_model(args)
    deq = {**DEQ, "b_max_iter": 100, "tol": 1e-6}
    rows = []
    for steps in args.attack_steps:
        cfg = AttackConfig("jiio", epsilon=args.eps, steps=steps)
        vjps: dict[bool, list[int]] = {True: [], False: []}
        diffs = []
        for b in range(5):
            grads = {}
            for warm in (True, False):
                model.zero_grad(set_to_none=True)
                xb, yb = x[64 * b : 64 * (b + 1)], y[64 * b : 64 * (b + 1)]
                gen = torch.Generator().manual_seed(b)
                loss, out, _, _ = jiio_adversarial_loss(model, xb, yb, cfg, deq, gen, warm_backward=warm)
                loss.backward()
                grads[warm] = torch.cat([p.grad.flatten() for p in model.parameters()])
                vjps[warm].append(out.deq.backward.nfe)
            diffs.append(float((grads[True] - grads[False]).norm() / grads[False].norm()))
        model.zero_grad(set_to_none=True)
        rows.append(
            {
                "JIIO iterations": steps,
                "backward VJPs, warm (-λ/B)": statistics.mean(vjps[True]),
                "backward VJPs, cold (w)": statistics.mean(vjps[False]),
                "max rel. gradient difference": max(diffs),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def training_comparison(args: argparse.Namespace) -> list[dict[str, Any]]:
    """PGD-AT vs JIIO-AT from the same initialisation: clean / PGD-20 accuracy and evaluations per step."""
    sp = load_dataset("digits", seed=args.seed)
    xt, yt = torch.from_numpy(sp.x_test.copy()), torch.from_numpy(sp.y_test.copy())
    eps = args.eps
    modes = {
        "pgd-at (PGD-5)": AdversarialConfig("pgd", epsilon=eps, steps=5),
        "pgd-at (PGD-10)": AdversarialConfig("pgd", epsilon=eps, steps=10),
        "jiio-at (JIIO-5)": AdversarialConfig("pgd", epsilon=eps, steps=5, attack="jiio"),
        "jiio-at (JIIO-10)": AdversarialConfig("pgd", epsilon=eps, steps=10, attack="jiio"),
    }
    rows = []
    for name, adv in modes.items():
        t0 = time.perf_counter()
        model, stats = digits_model(args, adv)
        wall = time.perf_counter() - t0
        st = robust_accuracy(model, xt, yt, AttackConfig("pgd", epsilon=eps, steps=20), deq=DEQ)
        rows.append(
            {
                "training": name,
                "clean acc": float(st.clean_acc),
                "PGD-20 acc": float(st.robust_acc),
                "f evals / sample / step": round(stats.nfe_fwd, 1),
                "VJPs / sample / step": round(stats.nfe_bwd, 1),
                "train wall s": wall,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-6, help="solver tolerance (abs residual)")
    p.add_argument("--x-tol", type=float, default=1e-4, help="naive loop stops at this gradient mapping")
    p.add_argument("--outer-steps", type=int, default=150)
    p.add_argument("--jiio-iters", type=int, default=1500)
    p.add_argument("--gap", type=float, default=0.01, help="target = naive final + gap × its decrease")
    p.add_argument("--points", type=int, default=80, help="iterates re-evaluated per method")
    p.add_argument("--inpaint-step", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median time)")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--decoder-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--problems",
        nargs="*",
        default=["attack", "inpainting", "pgd", "backward", "training"],
        help="attack, inpainting: JIIO vs the naive loop; pgd: JIIO vs PGD at equal iterations; "
        "backward: warm-started parameter backward; training: JIIO-AT vs PGD-AT",
    )
    p.add_argument("--attack-steps", type=int, nargs="*", default=[5, 10, 20, 40])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.outer_steps, args.jiio_iters, args.points = 32, 40, 400, 30
        args.train_epochs, args.decoder_epochs = 3, 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    if "attack" in args.problems:
        rows += run_problem("attack", *attack_problem(args), args)
    if "inpainting" in args.problems:
        rows += run_problem("inpainting", *inpainting(args), args)
    tables = {"naive": markdown(rows) if rows else ""}
    extra = {"pgd": pgd_comparison, "backward": backward_comparison, "training": training_comparison}
    for name, run in extra.items():
        if name in args.problems:
            tables[name] = simple_table(run(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "jiio.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    table = "\n".join(f"### {k}\n\n{v}" for k, v in tables.items() if v)
    (out / "jiio.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
