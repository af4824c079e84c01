"""The sync-free foreach path (used on accelerators and under torch.compile) checked on the CPU.

On the CPU in eager mode the foreach kernels read the all-finite flag on the host; on CUDA they
fold it in as ``keep``. Forcing the second path here keeps it covered without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
from metalr.functional import _common

MAKERS = {
    "AdamHD": lambda p, g: metalr.AdamHD(p, lr=1e-2, weight_decay=0.01, granularity=g),
    "AdamWHD": lambda p, g: metalr.AdamWHD(p, lr=1e-2, granularity=g),
    "SGDHD-momentum": lambda p, g: metalr.SGDHD(
        p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01, granularity=g
    ),
    "SGDHD-nesterov": lambda p, g: metalr.SGDHD(
        p, lr=1e-2, momentum=0.9, nesterov=True, granularity=g
    ),
    "SGDHD-plain": lambda p, g: metalr.SGDHD(p, lr=1e-2, granularity=g),
}


def _train(model, optimizer, nan_at=(3,), steps=12):
    torch.manual_seed(1)
    for i in range(steps):
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if i in nan_at:
            next(model.parameters()).grad[0, 0] = float("nan")
        optimizer.step()


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_sync_free_path_equals_single_tensor_path(name, granularity, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    model = model.double()
    ref_model = copy.deepcopy(model)
    opt = MAKERS[name](model.parameters(), granularity)
    ref = MAKERS[name](ref_model.parameters(), granularity)
    for group in ref.param_groups:
        group["foreach"] = False
    for group in opt.param_groups:
        group["foreach"] = True
    for module in ("metalr.functional.adam_rule", "metalr.functional.sgd_rule"):
        monkeypatch.setattr(f"{module}.host_readable", lambda t: False)
    assert _common.host_readable(torch.zeros(())) is True  # only the rules' view is patched
    _train(model, opt)
    _train(ref_model, ref)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_hyperlr_sync_free_path_keeps_everything_finite(granularity, monkeypatch):
    """Without a host read HyperLR cannot skip the wrapped step: it zeroes the bad entries."""
    monkeypatch.setattr("metalr.optim.hyper_lr.host_readable", lambda t: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = metalr.HyperLR(
        torch.optim.Adam(model.double().parameters(), lr=1e-2), granularity=granularity
    )
    before = None
    for i in range(12):
        torch.manual_seed(i)
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if i == 3:
            next(model.parameters()).grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if i == 3:
            for p, q in zip(model.parameters(), before):
                assert torch.equal(p, q), "a non-finite step moved the weights"
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.state[p]["lr_multiplier"]).all()
        assert all(torch.isfinite(v).all() for v in opt.optimizer.state[p].values())
