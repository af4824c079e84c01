"""torch.compile: compiled steps equal eager steps and do not recompile as rates or lr change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import metalr

pytestmark = pytest.mark.compile

STEPS = 50


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.randn(64, 8), torch.randn(64, 1)


def _train(model, optimizer, step_fn, x, y, scheduler=None):
    for _ in range(STEPS):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        step_fn()
        if scheduler is not None:
            scheduler.step()


MAKERS = {
    "AdamHD-tensor": lambda p, **kw: metalr.AdamHD(p, lr=1e-2, **kw),
    "SGDHD-momentum-element": lambda p, **kw: metalr.SGDHD(
        p, lr=1e-2, momentum=0.9, granularity="element", **kw
    ),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_step_equals_eager_without_recompiling(name):
    make = MAKERS[name]
    model, x, y = _model_and_data()
    eager_model = copy.deepcopy(model)
    opt, eager_opt = make(model.parameters()), make(eager_model.parameters())
    torch._dynamo.reset()
    counters.clear()

    @torch.compile
    def compiled_step():
        opt.step()

    # Two eager-equivalent warm-up steps create the lazy state (SGD's first momentum step differs).
    _train(model, opt, compiled_step, x, y)
    _train(eager_model, eager_opt, eager_opt.step, x, y)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 2, f"{graphs} graphs for {STEPS} steps: the step recompiled"
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    eff, eager_eff = opt.effective_lrs(), eager_opt.effective_lrs()
    moved = False
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(eff[p], eager_eff[q], rtol=1e-4, atol=1e-7)
        moved |= bool((eff[p] != 1e-2).any())
    assert moved, "rates never changed, so 'no recompilation' was not exercised"


def test_fused_step_equals_eager_and_compiles_once_under_a_scheduler():
    model, x, y = _model_and_data()
    eager_model = copy.deepcopy(model)
    fused = metalr.AdamHD(model.parameters(), lr=1e-2, fused=True)
    eager = metalr.AdamHD(eager_model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(fused, STEPS)
    eager_sched = torch.optim.lr_scheduler.CosineAnnealingLR(eager, STEPS)
    torch._dynamo.reset()
    counters.clear()
    _train(model, fused, fused.step, x, y, sched)
    _train(eager_model, eager, eager.step, x, y, eager_sched)
    assert counters["stats"]["unique_graphs"] == 1
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    summary, eager_summary = fused.lr_summary()[0], eager.lr_summary()[0]
    assert summary["mean"] == pytest.approx(eager_summary["mean"], rel=1e-4)


def test_fused_rejects_what_it_cannot_compile():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    opt = metalr.AdamHD([p], fused=True)
    with pytest.raises(RuntimeError, match=r"fused=True\) requires real floating-point"):
        opt.step()
    with pytest.raises(RuntimeError, match="fused=True does not support differentiable"):
        q = torch.nn.Parameter(torch.zeros(2))
        q.grad = torch.ones_like(q)
        metalr.SGDHD([q], fused=True, differentiable=True).step()
