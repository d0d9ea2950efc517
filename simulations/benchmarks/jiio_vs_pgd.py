"""The JIIO attack against PGD at equal steps, and JIIO-AT against PGD-AT, on the model of tests/test_jiio.py.

The model is the one of ``tests/test_jiio.py`` (an ``MLPDEQ`` with 32 hidden units trained for 4 epochs on
digits, Anderson 12/12, tolerance 1e-4); every attack is L∞ with ε = 0.1 and random start, and robust accuracy
is measured on the whole test split (360 images).

- ``attack``: robust accuracy under PGD and under the JIIO attack (and its options) with the same number of
  iterations, and the attack's evaluations of ``f`` and VJPs per sample. The ``state updates n`` rows are a
  diagnostic, not an attack fedeq offers: before each input step the state and the adjoint take ``n - 1``
  extra damped updates at the current input (``n = 1`` is JIIO); as ``n`` grows they catch up with the input
  and the attack approaches PGD, which shows that the gap at equal steps is the lag of the state and adjoint.
- ``training``: one epoch of PGD-AT or JIIO-AT from that model (the setting of the slow test
  ``test_jiio_adversarial_training_matches_pgd_at_with_fewer_evaluations``): clean and PGD-10 accuracy, and
  the mean evaluations of ``f`` and VJPs per training step (attack included).

Example::

    python simulations/benchmarks/jiio_vs_pgd.py                 # ≈ 2 min on one CPU thread
    python simulations/benchmarks/jiio_vs_pgd.py --problems attack --steps 5 10
"""

from __future__ import annotations

import argparse
import json
import sys
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
from fedeq.robust import AttackConfig, robust_accuracy, run_attack  # noqa: E402
from fedeq.robust.ball import project_ball_box, random_start  # noqa: E402
from fedeq.robust.input_problem import InputProblem  # noqa: E402
from fedeq.robust.jiio import JIIOSchedule, jiio  # noqa: E402
from fedeq.robust.naive import solve_state_and_adjoint  # noqa: E402
from fedeq.train import train_local  # noqa: E402
from fedeq.train.adversarial import AdversarialConfig  # noqa: E402

DEQ = {"solver": "anderson", "f_max_iter": 12, "b_max_iter": 12, "tol": 1e-4}
EPS = 0.1

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "pgd": ("pgd", {}),
    "jiio": ("jiio", {}),
    "jiio select=best": ("jiio", {"select": "best"}),
    "jiio anderson m=5": ("jiio", {"solver": "anderson", "m": 5}),
    "jiio cold start": ("jiio", {"warm_start": False}),
}


def data() -> tuple[torch.Tensor, ...]:
    sp = load_dataset("digits", seed=0)
    return tuple(torch.from_numpy(a.copy()) for a in (sp.x_train, sp.y_train, sp.x_test, sp.y_test))


def test_model(x: torch.Tensor, y: torch.Tensor) -> MLPDEQ:
    """The model of the ``digits_model`` fixture of tests/test_jiio.py (same seed, same model)."""
    torch.manual_seed(0)
    model = MLPDEQ(64, 10, hidden=32)
    train_local(model, x, y, epochs=4, lr=0.01, batch_size=32, deq=DEQ, seed=0)
    return model.eval()


