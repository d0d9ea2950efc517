"""Personalised federated methods: what each client trains, keeps and sends (docs/personalization.md).

A method is a :class:`PersonalMethod` registered in :data:`fedeq.registry.PERSONALIZATION` under the name
``personalization.method`` takes. It says what travels (:attr:`PersonalMethod.shares`: the model without its
personal modules, the whole model, or nothing), how a client trains in a round (:meth:`~PersonalMethod.train`,
returning the tensors it sends) and which model a client's personalised accuracy is measured with
(:meth:`~PersonalMethod.load_personal`). Personal tensors live in the node's :class:`PersonalState`.

Notation: ``θ`` the shared part as received this round, ``θ_i`` the client's copy, ``h_i`` its personal
head, ``λ_i`` its ADMM dual, ``v_i`` a personal whole model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from fedeq.data.clients import ClientData
from fedeq.personal.memory import ActivationMeter
from fedeq.personal.split import clone_state, select, trainable_only
from fedeq.personal.state import PersonalState
from fedeq.registry import PERSONALIZATION
from fedeq.train import TrainStats, move_to, train_local

__all__ = ["LocalJob", "PersonalMethod", "combine_stats", "get_method"]

Shares = Literal["body", "model", "nothing"]


@dataclass
class LocalJob:
    """One client's call: its model object, data, options and the keys of its personal part.

    ``train`` holds :func:`~fedeq.train.train_local`'s keyword options (epochs from ``train.local_epochs``,
    ``deq`` the tier's DEQ settings, ``device``, ...); ``initial`` is the run's seeded initial model state,
    which personal parts start from; ``seed`` seeds this call's shuffles.
    """

    model: nn.Module
    data: ClientData
    train: dict[str, Any]
    personal: frozenset[str]
    initial: Mapping[str, Tensor]
    settings: Any
    seed: int
    activation_bytes: float = 0.0
    """The largest mean bytes saved for backward per step of the phases trained so far."""
    sim_spent_s: float = 0.0
    """Simulated compute seconds the phases trained so far used (against ``train["sim_budget_s"]``)."""

    def fit(
        self,
        epochs: int,
        seed_offset: int,
        trainable: frozenset[str] | None = None,
        sends: bool = False,
        **kw: Any,
    ) -> TrainStats:
        """``train_local`` on the client's training split for ``epochs`` epochs, only ``trainable`` parameters
        (``None``: all that train at all) updated; ``kw`` adds or overrides options (``penalty``, ...).

        FedProx's ``proximal_mu`` applies only to the phase that trains what the client ``sends``. A device
        deadline (``sim_budget_s``) covers the whole call: each phase gets what the earlier ones left. The
        activation bytes of the phase's steps are measured (:attr:`activation_bytes`)."""
        options = {**self.train, "epochs": int(epochs), "seed": self.seed + seed_offset, **kw}
        if not sends:
            options["proximal_mu"] = 0.0
        budget = options.get("sim_budget_s")
        if budget is not None:
            options["sim_budget_s"] = max(float(budget) - self.sim_spent_s, 0.0)
            if options["sim_budget_s"] <= 0.0:
                options["epochs"] = 0
        move_to(self.model, options.get("device", "cpu"))  # parameters where they train, before the meter
        with trainable_only(self.model, trainable), ActivationMeter().watch(self.model) as meter:
            stats = train_local(self.model, self.data.x_train, self.data.y_train, **options)
        if stats.steps:
            per_step = meter.saved_bytes / stats.steps
            self.activation_bytes = max(self.activation_bytes, per_step)
        cost = float(options.get("sim_cost_s", 0.0))
        self.sim_spent_s += (stats.nfe_fwd + stats.nfe_bwd) * stats.samples_processed * cost
        return stats

    @property
    def shared(self) -> frozenset[str]:
        """Keys of the shared part."""
        return frozenset(k for k in self.model.state_dict() if k not in self.personal)

    def parameter_keys(self, keys: frozenset[str]) -> frozenset[str]:
        """The trainable parameters among ``keys``."""
        return frozenset(n for n, _ in self.model.named_parameters() if n in keys)

    def load(self, *parts: Mapping[str, Tensor]) -> None:
        """Load the union of ``parts`` (later ones win) into the model; it must cover every key."""
        merged: dict[str, Tensor] = {}
        for part in parts:
            merged.update(part)
        self.model.load_state_dict(merged, strict=True)

    def state(self) -> dict[str, Tensor]:
        """A CPU copy of the model's state."""
        return clone_state(self.model.state_dict())


