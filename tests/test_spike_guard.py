"""The loss-spike guard (``spike_guard=``, :mod:`metalr.functional.spike_guard`).

References: a hand-written float64 version of the running statistics and the z-test; a twin
optimizer without the guard whose state is cut by the pure :func:`spike_cut` before the same
update (the guard must be exactly that); bit-exact resume; and a behaviour test in which a
learning-rate shock mid-run is absorbed with a lower loss peak than without the guard.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import metalr
from metalr.functional._controller import CEILING, RAMP, SINCE
from metalr.functional.spike_guard import (
    SPIKE_GUARD_DEFAULTS,
    initial_spike_stats,
    resolve_spike_guard,
    spike_cut,
    spike_guard_update,
)
from metalr.optim._state_keys import CONTROLLER_KEY, RATE_KEY, SPIKE_KEY

OPTIMIZERS = {
    "adam_seek": lambda ps, **kw: metalr.AdamHD(ps, lr=0.02, **kw),
    "adamw_normalized": lambda ps, **kw: metalr.AdamWHD(ps, lr=0.02, rule="normalized", **kw),
    "adam_element": lambda ps, **kw: metalr.AdamHD(ps, lr=0.02, granularity="element", **kw),
    "adam_fused": lambda ps, **kw: metalr.AdamHD(ps, lr=0.02, fused=True, **kw),
    "adam_fused_lagged": lambda ps, **kw: metalr.AdamHD(ps, lr=0.02, fused=True, lagged=True, **kw),
    "sgd_seek": lambda ps, **kw: metalr.SGDHD(ps, lr=0.05, momentum=0.9, **kw),
    "sgd_additive": lambda ps, **kw: metalr.SGDHD(ps, lr=0.05, rule="additive", **kw),
    "hyperlr_sgd": lambda ps, **kw: metalr.HyperLR(torch.optim.SGD(ps, lr=0.05), **kw),
}
SPIKE_AT = 25  # after the default warm-up of 20 losses
SPIKE = 1e3  # added to the loss's value (not to its gradient) at that step


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :1] + x[:, 1:2])


def _closure(model, opt, step: int, spike_at: int | None = SPIKE_AT):
    def closure():
        opt.zero_grad()
        x, y = _batch(step)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss + SPIKE if step == spike_at else loss

    return closure


def _reference_stats(losses, lrs, sigmas: float, cut: float, decay: float, warmup: float):
    """Hand-written float64 running mean/variance, z-test and rolled-back factor (the module's
    equations)."""
    mean = var = last = calm = 0.0
    count = 0
    factors = []
    for loss, lr in zip(losses, lrs):
        if not math.isfinite(loss):
            factors.append(1.0)
            continue
        delta = loss - mean
        spike = count >= warmup and delta > sigmas * math.sqrt(var)
        factors.append(min(cut, calm / lr if calm > 0 else cut) if spike else 1.0)
        if count == 0:
            mean, var = loss, 0.0
        else:
            mean, var = mean + (1 - decay) * delta, decay * (var + (1 - decay) * delta * delta)
        if spike:
            mean, calm = loss, lr
        elif last > 0:
            calm = last
        last = lr
        count += 1
    return mean, var, count, last, calm, factors


def test_statistics_and_spikes_equal_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    losses = 2.0 * torch.exp(-torch.arange(60) / 20.0) + 0.05 * torch.rand(60, generator=g)
    losses = losses.tolist()
    losses[30] += 3.0  # a spike at a steady rate: halved
    losses[40] = float("nan")  # not finite: ignored
    losses[41] = float("inf")
    losses[50] += 5.0  # a spike after the scheduled rate jumped x40 at step 49: rolled back
    lrs = [0.01] * 49 + [0.4] * 11
    options = {"sigmas": 3.0, "cut": 0.5, "decay": 0.9, "warmup": 10.0}
    stats = initial_spike_stats("cpu", torch.float64)
    factors = []
    for loss, lr in zip(losses, lrs):
        stats, factor = spike_guard_update(
            stats, torch.tensor(loss, dtype=torch.float64), lr, options
        )
        factors.append(factor.item())
    mean, var, count, last, calm, ref = _reference_stats(losses, lrs, 3.0, 0.5, 0.9, 10.0)
    assert factors == pytest.approx(ref, rel=1e-12)
    assert factors[30] == 0.5 and factors[50] == pytest.approx(0.01 / 0.4)
    assert sum(f < 1 for f in factors) == 2
    assert stats.tolist() == pytest.approx([mean, var, count, 2.0, last, calm], rel=1e-12, abs=0)
    assert (last, calm) == (0.4, 0.4)  # step 51's calm loss followed an update at 0.4


def test_no_spike_during_warmup_or_on_a_falling_loss():
    options = resolve_spike_guard(True)
    stats = initial_spike_stats("cpu", torch.float64)
    for t in range(200):  # a noisy, steadily falling loss: never a spike
        loss = 1.0 / (1 + t) + 0.001 * math.sin(t)
        stats, factor = spike_guard_update(
            stats, torch.tensor(loss, dtype=torch.float64), 0.1, options
        )
        assert factor.item() == 1.0
    fresh = initial_spike_stats("cpu", torch.float64)
    for loss in (1.0, 1.0, 1.0, 1e6):  # a jump inside the warm-up does not count
        fresh, factor = spike_guard_update(
            fresh, torch.tensor(loss, dtype=torch.float64), 0.1, options
        )
        assert factor.item() == 1.0


def test_a_lasting_jump_costs_one_cut_and_an_escalation_more():
    options = resolve_spike_guard(True)
    g = torch.Generator().manual_seed(3)
    noise = (0.02 * torch.randn(120, generator=g, dtype=torch.float64)).tolist()
    level = [1.0] * 40 + [10.0] * 40 + [10.0 + 5 * k for k in range(40)]
    stats = initial_spike_stats("cpu", torch.float64)
    cuts = []
    for t, (base, eps) in enumerate(zip(level, noise)):
        stats, factor = spike_guard_update(stats, torch.tensor(base + eps), 1e-3, options)
        if factor.item() < 1:
            cuts.append(t)
    assert cuts[0] == 40 and all(t >= 80 for t in cuts[1:])  # the jump once; then the climb
    assert len(cuts) >= 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_spike_cuts_the_rates_before_the_update_and_nothing_else(name):
    """The guarded step at a spike equals an unguarded twin whose state was cut by the pure
    ``spike_cut`` before the same update; every other step equals the twin's untouched."""
    guarded_model, twin_model = _model(), _model()
    guarded = OPTIMIZERS[name](guarded_model.parameters(), spike_guard=True)
    twin = OPTIMIZERS[name](twin_model.parameters())
    for step in range(SPIKE_AT + 5):
        if step == SPIKE_AT:
            group = twin.param_groups[0]
            params = [p for p in group["params"] if RATE_KEY in twin.state[p]]
            rates = [twin.state[p][RATE_KEY] for p in params]
            ctrls = ([twin.state[p][CONTROLLER_KEY] for p in params]
                     if group["rule"] == "seek" else None)  # fmt: skip
            half = torch.tensor(SPIKE_GUARD_DEFAULTS["cut"], dtype=torch.float64)
            new_rates, new_ctrls = spike_cut(rates, ctrls, half, group["seek"])
            for r, n in zip(rates, new_rates):
                r.copy_(n)
            for c, n in zip(ctrls or [], new_ctrls or []):
                c.copy_(n)
            before = [r.clone() for r in rates]
        guarded.step(_closure(guarded_model, guarded, step))
        twin.step(_closure(twin_model, twin, step, spike_at=None))
        for p, q in zip(guarded_model.parameters(), twin_model.parameters()):
            assert torch.equal(p, q), step
            for key in (RATE_KEY, CONTROLLER_KEY):
                if key in twin.state[q]:
                    assert torch.equal(guarded.state[p][key], twin.state[q][key]), (step, key)
    assert guarded.spike_summary()[0]["spikes"] == 1
    assert guarded.spike_summary()[0]["losses"] == SPIKE_AT + 5
    assert all(torch.all(b > 0) for b in before)


