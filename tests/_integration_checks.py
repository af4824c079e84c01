"""Checks the trainer-integration tests share: the multipliers of a (wrapped) metalr optimizer,
and that its effective rates are ``lr × multiplier``."""

from __future__ import annotations

import torch

from metalr.integrations import unwrap_optimizer
from metalr.optim._base import RATE_KEY


def multipliers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    opt = unwrap_optimizer(opt)
    return [opt.state[p][RATE_KEY].clone() for g in opt.param_groups for p in g["params"]]


def assert_effective_is_lr_times_multiplier(opt: torch.optim.Optimizer) -> None:
    opt = unwrap_optimizer(opt)
    eff = opt.effective_lrs()
    for group in opt.param_groups:
        for p in group["params"]:
            expected = opt.state[p][RATE_KEY] * group["lr"]
            assert torch.equal(eff[p], expected)
