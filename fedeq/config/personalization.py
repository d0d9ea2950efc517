"""The ``personalization`` section: personalised federated learning (a shared part, personal parts kept on
each client). The methods are described in docs/personalization.md."""

from __future__ import annotations

from pydantic import Field

from fedeq.config.rules import Float, Int, Section, registered_name
from fedeq.registry import PERSONALIZATION

__all__ = ["PersonalizationConfig"]


class PersonalizationConfig(Section):
    """How clients personalise: which parts of the model stay on the device and how they are trained.

    Every method but ``none`` needs a per-client test split (``data.client_test_fraction``): each client's
    personalised model is evaluated on it every round (``personal_acc`` in rounds.csv)."""

    method: registered_name(PERSONALIZATION) = "none"  # type: ignore[valid-type]
    """``none`` (one global model) | ``fedeq`` (shared equilibrium layer, personal head, ADMM consensus) |
    ``fedper`` | ``fedrep`` (shared body, personal head) | ``ditto`` (personal model regularised towards the
    global one) | ``local`` (no communication) | ``finetune`` (the FedAvg model fine-tuned on each client) |
    a method a plugin registers (``fedeq.registry.PERSONALIZATION``)."""
    personal_modules: list[str] | None = None
    """Names of the modules (``model.named_modules()``) that stay on the client for ``fedeq``, ``fedper`` and
    ``fedrep`` (null: the model's last ``nn.Linear``, its classifier)."""
    head_epochs: Int = Field(3, ge=0)
    """fedeq, fedrep: epochs on the personal head (the shared part frozen) before the
    ``train.local_epochs`` epochs on the shared part."""
    rho: Float = Field(0.01, gt=0)
    """fedeq: ADMM penalty ``ρ`` of ``⟨λ_i, θ_i − θ⟩ + ρ/2 ‖θ_i − θ‖²``."""
    ditto_lambda: Float = Field(0.3, ge=0)
    """ditto: weight ``λ`` of ``λ/2 ‖v_i − θ‖²`` in the personal model's loss."""
    personal_epochs: Int | None = Field(None, ge=1)
    """ditto: epochs on the personal model per round (null: ``train.local_epochs``)."""
    finetune_epochs: Int | None = Field(None, ge=1)
    """finetune: epochs of local fine-tuning of the global model before each client's evaluation (null:
    ``train.local_epochs``)."""