def test_spike_cut_scales_the_rates_and_turns_a_ramp_for_good():
    seek = metalr.functional.SEEK_DEFAULTS
    rates = [torch.tensor(0.2, dtype=torch.float64), torch.tensor([0.1, 0.4], dtype=torch.float64)]
    ramping = torch.zeros(12, dtype=torch.float64)
    ramping[RAMP], ramping[CEILING] = 0.3, math.inf
    settled = torch.zeros(12, dtype=torch.float64)
    settled[RAMP], settled[CEILING], settled[SINCE] = 0.0, math.log(5.0), 3.0
    quarter = torch.tensor(0.25, dtype=torch.float64)
    new_rates, new_ctrls = spike_cut(rates, [ramping, settled], quarter, seek)
    assert new_rates[0].item() == pytest.approx(0.05)
    assert new_rates[1].tolist() == pytest.approx([0.025, 0.1])
    window = math.floor(seek["resume_window"]) + 1
    assert new_ctrls[0][RAMP] == 0  # the ramp ended
    assert new_ctrls[0][CEILING].item() == pytest.approx(math.log(0.05 * seek["headroom"]))
    assert new_ctrls[0][SINCE] == window  # past the re-opened ramp's window
    assert new_ctrls[1][CEILING].item() == pytest.approx(math.log(5.0))  # settled: kept
    assert new_ctrls[1][SINCE] == window
    one = torch.tensor(1.0, dtype=torch.float64)
    same_rates, same_ctrls = spike_cut(rates, [ramping, settled], one, seek)
    assert all(torch.equal(a, b) for a, b in zip(same_rates, rates))
    assert torch.equal(same_ctrls[0], ramping) and torch.equal(same_ctrls[1], settled)


