"""The seek rule through the pure steps is differentiable with respect to the initial weights
(meta-learning through the step): its running signal statistics start at 0, where a plain sqrt
has an infinite derivative, and the backward gave NaN at group and tensor granularity."""

from __future__ import annotations

import pytest
import torch

import metalr.functional as F


def _loss(
    log_rate: torch.Tensor, w0: torch.Tensor, optimizer: str, granularity: str
) -> torch.Tensor:
    w = [w0]
    rates = [
        log_rate.exp() * torch.ones(())
        if granularity != "element"
        else log_rate.exp() * torch.ones(3)
    ]
    controllers = [F.initial_controller(w0, torch.float64, F.SEEK_DEFAULTS)]
    common = {
        "lr": 0.1,
        "hypergrad_lr": 0.02,
        "rule": "seek",
        "granularity": granularity,
        "lr_bounds": (0.0, 1e3),
        "controllers": controllers,
        "seek": F.SEEK_DEFAULTS,
    }
    if optimizer == "adam":
        m, v, steps = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())]
        for _ in range(3):
            (w, m, v, rates, steps), common["controllers"] = F.adam_hd_step(
                w, [2 * w[0] + w[0] ** 3], m, v, rates, steps, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled_weight_decay=False, **common,
            )  # fmt: skip
    else:
        buffers, directions = [None], [None]
        for _ in range(3):
            (w, buffers, directions, rates), common["controllers"] = F.sgd_hd_step(
                w, [2 * w[0] + w[0] ** 3], buffers, directions, rates, momentum=0.9, dampening=0.0,
                weight_decay=0.0, nesterov=False, **common,
            )  # fmt: skip
    return (w[0] ** 2).sum()


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_seek_steps_match_central_finite_differences(optimizer, granularity):
    torch.set_default_dtype(torch.float64)
    try:
        w0 = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
        log_rate = torch.tensor(0.0, requires_grad=True)
        grads = torch.autograd.grad(_loss(log_rate, w0, optimizer, granularity), (log_rate, w0))
        assert all(torch.isfinite(g).all() for g in grads)
        eps = 1e-6
        with torch.no_grad():
            fd_rate = (_loss(log_rate + eps, w0, optimizer, granularity)
                       - _loss(log_rate - eps, w0, optimizer, granularity)) / (2 * eps)  # fmt: skip
            fd_w = torch.stack([
                (_loss(log_rate, w0 + eps * e, optimizer, granularity)
                 - _loss(log_rate, w0 - eps * e, optimizer, granularity)) / (2 * eps)
                for e in torch.eye(3)
            ])  # fmt: skip
        torch.testing.assert_close(grads[0], fd_rate, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[1], fd_w, rtol=1e-5, atol=1e-7)
    finally:
        torch.set_default_dtype(torch.float32)
