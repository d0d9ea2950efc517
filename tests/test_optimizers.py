"""make_optimizer: the torch.optim optimizer train.optimizer names, with the configured lr and decay."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from fedeq.config import Optimizer
from fedeq.train import OPTIMIZERS, make_optimizer


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(3, 2).parameters())


def test_names_match_the_config_schema() -> None:
    assert OPTIMIZERS == get_args(Optimizer)


@pytest.mark.parametrize(
    ("name", "kind", "momentum"), [("adam", torch.optim.Adam, None), ("sgd", torch.optim.SGD, 0.9)]
)
def test_builds_the_torch_optimizer_with_the_settings(name, kind, momentum) -> None:
    params = _params()
    opt = make_optimizer(name, params, lr=0.05, weight_decay=1e-3)
    assert type(opt) is kind
    (group,) = opt.param_groups
    assert group["lr"] == 0.05 and group["weight_decay"] == 1e-3
    assert all(a is b for a, b in zip(group["params"], params, strict=True))
    if momentum is not None:
        assert group["momentum"] == momentum
    assert make_optimizer(name, _params(), lr=0.1).param_groups[0]["weight_decay"] == 0.0


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"^train.optimizer must be one of adam, sgd \(got 'rmsprop'\)$"):
        make_optimizer("rmsprop", _params(), lr=0.1)