@pytest.mark.parametrize("name", ["adam_seek", "sgd_seek", "hyperlr_sgd"])
def test_without_a_spike_the_guard_changes_nothing(name):
    guarded_model, plain_model = _model(), _model()
    guarded = OPTIMIZERS[name](guarded_model.parameters(), spike_guard={"sigmas": 50.0})
    plain = OPTIMIZERS[name](plain_model.parameters())
    for step in range(40):
        guarded.step(_closure(guarded_model, guarded, step, spike_at=None))
        plain.step(_closure(plain_model, plain, step, spike_at=None))
    for p, q in zip(guarded_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
    assert guarded.spike_summary()[0]["spikes"] == 0


def test_a_non_finite_loss_changes_nothing():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=0.02, spike_guard={"warmup": 2.0})
    for step in range(5):
        opt.step(_closure(model, opt, step, spike_at=None))
    stats = opt.state[next(model.parameters())][SPIKE_KEY].clone()
    rates = [opt.state[p][RATE_KEY].clone() for p in model.parameters()]

    def nan_closure():
        opt.zero_grad()
        return torch.tensor(float("nan"), dtype=torch.float64)  # no gradients: no step either

    opt.step(nan_closure)
    assert torch.equal(opt.state[next(model.parameters())][SPIKE_KEY], stats)
    assert all(torch.equal(opt.state[p][RATE_KEY], r) for p, r in zip(model.parameters(), rates))


def test_resume_is_bit_exact():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=0.02, spike_guard=True)
    for step in range(SPIKE_AT - 3):
        opt.step(_closure(model, opt, step))
    resumed_model = copy.deepcopy(model)
    resumed = metalr.AdamHD(resumed_model.parameters(), lr=0.02, spike_guard=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(SPIKE_AT - 3, SPIKE_AT + 5):
        opt.step(_closure(model, opt, step))
        resumed.step(_closure(resumed_model, resumed, step))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.spike_summary() == opt.spike_summary()
    assert opt.spike_summary()[0]["spikes"] == 1


def test_checkpoint_without_the_option_loads_with_the_guard_off():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=0.02)
    opt.step(_closure(model, opt, 0))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["spike_guard"]
    fresh = metalr.AdamHD(_model().parameters(), lr=0.02)
    fresh.load_state_dict(sd)
    fresh.step(_closure(model, fresh, 1))
    assert fresh.spike_summary() == []