def combine_stats(parts: Sequence[TrainStats]) -> TrainStats:
    """One call's statistics from its phases: sums of steps, samples and seconds; step-weighted means."""
    parts = [p for p in parts if p.steps > 0] or list(parts[:1])
    steps = sum(p.steps for p in parts)

    def mean(attr: str) -> float:
        return sum(getattr(p, attr) * p.steps for p in parts) / max(steps, 1)

    return TrainStats(
        num_examples=parts[0].num_examples,
        steps=steps,
        loss=mean("loss"),
        fp_residual=mean("fp_residual"),
        nfe_fwd=mean("nfe_fwd"),
        nfe_bwd=mean("nfe_bwd"),
        samples_processed=sum(p.samples_processed for p in parts),
        compute_s=sum(p.compute_s for p in parts),
        compute_cpu_s=sum(p.compute_cpu_s for p in parts),
    )


class PersonalMethod:
    """Base of the personalised methods (see the module docstring)."""

    shares: ClassVar[Shares] = "body"
    """What travels: ``body`` (the model without its personal modules), ``model`` or ``nothing``."""

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        """Train for one round; return the tensors to send and the call's statistics."""
        raise NotImplementedError

    def load_personal(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> None:
        """Load the client's personalised model into ``job.model`` (without changing ``state``)."""
        job.load(job.initial, received, state.get("head") or {})

    def load_update(self, job: LocalJob, sent: Mapping[str, Tensor]) -> None:
        """After :meth:`train`: load the model the client's update comes from, whose local validation
        the reply reports (``val-loss``, ``val-acc``); by default the model as trained (shared + personal)."""

    def head(self, job: LocalJob, state: PersonalState) -> dict[str, Tensor]:
        """The client's personal head: stored, else the initial model's."""
        return state.get("head") or select(job.initial, job.personal)


def train_global(job: LocalJob, received: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], TrainStats]:
    """FedAvg's client step: ``local_epochs`` on the whole received model; returns it trained, and stats."""
    job.load(received)
    stats = job.fit(job.train["epochs"], 0, sends=True)
    return job.state(), stats


def get_method(name: str) -> PersonalMethod:
    """A new instance of the method registered as ``name``."""
    method = PERSONALIZATION.get(name)
    return method() if isinstance(method, type) else method


