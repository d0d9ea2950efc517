"""Clean and PGD accuracy of DEQs trained plainly, with PGD-AT, and with the dynamics regulations.

Central rows train one :class:`~fedeq.models.MLPDEQ` per method with :func:`fedeq.train.train_local`;
federated rows run ``fedeq simulate`` (Flower simulation, heterogeneous device tiers, each client attacking
through its own tier's solver budgets) and evaluate the saved global model. All rows are evaluated on the
same held-out test split with the same attacks: L∞ PGD (random start) through the DEQ's exact implicit
gradient, the unrolled gradient and the one-step (JFB) gradient, and PGD computed on an intermediate state
(forward budget ``k``) but evaluated at the equilibrium; "worst PGD" is the lowest of the four.

Methods:

- ``plain``: cross-entropy on clean inputs.
- ``pgd-at``: PGD adversarial training (``train.adversarial=pgd``).
- ``pgd-at+ris``: PGD-AT with the adversarial loss at a random intermediate state
  (``train.intermediate_states=true``).
- ``pgd-at+ris+ier``: the previous model evaluated with entropy-reducing input updates along the dynamics
  (inference only; the attack here is computed on the model without them, i.e. not adaptive to the
  defense; ``--study ier`` adds the adaptive BPDA attack through the defense).
- central only: ``trades`` and ``jiio-at`` (PGD-AT whose inner maximisation is solved by JIIO).

Examples::

    python simulations/robustness.py                          # digits, central + federated
    python simulations/robustness.py --data mnist5k --skip-federated
    python simulations/robustness.py --quick                  # a smoke run
    python simulations/robustness.py --study lyadeq           # LyaDEQ vs the plain DEQ (Chu et al.'s claim)
    python simulations/robustness.py --study ier              # entropy updates vs an adaptive attack
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedeq.config import load_config  # noqa: E402
from fedeq.data import load_dataset, to_tensors  # noqa: E402
from fedeq.models import build_model  # noqa: E402
from fedeq.robust import AttackConfig, robust_accuracy  # noqa: E402
from fedeq.train import AdversarialConfig, EntropyDefense, entropy_predictor, train_local  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness_studies import ier_study, lyadeq_study  # noqa: E402


def _attacks(args: argparse.Namespace) -> dict[str, tuple[AttackConfig, dict[str, Any]]]:
    """Evaluation attacks: PGD with the IFT, unrolled and JFB gradients, and PGD on an intermediate state."""
    base = AttackConfig("pgd", epsilon=args.eps, steps=args.pgd_steps, gradient="ift")

    def grad(name: str) -> AttackConfig:
        return AttackConfig(**{**base.__dict__, "gradient": name})

    return {
        "pgd_ift": (base, {}),
        "pgd_unrolled": (grad("unrolled"), {}),
        "pgd_jfb": (grad("jfb"), {}),
        "pgd_intermediate": (base, {"f_max_iter": args.intermediate_k}),
    }


def _evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    deq: dict[str, Any],
    args: argparse.Namespace,
    defense: EntropyDefense | None = None,
) -> dict[str, float]:
    predict = entropy_predictor(model, defense, deq) if defense is not None else None
    row: dict[str, float] = {}
    for name, (atk, attack_deq) in _attacks(args).items():
        st = robust_accuracy(
            model, x, y, atk, deq=deq, attack_deq=attack_deq, predict=predict, seed=args.seed
        )
        row["clean_acc"] = st.clean_acc
        row[f"{name}_acc"] = st.robust_acc
    return row


def _defense(args: argparse.Namespace) -> EntropyDefense:
    radius = args.eps if args.ier_radius is None else args.ier_radius
    return EntropyDefense(args.ier_stages, args.ier_updates, args.ier_step, radius)


def _method_rows(
    base: dict[str, Any],
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    deq: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The row of ``base["method"]`` (printed as it comes); ``pgd-at+ris`` adds its ``+ier`` row."""
    rows = [{**base, **_evaluate(model, x, y, deq, args)}]
    print(_fmt(rows[-1]), flush=True)
    if base["method"] == "pgd-at+ris":
        ier = _evaluate(model, x, y, deq, args, _defense(args))
        rows.append({**base, "method": base["method"] + "+ier", **ier})
        print(_fmt(rows[-1]), flush=True)
    return rows