def test_bad_input_is_refused_with_the_argument_named():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match=r"spike_guard\['cut'\] value: 0"):
        metalr.AdamHD(params, spike_guard={"cut": 0})
    with pytest.raises(ValueError, match=r"spike_guard\['decay'\] value: 1"):
        metalr.SGDHD(params, spike_guard={"decay": 1.0})
    with pytest.raises(ValueError, match=r"spike_guard\['sigmas'\]"):
        metalr.AdamHD(params, spike_guard={"sigmas": -1})
    with pytest.raises(ValueError, match=r"spike_guard\['warmup'\]"):
        metalr.AdamHD(params, spike_guard={"warmup": math.inf})
    with pytest.raises(ValueError, match="Invalid spike_guard key: 'threshold'"):
        metalr.HyperLR(torch.optim.SGD(params, lr=0.1), spike_guard={"threshold": 2})
    with pytest.raises(ValueError, match="Invalid spike_guard: 'yes'"):
        metalr.AdamHD(params, spike_guard="yes")
    opt = metalr.AdamHD(params, spike_guard=True)
    with pytest.raises(ValueError, match="closure result for spike_guard"):
        opt.step(lambda: torch.ones(3))
    assert opt.param_groups[0]["spike_guard"] == SPIKE_GUARD_DEFAULTS
    assert metalr.AdamHD(params).param_groups[0]["spike_guard"] is None
    assert metalr.AdamHD(params, spike_guard=False).param_groups[0]["spike_guard"] is None


def test_a_learning_rate_shock_is_rolled_back():
    """A scheduler that multiplies the rate by 300 for good at step 150 (a bad restart): the
    hypergradient alone barely moves the rate (a saturated network sends back little signal:
    6.1 -> 5.9 by the end, the loss peaks at ~8e3); the guard's first spike brings the effective
    rate back to the calm one (0.02), the loss peaks at ~10 and the run ends ~10x lower."""

    def run(guard: bool) -> tuple[list[float], list[float]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 1))  # fmt: skip
        opt = metalr.AdamHD(model.parameters(), lr=1e-3, spike_guard=guard or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 300.0 if t >= 150 else 1.0)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(8, 1, generator=g)
        losses, rates = [], []
        for _ in range(300):
            x = torch.randn(64, 8, generator=g)
            y = torch.tanh(x @ w) + 0.05 * torch.randn(64, 1, generator=g)

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
            rates.append(opt.lr_summary()[0]["mean"])
            sched.step()
        return losses, rates

    guarded, guarded_rates = run(True)
    plain, plain_rates = run(False)
    assert guarded[:151] == plain[:151]  # the same run until the first shocked loss
    calm = plain_rates[149]
    assert plain_rates[-1] > 100 * calm  # the hypergradient alone never undoes it
    assert all(r < 2 * calm for r in guarded_rates[151:160])  # rolled back at once
    assert max(guarded[150:]) < 0.01 * max(plain[150:])
    assert sum(guarded[-20:]) < 0.5 * sum(plain[-20:])


def test_statistics_saved_before_the_rolled_back_rate_load_padded():
    """Four-entry statistics (before the rolled-back rate) resume padded with zeros (no calm
    rate known, so a spike would halve the rates) until calm losses set it."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=0.02, spike_guard=True)
    for step in range(SPIKE_AT - 3):
        opt.step(_closure(model, opt, step))
    sd = opt.state_dict()
    sd["state"][0][SPIKE_KEY] = sd["state"][0][SPIKE_KEY][:4].clone()
    resumed_model = copy.deepcopy(model)
    resumed = metalr.AdamHD(resumed_model.parameters(), lr=0.02, spike_guard=True)
    resumed.load_state_dict(sd)
    for step in range(SPIKE_AT - 3, SPIKE_AT):
        resumed.step(_closure(resumed_model, resumed, step))
    stats = resumed.state[next(resumed_model.parameters())][SPIKE_KEY]
    assert stats.numel() == 6 and stats[5].item() == pytest.approx(0.02)  # calm since the resume
    assert resumed.spike_summary()[0]["spikes"] == 0


def test_observe_loss_equals_stepping_with_the_closure():
    """``observe_loss(loss)`` between ``backward()`` and ``step()`` is the closure path."""
    closure_model, observe_model = _model(), _model()
    by_closure = metalr.AdamHD(closure_model.parameters(), lr=0.02, spike_guard=True)
    by_observe = metalr.AdamHD(observe_model.parameters(), lr=0.02, spike_guard=True)
    for step in range(SPIKE_AT + 5):
        by_closure.step(_closure(closure_model, by_closure, step))
        loss = _closure(observe_model, by_observe, step)()
        by_observe.observe_loss(loss)
        by_observe.step()
    for p, q in zip(closure_model.parameters(), observe_model.parameters()):
        assert torch.equal(p, q)
    assert by_observe.spike_summary() == by_closure.spike_summary()
    assert by_observe.spike_summary()[0]["spikes"] == 1
    metalr.AdamHD(_model().parameters()).observe_loss(1.0)  # unguarded: nothing happens
