"""The spike guard and skipped steps: a step whose gradients are not all finite leaves the
guard's statistics and the rates as they were, whether the loss came from the closure or from
``observe_loss`` (a ``GradScaler`` loop, whose skipped steps never call ``step()``)."""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
from metalr.optim._state_keys import RATE_KEY, SPIKE_KEY

MAKERS = {
    "adamhd": lambda p: metalr.AdamHD(p, lr=0.01, spike_guard=True),
    "sgdhd": lambda p: metalr.SGDHD(p, lr=0.01, momentum=0.9, spike_guard=True),
    "hyperlr": lambda p: metalr.HyperLR(torch.optim.Adam(p, lr=0.01), spike_guard=True),
}


def _warmed(make):
    """An optimizer whose guard has seen 30 calm losses (its warm-up is 20)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = make([w])
    for i in range(30):

        def closure(i=i):
            opt.zero_grad()
            loss = (w**2).sum() * 1e-3 + 1.0 + 0.01 * (i % 3)
            loss.backward()
            return loss

        opt.step(closure)
    return w, opt


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_spiking_loss_with_an_inf_gradient_changes_nothing(name):
    w, opt = _warmed(MAKERS[name])
    before = copy.deepcopy(opt.state_dict())
    weights = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w**2).sum() * 1e-3 + 100.0  # a spike: the guard would cut the rates
        loss.backward()
        w.grad[0] = float("inf")
        return loss

    opt.step(closure)
    assert torch.equal(w.detach(), weights)
    after = opt.state_dict()
    assert {RATE_KEY, SPIKE_KEY} <= before["state"][0].keys()
    for key, value in before["state"][0].items():  # rates, guard, controller, moments, step
        if key == "wrapped":  # HyperLR: the wrapped optimizer's moments and step
            for inner, inner_value in value.items():
                assert torch.equal(after["state"][0][key][inner], inner_value), inner
            continue
        if isinstance(value, torch.Tensor):
            assert torch.equal(after["state"][0][key], value), key
        else:  # the flag that the group follows the validation signal
            assert after["state"][0][key] == value, key
    assert opt.spike_summary()[0]["spikes"] == 0

    def finite_closure():  # the same spike with finite gradients is cut (the guard is on)
        opt.zero_grad()
        loss = (w**2).sum() * 1e-3 + 100.0
        loss.backward()
        return loss

    opt.step(finite_closure)
    assert opt.spike_summary()[0]["spikes"] == 1


@pytest.mark.parametrize("name", list(MAKERS))
def test_observe_loss_before_a_step_the_scaler_skips_is_not_counted(name):
    """``observe_loss`` then no ``step()`` (GradScaler found inf): that loss never enters the
    statistics; the next observed loss and its step do, as in a run without the skipped one."""
    w, opt = _warmed(MAKERS[name])
    w2, ref = _warmed(MAKERS[name])
    opt.zero_grad()
    ((w**2).sum() * 1e-3 + 100.0).backward()
    opt.observe_loss(torch.tensor(100.0))  # a spike the scaler then skips: no step()
    for o, p in ((opt, w), (ref, w2)):
        o.zero_grad()
        loss = (p**2).sum() * 1e-3 + 1.0
        loss.backward()
        o.observe_loss(loss)
        o.step()
    assert opt.spike_summary() == ref.spike_summary()
    assert opt.spike_summary()[0]["losses"] == 31 and opt.spike_summary()[0]["spikes"] == 0
    torch.testing.assert_close(w, w2, rtol=0, atol=0)


def test_the_validation_hold_does_not_take_a_spike_cut_back():
    """The seek rule's validation hold brings a settled rate back up to its level at the last
    observation while the validation loss improves; a spike's cut lowers that level too, so the
    next observation keeps the cut (it restored 0.0052 to 0.0080 before)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
    ).double()
    gen = torch.Generator().manual_seed(1)
    x, y, xv, yv = (torch.randn(64, n, generator=gen, dtype=torch.float64) for n in (6, 2, 6, 2))
    opt = metalr.AdamHD(model.parameters(), lr=1e-2, lr_bounds=(5e-3, 2e-2),
                        spike_guard={"warmup": 3, "sigmas": 4.0})  # fmt: skip
    w = model[0].weight
    for t in range(24):

        def closure(t=t):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss * (100.0 if t == 21 else 1.0)

        before = float(opt.state[w]["lr_multiplier"]) if t else None
        opt.step(closure)
        if t == 21:
            cut = float(opt.state[w]["lr_multiplier"])
            assert cut < 0.7 * before  # the spike cut it (to the lower bound here)
        if t % 2 == 1:
            opt.observe_validation(((model(xv) - yv) ** 2).mean())
        if t == 21:
            assert float(opt.state[w]["lr_multiplier"]) <= cut * (1 + 1e-12)
    assert opt.spike_summary()[0]["spikes"] == 1