def _test_tensors(sp: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    return to_tensors(sp.x_test[: args.test_size], sp.y_test[: args.test_size])


def central(args: argparse.Namespace) -> list[dict[str, Any]]:
    sp = load_dataset(args.data, seed=args.seed)
    x, y = to_tensors(sp.x_train, sp.y_train)
    xt, yt = _test_tensors(sp, args)
    deq = {"solver": "anderson", "f_max_iter": args.f_iter, "b_max_iter": args.b_iter, "tol": 1e-4}
    common = {"epsilon": args.eps, "steps": args.train_steps}
    methods: list[tuple[str, AdversarialConfig | None]] = [
        ("plain", None),
        ("pgd-at", AdversarialConfig("pgd", **common)),
        ("pgd-at+ris", AdversarialConfig("pgd", intermediate_states=True, **common)),
        ("trades", AdversarialConfig("trades", trades_beta=args.trades_beta, **common)),
        ("jiio-at", AdversarialConfig("pgd", attack="jiio", epsilon=args.eps, steps=args.jiio_steps)),
    ]
    rows = []
    for name, adv in methods:
        if args.only and name not in args.only:
            continue
        torch.manual_seed(args.seed)
        model = build_model("mlp_deq", sp.input_shape, sp.num_classes, argparse.Namespace(hidden=args.hidden))
        t0 = time.perf_counter()
        st = train_local(
            model,
            x,
            y,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            deq=deq,
            seed=args.seed,
            adversarial=adv,
        )
        train_s = time.perf_counter() - t0
        base = {
            "setting": "central",
            "method": name,
            "train_s": train_s,
            "nfe_per_step": st.nfe_fwd + st.nfe_bwd,
        }
        rows += _method_rows(base, model, xt, yt, deq, args)
    return rows


def federated(args: argparse.Namespace) -> list[dict[str, Any]]:
    from fedeq.devices.settings import tier_deq_settings
    from fedeq.engines.simulate import simulate
    from fedeq.server.app import reference_tier

    out_root = Path(args.out) / "federated"
    variants = [
        ("plain", []),
        ("pgd-at", ["train.adversarial=pgd"]),
        ("pgd-at+ris", ["train.adversarial=pgd", "train.intermediate_states=true"]),
    ]
    rows = []
    for name, extra in variants:
        overrides = [
            f"seed={args.seed}",
            f"rounds={args.rounds}",
            f"num_clients={args.clients}",
            f"clients_per_round={args.clients}",
            f"data.name={args.data}",
            f"model.hidden={args.hidden}",
            f"train.local_epochs={args.local_epochs}",
            f"train.lr={args.lr}",
            f"train.batch_size={args.batch_size}",
            f"train.epsilon={args.eps}",
            f"train.attack_steps={args.train_steps}",
            f"output_dir={out_root}",
            f"run_name={name}",
            *extra,
        ]
        cfg = load_config(None, overrides)
        t0 = time.perf_counter()
        out = simulate(cfg, quiet=True)
        train_s = time.perf_counter() - t0
        weights = out / "global_model.pt"
        if not weights.exists():
            raise RuntimeError(f"{weights} was not written; the federated rows need the final global model")
        sp = load_dataset(cfg.data.name, seed=cfg.seed, test_fraction=cfg.data.test_fraction)
        model = build_model(cfg.model.name, sp.input_shape, sp.num_classes, cfg.model)
        model.load_state_dict(torch.load(weights))
        deq = tier_deq_settings(cfg, reference_tier(cfg))
        xt, yt = _test_tensors(sp, args)
        summary = json.loads((out / "summary.json").read_text())
        base = {
            "setting": "federated",
            "method": name,
            "train_s": train_s,
            "sim_time_s": summary.get("total_sim_time_s"),
        }
        rows += _method_rows(base, model, xt, yt, deq, args)
    return rows


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    k, n = args.intermediate_k, args.pgd_steps
    cols = [
        "setting",
        "method",
        "clean acc",
        f"PGD-{n} (IFT grad)",
        f"PGD-{n} (unrolled grad)",
        f"PGD-{n} (JFB grad)",
        f"PGD-{n} on state k={k}",
        "worst PGD",
        "train wall s",
    ]
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    keys = ("pgd_ift_acc", "pgd_unrolled_acc", "pgd_jfb_acc", "pgd_intermediate_acc")
    for r in rows:
        cells = [r["setting"], r["method"], f"{r['clean_acc']:.3f}", *(f"{r[key]:.3f}" for key in keys)]
        cells += [f"{min(r[key] for key in keys):.3f}", f"{r['train_s']:.0f}"]
        out += "| " + " | ".join(cells) + " |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", choices=["digits", "mnist5k"])
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius (train and test)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD steps of the evaluation attack")
    p.add_argument("--train-steps", type=int, default=5, help="PGD steps of the training attack")
    p.add_argument("--jiio-steps", type=int, default=10, help="joint iterations of the JIIO training attack")
    p.add_argument("--trades-beta", type=float, default=6.0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--f-iter", type=int, default=12, help="central forward budget (Anderson)")
    p.add_argument("--b-iter", type=int, default=12, help="central backward budget (IFT)")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--ier-stages", type=int, default=None, help="default: forward budget // 2 (the authors')")
    p.add_argument("--ier-updates", type=int, default=10)
    p.add_argument("--ier-step", type=float, default=0.01)
    p.add_argument("--ier-radius", type=float, default=None, help="L-inf bound of the updates (default: eps)")
    p.add_argument("--intermediate-k", type=int, default=2, help="budget of the intermediate-state attack")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--only", nargs="*", help="central methods to run (default: all)")
    p.add_argument("--skip-central", action="store_true")
    p.add_argument("--skip-federated", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", default="outputs/robustness")
    p.add_argument(
        "--study",
        default="methods",
        choices=["methods", "lyadeq", "ier"],
        help="methods: the table of training methods; lyadeq: LyaDEQ vs the plain DEQ (FGSM, noise, PGD); "
        "ier: entropy-reducing input updates against non-adaptive and adaptive (BPDA) attacks",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds, args.clients, args.test_size, args.pgd_steps = 1, 1, 4, 100, 5
    if args.study != "methods":
        torch.set_num_threads(args.threads)
        study = lyadeq_study if args.study == "lyadeq" else ier_study
        table = study(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.study}_{args.data}_eps{args.eps:g}.md").write_text(table)
        print(table)
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if not args.skip_central:
        rows += central(args)
    if not args.skip_federated:
        rows += federated(args)
    table = markdown(rows, args)
    tag = f"{args.data}_eps{args.eps:g}"
    (out / f"robustness_{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / f"robustness_{tag}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