@PERSONALIZATION.register("none")
class NoPersonalization(PersonalMethod):
    """One global model; the client's "personalised" model is the global one."""

    shares = "model"

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        return train_global(job, received)

    def load_personal(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> None:
        job.load(received)


@PERSONALIZATION.register("fedper")
class FedPer(PersonalMethod):
    """FedPer (Arivazhagan et al., 2019): body and personal head trained together for ``local_epochs``;
    the body is averaged, the head stays."""

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        job.load(received, self.head(job, state))
        stats = job.fit(job.train["epochs"], 0, sends=True)
        trained = job.state()
        state.put("head", select(trained, job.personal))
        return select(trained, job.personal, keep=False), stats


@PERSONALIZATION.register("fedrep")
class FedRep(PersonalMethod):
    """FedRep (Collins et al., 2021): ``head_epochs`` on the head with the body frozen, then
    ``local_epochs`` on the body with the head frozen; the body is averaged."""

    def head_phase(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> TrainStats:
        job.load(received, self.head(job, state))
        epochs = int(job.settings.head_epochs)
        if epochs == 0:
            return job.fit(0, 0)
        return job.fit(epochs, 0, trainable=job.parameter_keys(job.personal))

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        first = self.head_phase(job, received, state)
        second = job.fit(job.train["epochs"], 1, trainable=job.parameter_keys(job.shared), sends=True)
        trained = job.state()
        state.put("head", select(trained, job.personal))
        return select(trained, job.personal, keep=False), combine_stats([first, second])


@PERSONALIZATION.register("fedeq")
class FeDEQ(FedRep):
    """FeDEQ (Le et al., 2024): the head phase of FedRep, then ``local_epochs`` on the shared part ``θ_i``
    with the augmented Lagrangian ``f_i(θ_i, h_i) + ⟨λ_i, θ_i − θ⟩ + ρ/2 ‖θ_i − θ‖²`` (head frozen), then the
    dual step ``λ_i ← λ_i + ρ (θ_i − θ)``; the client sends ``θ_i`` and keeps ``h_i`` and ``λ_i``."""

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        first = self.head_phase(job, received, state)
        rho = float(job.settings.rho)
        names = job.parameter_keys(job.shared)
        order = [n for n, _ in job.model.named_parameters() if n in names]
        anchor = {n: received[n].detach().to(torch.float64) for n in order}
        dual = state.get("dual") or {n: torch.zeros_like(received[n], dtype=torch.float64) for n in order}

        def lagrangian(params: Sequence[Tensor]) -> Tensor:
            total = params[0].new_zeros(())
            for name, p in zip(order, params, strict=True):
                gap = p - anchor[name].to(p)
                total = total + (dual[name].to(p) * gap).sum() + 0.5 * rho * gap.pow(2).sum()
            return total

        second = job.fit(job.train["epochs"], 1, trainable=frozenset(order), sends=True, penalty=lagrangian)
        trained = job.state()
        state.put("dual", admm_dual_step(dual, trained, anchor, rho))
        state.put("head", select(trained, job.personal))
        return select(trained, job.personal, keep=False), combine_stats([first, second])


def admm_dual_step(
    dual: Mapping[str, Tensor], trained: Mapping[str, Tensor], anchor: Mapping[str, Tensor], rho: float
) -> dict[str, Tensor]:
    """``λ_i + ρ (θ_i − θ)`` per parameter, in float64 (``θ`` the shared part the round started from)."""
    return {n: dual[n] + rho * (trained[n].to(torch.float64) - anchor[n]) for n in dual}


@PERSONALIZATION.register("ditto")
class Ditto(PersonalMethod):
    """Ditto (Li et al., 2021): the global model trained as in FedAvg and sent; a personal model ``v_i``
    trained for ``personal_epochs`` on ``f_i(v_i) + λ/2 ‖v_i − θ‖²`` with ``θ`` the received global model."""

    shares = "model"

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        sent, first = train_global(job, received)
        personal = state.get("model") or dict(received)
        job.load(personal)
        lam = float(job.settings.ditto_lambda)
        names = [n for n, _ in job.model.named_parameters()]
        anchor = [received[n].detach() for n in names]

        def proximal(params: Sequence[Tensor]) -> Tensor:
            return 0.5 * lam * sum((p - a.to(p)).pow(2).sum() for p, a in zip(params, anchor, strict=True))

        epochs = job.settings.personal_epochs or job.train["epochs"]
        second = job.fit(epochs, 1, penalty=proximal)
        state.put("model", job.state())
        return sent, combine_stats([first, second])

    def load_update(self, job: LocalJob, sent: Mapping[str, Tensor]) -> None:
        job.load(sent)  # the global model the client trained and sends, not its personal one

    def load_personal(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> None:
        job.load(state.get("model") or received)


@PERSONALIZATION.register("local")
class LocalOnly(PersonalMethod):
    """Local training only: each client trains its own model ``v_i`` (from the initial model); nothing is
    sent but the metrics."""

    shares = "nothing"

    def train(
        self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState
    ) -> tuple[dict[str, Tensor], TrainStats]:
        job.load(state.get("model") or job.initial)
        stats = job.fit(job.train["epochs"], 0)
        state.put("model", job.state())
        return {}, stats

    def load_personal(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> None:
        job.load(state.get("model") or job.initial)


@PERSONALIZATION.register("finetune")
class FineTune(NoPersonalization):
    """FedAvg's model, fine-tuned on each client for ``finetune_epochs`` before that client is evaluated
    (from the current global model every time; nothing is kept)."""

    def load_personal(self, job: LocalJob, received: Mapping[str, Tensor], state: PersonalState) -> None:
        job.load(received)
        job.fit(int(job.settings.finetune_epochs or job.train["epochs"]), 2)
