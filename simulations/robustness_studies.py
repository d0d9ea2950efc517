"""Two studies run by ``simulations/robustness.py --study ...`` (central training on one data set).

``lyadeq``: the claim of Chu et al. that LyaDEQ is more robust than a plain DEQ, and more still with
adversarial training. Four models (``mlp_deq`` and ``lyadeq``, each trained plainly and with PGD-AT) are
evaluated on clean inputs, FGSM at several radii, PGD-20 and Gaussian noise.

``ier``: entropy-reducing input updates (Yang et al.) on a PGD-AT + random-intermediate-states model, with
clean accuracy, PGD computed on the undefended model (non-adaptive) and PGD with BPDA through the defense
(adaptive).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from fedeq.data import load_dataset, to_tensors
from fedeq.models import build_model
from fedeq.robust import AttackConfig, bpda_attack, robust_accuracy, run_attack
from fedeq.train import AdversarialConfig, EntropyDefense, entropy_defense_fn, entropy_predictor, train_local

Tensor = torch.Tensor
FGSM_RADII = (0.05, 0.1, 0.2)
NOISE_SIGMAS = (0.1, 0.3)


def _data(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
    sp = load_dataset(args.data, seed=args.seed)
    x, y = to_tensors(sp.x_train, sp.y_train)
    xt, yt = to_tensors(sp.x_test[: args.test_size], sp.y_test[: args.test_size])
    return x, y, xt, yt, tuple(sp.input_shape)


def _deq(args: argparse.Namespace) -> dict[str, Any]:
    return {"solver": "anderson", "f_max_iter": args.f_iter, "b_max_iter": args.b_iter, "tol": 1e-4}


def _train(
    name: str, adv: AdversarialConfig | None, data: tuple, args: argparse.Namespace
) -> tuple[Any, float]:
    x, y, _, _, shape = data
    torch.manual_seed(args.seed)

    class _Cfg:
        hidden = args.hidden

    model = build_model(name, shape, 10, _Cfg())
    t0 = time.perf_counter()
    train_local(
        model,
        x,
        y,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        adversarial=adv,
        deq=_deq(args),
    )
    return model, time.perf_counter() - t0


def _noise_acc(model: Any, x: Tensor, y: Tensor, sigma: float, deq: dict[str, Any], seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    xn = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    model.eval()
    with torch.no_grad():
        return float((model(xn, **deq).logits.argmax(1) == y).float().mean())


def lyadeq_study(args: argparse.Namespace) -> str:
    """The LyaDEQ table (module docstring)."""
    data = _data(args)
    xt, yt = data[2], data[3]
    deq = _deq(args)
    at = AdversarialConfig("pgd", epsilon=args.eps, steps=args.train_steps)
    cols = ["model", "training", "clean", *(f"FGSM ε={e:g}" for e in FGSM_RADII)]
    cols.append(f"PGD-{args.pgd_steps} ε={args.eps:g}")
    cols += [*(f"noise σ={s:g}" for s in NOISE_SIGMAS), "train s"]
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for name in ("mlp_deq", "lyadeq"):
        for label, adv in (("plain", None), ("pgd-at", at)):
            model, train_s = _train(name, adv, data, args)
            cells = [name, label]
            clean = None
            for eps in FGSM_RADII:
                st = robust_accuracy(model, xt, yt, AttackConfig("fgsm", eps, gradient="ift"), deq=deq)
                clean = st.clean_acc
                cells.append(f"{st.robust_acc:.3f}")
            pgd = AttackConfig("pgd", args.eps, steps=args.pgd_steps, gradient="ift")
            cells.append(f"{robust_accuracy(model, xt, yt, pgd, deq=deq, seed=args.seed).robust_acc:.3f}")
            cells.insert(2, f"{clean:.3f}")
            cells += [f"{_noise_acc(model, xt, yt, s, deq, args.seed):.3f}" for s in NOISE_SIGMAS]
            cells.append(f"{train_s:.0f}")
            print(" ".join(cells), flush=True)
            out += "| " + " | ".join(cells) + " |\n"
    return out


def ier_study(args: argparse.Namespace) -> str:
    """The entropy-defense table (module docstring)."""
    data = _data(args)
    xt, yt = data[2], data[3]
    deq = _deq(args)
    adv = AdversarialConfig("pgd", epsilon=args.eps, steps=args.train_steps, intermediate_states=True)
    model, train_s = _train("mlp_deq", adv, data, args)
    radius = args.eps if args.ier_radius is None else args.ier_radius
    defense = EntropyDefense(args.ier_stages, args.ier_updates, args.ier_step, radius)
    pgd = AttackConfig("pgd", args.eps, steps=args.pgd_steps, gradient="ift")
    plain = robust_accuracy(model, xt, yt, pgd, deq=deq, seed=args.seed)
    predict = entropy_predictor(model, defense, deq)
    run = entropy_defense_fn(model, defense, deq)
    gen = torch.Generator().manual_seed(args.seed)
    transfer = run_attack(model, xt, yt, pgd, deq=deq, generator=gen).x_adv
    bpda = bpda_attack(model, xt, yt, run, pgd, deq=deq, generator=gen).x_adv
    bpda_warm = bpda_attack(model, xt, yt, run, pgd, deq=deq, init=transfer).x_adv
    with torch.no_grad():
        wrong = {
            name: predict(xa).argmax(1) != yt
            for name, xa in (("transfer", transfer), ("bpda", bpda), ("bpda_warm", bpda_warm))
        }
        clean_defended = float((predict(xt).argmax(1) == yt).float().mean())
    acc = {name: 1.0 - float(w.float().mean()) for name, w in wrong.items()}
    worst = 1.0 - float((wrong["transfer"] | wrong["bpda"] | wrong["bpda_warm"]).float().mean())
    n = args.pgd_steps
    cols = ["model", "inference", "clean", f"PGD-{n} on the undefended model (non-adaptive)"]
    cols += [f"PGD-{n}+BPDA (random start)", f"PGD-{n}+BPDA (from the non-adaptive point)", "worst"]
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    out += f"| pgd-at+ris | plain | {plain.clean_acc:.3f} | {plain.robust_acc:.3f} | – | – | "
    out += f"{plain.robust_acc:.3f} |\n"
    out += (
        f"| pgd-at+ris | entropy updates | {clean_defended:.3f} | {acc['transfer']:.3f} | "
        f"{acc['bpda']:.3f} | {acc['bpda_warm']:.3f} | {worst:.3f} |\n"
    )
    print(out, f"train s {train_s:.0f}", flush=True)
    return out