def lagged_attack(
    model: MLPDEQ, xt: torch.Tensor, yt: torch.Tensor, steps: int, updates: int
) -> tuple[float, float]:
    """Robust accuracy and f evaluations per sample of JIIO with ``updates`` state/adjoint updates per input
    step (the diagnostic of the module docstring; ``updates = 1`` is the JIIO attack)."""
    parts = deq_parts(model)
    gen = torch.Generator().manual_seed(0)
    alpha, sched = 2.5 * EPS / steps, JIIOSchedule(direction="sign")
    correct, nfe = 0, 0.0
    for s in range(0, xt.shape[0], 256):
        x0, yb = xt[s : s + 256], yt[s : s + 256]

        def proj(v: torch.Tensor, x0: torch.Tensor = x0) -> torch.Tensor:
            return project_ball_box(v, x0, EPS, "linf")

        def objective(z: torch.Tensor, _x: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
            return -F.cross_entropy(parts.readout(z), yb, reduction="none")

        problem = InputProblem(parts.f, objective, lambda v: parts.z0(parts.inject(v)), proj)
        xv = proj(x0 + random_start(x0, EPS, "linf", gen))
        z, lam, _, nf, _ = solve_state_and_adjoint(
            problem, xv, solver="anderson", f_max_iter=12, b_max_iter=12, tol=1e-4
        )
        for _ in range(steps):
            if updates > 1:  # step 0: only z and λ move
                r = jiio(
                    problem, xv, 0.0, max_iter=updates - 1, schedule=sched, z0=z, lam0=lam, residuals=False
                )
                z, lam = r.z, r.lam
            r = jiio(problem, xv, alpha, max_iter=1, schedule=sched, z0=z, lam0=lam, residuals=False)
            z, lam, xv = r.z, r.lam, r.x
        nfe = nf + steps * updates
        with torch.no_grad():
            correct += int((model(xv, **DEQ).logits.argmax(1) == yb).sum())
    return correct / xt.shape[0], float(nfe)


def attack_table(model: MLPDEQ, xt: torch.Tensor, yt: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    rows = []
    for steps in args.steps:
        for name, (kind, opts) in VARIANTS.items():
            cfg = AttackConfig(kind, epsilon=EPS, steps=steps, options=dict(opts))
            acc = robust_accuracy(model, xt, yt, cfg, deq=DEQ).robust_acc
            cost = run_attack(model, xt[:64], yt[:64], cfg, deq=DEQ)  # per sample of one batch, as the test
            rows.append(
                {
                    "steps": steps,
                    "attack": name,
                    "robust acc": float(acc),
                    "f evals": cost.nfe_fwd,
                    "VJPs": cost.nfe_bwd,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for n in args.updates:
            acc, nfe = lagged_attack(model, xt, yt, steps, n)
            rows.append(
                {
                    "steps": steps,
                    "attack": f"state updates n={n}",
                    "robust acc": acc,
                    "f evals": nfe,
                    "VJPs": None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def training_table(model: MLPDEQ, data_: tuple[torch.Tensor, ...]) -> list[dict]:
    x, y, xt, yt = data_
    modes = {
        "none (the starting model)": None,
        "pgd-at (PGD-5)": AdversarialConfig("pgd", epsilon=EPS, steps=5),
        "pgd-at (PGD-10)": AdversarialConfig("pgd", epsilon=EPS, steps=10),
        "jiio-at (JIIO-5)": AdversarialConfig("pgd", epsilon=EPS, steps=5, attack="jiio"),
        "jiio-at (JIIO-10)": AdversarialConfig("pgd", epsilon=EPS, steps=10, attack="jiio"),
    }
    rows = []
    for name, adv in modes.items():
        net = MLPDEQ(64, 10, hidden=32)
        net.load_state_dict(model.state_dict())
        nf = nb = None
        if adv is not None:
            st = train_local(net, x, y, epochs=1, lr=0.01, batch_size=32, deq=DEQ, seed=0, adversarial=adv)
            nf, nb = round(st.nfe_fwd, 1), round(st.nfe_bwd, 1)
        acc = robust_accuracy(net.eval(), xt, yt, AttackConfig("pgd", epsilon=EPS, steps=10), deq=DEQ)
        rows.append(
            {
                "training (1 epoch)": name,
                "clean acc": float(acc.clean_acc),
                "PGD-10 acc": float(acc.robust_acc),
                "f evals / step": nf,
                "VJPs / step": nb,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell(col: str, v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if "acc" in col else f"{v:.1f}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        cells = [_cell(k, v) for k, v in r.items()]
        out += "| " + " | ".join(cells) + " |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="*", default=["attack", "training"], choices=["attack", "training"])
    p.add_argument("--steps", type=int, nargs="*", default=[1, 5, 10, 40])
    p.add_argument("--updates", type=int, nargs="*", default=[2, 5], help="diagnostic rows (state updates n)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = data()
    model = test_model(d[0], d[1])
    tables = {}
    if "attack" in args.problems:
        tables["attack"] = table(attack_table(model, d[2], d[3], args))
    if "training" in args.problems:
        tables["training"] = table(training_table(model, d))
    text = "\n".join(f"### {k}\n\n{v}" for k, v in tables.items())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "jiio_vs_pgd.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
