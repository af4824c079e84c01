"""Checks the trainer-integration tests share: the multipliers of a (wrapped) metalr optimizer,
that its effective rates are ``lr × multiplier``, and (the validation callbacks' tests) copies of
its per-parameter state, its validation observation counts and loss statistics."""

from __future__ import annotations

import torch

from metalr.integrations import unwrap_optimizer
from metalr.optim._base import RATE_KEY, VALIDATION_KEY


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


def state_copies(opt, key: str) -> list[torch.Tensor]:
    opt = unwrap_optimizer(opt)
    return [opt.state[p][key].clone() for g in opt.param_groups for p in g["params"]]


def observation_counts(opt) -> set[int]:
    """The observation counts of the parameters that have validation statistics."""
    opt = unwrap_optimizer(opt)
    return {int(s[VALIDATION_KEY][2]) for s in opt.state.values() if VALIDATION_KEY in s}


def loss_statistics(opt) -> set[tuple[float, float]]:
    """Per tensor: (losses counted, the loss's running average) of the validation statistics."""
    from metalr.functional._validation_state import LOSS_AVG, LOSS_COUNT

    return {(float(v[LOSS_COUNT]), float(v[LOSS_AVG])) for v in state_copies(opt, VALIDATION_KEY)}
