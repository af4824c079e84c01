"""The "seek" controller's equations against a float64 scalar reference, its signals, its errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from _seek_reference import SEEK, reference

from metalr.functional._controller import (
    CEILING,
    CONTROLLER_SIZE,
    RAMP,
    SEEK_DEFAULTS,
    initial_controller,
    resolve_seek,
    seek_update,
)
from metalr.functional._hypergrad import seek_adapt_rates


@pytest.mark.parametrize("far_decay", [0.0, 0.7])
def test_equations_match_a_float64_reference_over_many_steps(far_decay):
    seek = {**SEEK, "far_decay": far_decay}
    rng = random.Random(0)
    sizes = [100, 10, 1000]
    steps = 60
    # positive, agreeing signals for 15 steps, then they turn, then noise
    group = [0.5 - 0.04 * t + rng.gauss(0, 0.05) for t in range(steps)]
    signals = [[rng.uniform(-1, 1) * 0.5 + 0.5 * group[t] for _ in sizes] for t in range(steps)]
    beta = 0.05
    expected = reference([math.log(0.01)] * 3, signals, group, sizes, beta, seek)

    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in sizes]
    ctrls = [initial_controller(torch.zeros(s, dtype=torch.float64), torch.float64, seek)
             for s in sizes]  # fmt: skip
    for t in range(steps):
        sig = [torch.tensor(x, dtype=torch.float64) for x in signals[t]]
        rates, ctrls = seek_update(
            rates, ctrls, sig, torch.tensor(group[t], dtype=torch.float64), torch.tensor(True),
            sizes, hypergrad_lr=beta, seek=seek, granularity="tensor",
        )  # fmt: skip
        got = [math.log(float(r)) for r in rates]
        assert got == pytest.approx(expected[t], rel=1e-9, abs=1e-9), f"step {t + 1}"
    assert all(float(c[RAMP]) == 0 for c in ctrls), "the ramp ended"
    assert all(math.isfinite(float(c[CEILING])) for c in ctrls)


def test_ramp_accelerates_geometrically_then_saturates():
    seek = resolve_seek({"ramp_rate": 0.05, "ramp_growth": 1.3, "ramp_max": 0.4, "slow_zone": 1.0})
    rate = [torch.tensor(1.0, dtype=torch.float64)]
    ctrl = [initial_controller(torch.zeros(3), torch.float64, seek)]
    moves = []
    for _ in range(20):
        new, ctrl = seek_update(rate, ctrl, [torch.tensor(0.5)], torch.tensor(0.5),
                                torch.tensor(True), [3], hypergrad_lr=0.01, seek=seek,
                                granularity="tensor")  # fmt: skip
        moves.append(math.log(float(new[0]) / float(rate[0])))
        rate = new
    expected, step = [], seek["ramp_rate"]  # ρ_1 = ramp_rate, ρ_{t+1} = min(ρ_t·growth, max)
    for _ in range(20):
        expected.append(step)
        step = min(step * seek["ramp_growth"], seek["ramp_max"])
    assert moves == pytest.approx(expected, rel=1e-9)


def test_two_speed_ramp_slows_to_ramp_max_near_the_edge():
    """Far from the edge (F > slow_zone · P) the log-step grows to ramp_fast; once the fast
    average falls to slow_zone × its peak it is capped at ramp_max (and stays the ramp)."""
    seek = resolve_seek({"ramp_rate": 0.1, "ramp_growth": 2.0, "ramp_max": 0.1, "ramp_fast": 0.8,
                         "slow_zone": 0.6, "turn_decay": 0.0, "turn_threshold": 0.1})  # fmt: skip
    group = [0.8, 0.8, 0.8, 0.8, 0.8, 0.4, 0.4, 0.4]  # F = C (turn_decay 0); 0.4 ≤ 0.6 · 0.8
    rate = [torch.tensor(1e-6, dtype=torch.float64)]
    ctrl = [initial_controller(torch.zeros(3), torch.float64, seek)]
    moves = []
    for c in group:
        new, ctrl = seek_update(rate, ctrl, [torch.tensor(c)], torch.tensor(c), torch.tensor(True),
                                [3], hypergrad_lr=0.01, seek=seek, granularity="tensor")  # fmt: skip
        moves.append(math.log(float(new[0]) / float(rate[0])))
        rate = new
    # ρ: 0.1, 0.2, 0.4, 0.8, 0.8 (far: capped at ramp_fast), then the step after the first
    # near-edge signal is capped at ramp_max = 0.1
    assert moves == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.1, 0.1], rel=1e-9)
    assert float(ctrl[0][RAMP]) == pytest.approx(0.1)


def test_far_test_on_a_slower_average_keeps_a_noisy_ramp_fast():
    """Under minibatch noise (a group cosine of 0.5 ± 0.15, no turn) the fast average's running
    peak is a noise maximum, so F rarely stays within slow_zone of it and the ramp runs mostly
    at ramp_max; the slower average (far_decay 0.9) and its peak keep it at ramp_fast."""
    rng = random.Random(1)
    group = [0.5 + rng.gauss(0, 0.15) for _ in range(60)]

    def fast_steps(far_decay: float) -> int:
        seek = resolve_seek({"ramp_rate": 0.3, "ramp_growth": 1.0, "ramp_max": 0.1,
                             "ramp_fast": 0.3, "slow_zone": 0.9, "turn_decay": 0.1,
                             "turn_threshold": -1.0, "far_decay": far_decay})  # fmt: skip
        rate = [torch.tensor(1e-9, dtype=torch.float64)]
        ctrl = [initial_controller(torch.zeros(3), torch.float64, seek)]
        count = 0
        for c in group:
            new, ctrl = seek_update(rate, ctrl, [torch.tensor(c)], torch.tensor(c),
                                    torch.tensor(True), [3], hypergrad_lr=0.01, seek=seek,
                                    granularity="tensor")  # fmt: skip
            count += math.log(float(new[0]) / float(rate[0])) > 0.2
            rate = new
        return count

    assert fast_steps(0.0) < 25
    assert fast_steps(0.9) > 50


def test_turn_cuts_by_turn_cut_and_caps_at_headroom():
    # the re-opened ramp off: a strong signal after the turn would take the ceiling away
    seek = resolve_seek({"turn_cut": 0.1, "headroom": 3.0, "turn_threshold": 0.0, "turn_lag": 0.0,
                         "resume_window": 0.0})  # fmt: skip
    rate = [torch.tensor(1.0, dtype=torch.float64)]
    ctrl = [initial_controller(torch.zeros(3), torch.float64, seek)]
    step = {"hypergrad_lr": 1.0, "seek": seek, "granularity": "tensor"}
    rate, ctrl = seek_update(rate, ctrl, [torch.tensor(0.2)], torch.tensor(0.2),
                             torch.tensor(True), [3], **step)  # fmt: skip
    before = float(rate[0])
    rate, ctrl = seek_update(rate, ctrl, [torch.tensor(-1.0)], torch.tensor(-1.0),
                             torch.tensor(True), [3], **step)  # fmt: skip
    assert float(rate[0]) == pytest.approx(before * 0.1)
    assert float(ctrl[0][CEILING]) == pytest.approx(math.log(before * 0.1 * 3.0))
    for _ in range(50):  # a strong positive signal climbs, but not past the ceiling
        rate, ctrl = seek_update(rate, ctrl, [torch.tensor(1.0)], torch.tensor(1.0),
                                 torch.tensor(True), [3], **step)  # fmt: skip
    assert float(rate[0]) == pytest.approx(before * 0.3)


def test_inactive_step_changes_nothing():
    rate = [torch.tensor(0.5, dtype=torch.float64)]
    ctrl = [initial_controller(torch.zeros(3), torch.float64, SEEK)]
    new, new_ctrl = seek_update(rate, ctrl, [torch.tensor(0.9)], torch.tensor(0.9),
                                torch.tensor(False), [3], hypergrad_lr=0.1, seek=SEEK,
                                granularity="tensor")  # fmt: skip
    assert torch.equal(new[0], rate[0]) and torch.equal(new_ctrl[0], ctrl[0])


def _adapt(grads, dirs, granularity="tensor", rates=None):
    rates = rates or [torch.ones((), dtype=torch.float64) for _ in grads]
    if granularity == "element":
        rates = [torch.ones_like(g) for g in grads]
    ctrls = [initial_controller(g, torch.float64, SEEK) for g in grads]
    return seek_adapt_rates(rates, ctrls, grads, dirs, lr=0.1, hypergrad_lr=0.05,
                            granularity=granularity, lr_bounds=(0.0, math.inf), seek=SEEK)  # fmt: skip


def test_first_step_without_a_previous_direction_is_inactive():
    g = [torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    rates, finite, ctrls = _adapt(g, [torch.zeros(4, dtype=torch.float64),
                                      torch.zeros(3, dtype=torch.float64)])  # fmt: skip
    assert bool(finite)
    assert all(float(r) == 1.0 for r in rates)
    assert all(float(c[-2]) == 0 for c in ctrls)  # count stays 0


def test_non_finite_gradient_leaves_rates_and_controller():
    g = [torch.tensor([1.0, float("nan")], dtype=torch.float64)]
    d = [torch.ones(2, dtype=torch.float64)]
    rates, finite, ctrls = _adapt(g, d)
    assert not bool(finite)
    assert float(rates[0]) == 1.0
    assert torch.equal(ctrls[0], initial_controller(g[0], torch.float64, SEEK))


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_group_signal_is_the_cosine_over_the_whole_group(granularity, monkeypatch):
    torch.manual_seed(0)
    g = [torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    d = [torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    seen = {}
    import metalr.functional._hypergrad as H

    real = H.seek_update

    def spy(rates, ctrls, signals, group_signal, active, sizes, **kw):
        seen.update(signals=signals, group=group_signal, sizes=sizes)
        return real(rates, ctrls, signals, group_signal, active, sizes, **kw)

    monkeypatch.setattr(H, "seek_update", spy)
    _adapt(g, d, granularity)
    flat_g, flat_d = torch.cat([x.flatten() for x in g]), torch.cat([x.flatten() for x in d])
    cos = torch.dot(flat_g, flat_d) / (flat_g.norm() * flat_d.norm())
    assert float(seen["group"]) == pytest.approx(float(cos), rel=1e-12)
    assert seen["sizes"] == [5, 6]
    if granularity == "tensor":
        for s, a, b in zip(seen["signals"], g, d):
            assert float(s) == pytest.approx(float(torch.dot(a.flatten(), b.flatten())
                                                   / (a.norm() * b.norm())), rel=1e-12)  # fmt: skip
    elif granularity == "element":
        for s, a, b in zip(seen["signals"], g, d):
            assert torch.equal(s, torch.sign(a * b))
    else:
        assert all(float(s) == pytest.approx(float(cos)) for s in seen["signals"])


def test_element_rates_ramp_together_then_follow_their_signs():
    seek = resolve_seek({"turn_threshold": 0.0})
    g = [torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)]
    rates = [torch.ones(3, dtype=torch.float64)]
    ctrls = [initial_controller(g[0], torch.float64, seek)]
    kw = {"lr": 1.0, "hypergrad_lr": 0.1, "granularity": "element", "lr_bounds": (0.0, math.inf),
              "seek": seek}  # fmt: skip
    d_agree = [torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)]  # cos = 1
    rates, _, ctrls = seek_adapt_rates(rates, ctrls, g, d_agree, **kw)
    assert torch.allclose(
        rates[0], torch.full((3,), math.exp(seek["ramp_rate"]), dtype=torch.float64)
    )
    d_oppose = [-d_agree[0]]  # cos = -1: the turn rolls back turn_lag ramp steps and cuts
    before, ramp = rates[0].clone(), float(ctrls[0][RAMP])
    rates, _, ctrls = seek_adapt_rates(rates, ctrls, g, d_oppose, **kw)
    rollback = math.exp(-seek["turn_lag"] * ramp)
    assert torch.allclose(rates[0], before * seek["turn_cut"] * rollback)
    d_mixed = [torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)]  # signs +, -, +
    cut = rates[0].clone()
    rates, _, ctrls = seek_adapt_rates(rates, ctrls, g, d_mixed, **kw)
    expected = cut * torch.exp(0.1 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    expected = torch.minimum(expected, cut.amax() * seek["headroom"])
    assert torch.allclose(rates[0], expected)


@pytest.mark.parametrize(
    ("key", "value"),
    [("init_scale", 0.0), ("ramp_growth", 0.5), ("turn_decay", 1.0), ("turn_cut", 1.5),
     ("headroom", 0.5), ("tie", 0.9), ("evidence", -0.1), ("ramp_rate", float("nan"))],
)  # fmt: skip
def test_invalid_constants_name_the_key(key, value):
    with pytest.raises(ValueError, match=rf"Invalid seek\['{key}'\] value"):
        resolve_seek({key: value})


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="Invalid seek key: 'rampp'"):
        resolve_seek({"rampp": 1.0})


def test_defaults_are_valid_and_complete():
    assert resolve_seek(None) == SEEK_DEFAULTS
    assert initial_controller(torch.zeros(2), torch.float32, SEEK_DEFAULTS).shape == (
        CONTROLLER_SIZE,
    )
