"""The "seek" controller's equations against a float64 scalar reference, its signals, its errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from metalr.functional._controller import (
    CEILING,
    CONTROLLER_SIZE,
    GRAD,
    GRAD_PEAK,
    RAMP,
    SEEK_DEFAULTS,
    initial_controller,
    resolve_seek,
    seek_update,
    seek_update_stacked,
)
from metalr.functional._hypergrad import seek_adapt_rates

SEEK = resolve_seek(
    {
        "turn_threshold": 0.3,
        "evidence": 0.1,
        "headroom": 2.0,
        "tie": 4.0,
        "turn_lag": 2.0,
        "ramp_rate": 0.05,
        "ramp_growth": 1.5,
        "ramp_max": 0.1,
        "ramp_fast": 0.4,
        "slow_zone": 0.8,
    }
)


def reference(log_rates, signals, group_signals, sizes, beta, seek, grad_norms=None):
    """The module docstring's equations, one scalar at a time, in Python floats
    (``grad_norms``: the group's gradient norm per step, for the vanished-gradient gate)."""
    n = len(log_rates)
    ramp, fast, peak, since = seek["ramp_rate"], 0.0, 0.0, 0
    grad_avg, grad_peak = 0.0, 0.0  # the vanished-gradient gate's average and its peak
    slow, slow_peak = 0.0, 0.0  # the far test's own average (far_decay > 0) and its peak
    mean, sq, ceiling = [0.0] * n, [0.0] * n, [math.inf] * n
    logs = list(log_rates)
    out = []
    for t, (sig, C) in enumerate(zip(signals, group_signals), start=1):
        fast = seek["turn_decay"] * fast + (1 - seek["turn_decay"]) * C
        slow = seek["far_decay"] * slow + (1 - seek["far_decay"]) * C
        ramping = ramp > 0
        if ramping:
            peak = max(peak, fast)
            slow_peak = max(slow_peak, slow)
        turn = ramping and fast <= seek["turn_threshold"] * peak
        # the re-opened ramp: within resume_window steps of the first turn, back above the level
        resume = (
            not ramping and 0 < since <= seek["resume_window"]
            and fast >= seek["resume_level"] * peak
        )  # fmt: skip
        since = since + 1 if since > 0 or turn else since
        if resume:
            ceiling = [math.inf] * n
        vanished, hold = False, 0.0
        if grad_norms is not None and (seek["vanish"] > 0 or seek["noise_hold"] > 0):
            grad_avg = (
                seek["vanish_decay"] * grad_avg + (1 - seek["vanish_decay"]) * grad_norms[t - 1]
            )
            grad_peak = max(grad_peak, grad_avg)
            level = grad_avg / grad_peak if grad_peak > 0 else 1.0
            vanished = level < seek["vanish"]
            hold = seek["noise_hold"] * seek["evidence"] * level  # evidence handed back
        new = []
        for i in range(n):
            b1, b2 = seek["signal_decay"], seek["signal_sq_decay"]
            mean[i] = b1 * mean[i] + (1 - b1) * sig[i]
            sq[i] = b2 * sq[i] + (1 - b2) * sig[i] ** 2
            m_hat, v_hat = mean[i] / (1 - b1**t), sq[i] / (1 - b2**t)
            if ramping and not turn:
                x = logs[i] + ramp
            elif turn:
                x = logs[i] + math.log(seek["turn_cut"]) - seek["turn_lag"] * ramp
                ceiling[i] = x + math.log(seek["headroom"])
            else:
                track = m_hat / (math.sqrt(v_hat) + 1e-8) - seek["evidence"]
                if track < 0:  # the hold slows a fall; it never turns one into a climb
                    track = min(track + hold, 0.0)
                if vanished:
                    track = min(track, 0.0) - seek["vanish_fall"] * seek["evidence"]
                x = logs[i] + beta * track
            new.append(min(x, ceiling[i]))
        centre = sum(w * x for w, x in zip(sizes, new)) / sum(sizes)
        width = math.log(seek["tie"])
        logs = [min(max(x, centre - width), centre + width) for x in new]
        # the two-speed ramp: up to ramp_fast while far from the edge, ramp_max near it
        if seek["far_decay"] > 0:  # the test on the slower average S and its peak Q
            far = slow > seek["slow_zone"] * slow_peak
        else:
            far = fast > seek["slow_zone"] * peak
        cap = max(seek["ramp_fast"], seek["ramp_max"]) if far else seek["ramp_max"]
        ramp = min(ramp * seek["ramp_growth"], cap) if ramping and not turn else 0.0
        ramp = seek["ramp_rate"] if resume else ramp
        out.append(list(logs))
    return out


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


@pytest.mark.parametrize("per_tensor_beta", [False, True])
@pytest.mark.parametrize("track", [1.0, 0.0])
def test_vector_path_for_scalar_rates_equals_the_per_rate_path(per_tensor_beta, track, monkeypatch):
    """0-d rates are moved as one stacked vector; bit for bit what the per-rate loop computes."""
    import metalr.functional._rate_moves as moves

    gen = torch.Generator().manual_seed(3)
    n, seek = 5, {**SEEK, "track": track}
    sizes = [3, 40, 7, 100, 1]
    beta = [torch.tensor(0.01 * (i + 1), dtype=torch.float64) for i in range(n)]

    def run(vector: bool):
        monkeypatch.setattr(moves, "_scalar_rates", lambda rates, g: vector)
        rates = [torch.tensor(0.5 + 0.1 * i, dtype=torch.float64) for i in range(n)]
        ctrls = [initial_controller(r, torch.float64, seek) for r in rates]
        out = []
        for t in range(12):  # ramp, turn, then track
            sig = [torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(n)]
            group = torch.tensor(0.9 if t < 4 else -0.2, dtype=torch.float64)
            rates, ctrls = seek_update(
                rates, ctrls, sig, group, torch.tensor(True), sizes,
                hypergrad_lr=beta if per_tensor_beta else 0.05, seek=seek, granularity="tensor",
            )  # fmt: skip
            out.append(torch.stack(rates))
        return torch.stack(out), torch.stack(ctrls)

    gen.manual_seed(3)
    vec = run(True)
    gen.manual_seed(3)
    loop = run(False)
    assert torch.equal(vec[0], loop[0]) and torch.equal(vec[1], loop[1])
    assert not torch.equal(vec[0][0], vec[0][-1])  # the rates did move


@pytest.mark.parametrize("granularity", ["tensor", "group"])
@pytest.mark.parametrize("per_tensor_beta", [False, True])
def test_stacked_update_equals_the_list_update(granularity, per_tensor_beta):
    """seek_update_stacked (a fused step's bookkeeping) is seek_update on stacked vectors: bit for
    bit the same rates and controllers through the ramp, the turn and tracking, and a skip."""
    gen = torch.Generator().manual_seed(5)
    n, sizes = 4, [30, 2, 500, 9]
    betas = [torch.tensor(0.02 * (i + 1), dtype=torch.float64) for i in range(n)]
    beta_list = betas if per_tensor_beta else 0.05
    beta_vec = torch.stack(betas) if per_tensor_beta else 0.05
    rates = [torch.tensor(0.3 + 0.2 * i, dtype=torch.float64) for i in range(n)]
    ctrls = [initial_controller(r, torch.float64, SEEK) for r in rates]
    rate_vec, ctrl_mat = torch.stack(rates), torch.stack(ctrls)
    for t in range(14):
        sig = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
        group = torch.tensor(0.8 if t < 5 else -0.3, dtype=torch.float64)
        active = torch.tensor(t != 7)  # one skipped step
        signals = [group] * n if granularity == "group" else list(sig.unbind(0))
        rates, ctrls = seek_update(
            rates, ctrls, signals, group, active, sizes, hypergrad_lr=beta_list, seek=SEEK,
            granularity=granularity,
        )  # fmt: skip
        prev_rates, prev_ctrl = rate_vec, ctrl_mat
        rate_vec, ctrl_mat = seek_update_stacked(
            rate_vec, ctrl_mat, group.expand(n) if granularity == "group" else sig, group, active,
            sizes, hypergrad_lr=beta_vec, seek=SEEK, granularity=granularity,
        )  # fmt: skip
        if per_tensor_beta:  # one β per rate given as a list: stacked inside, the same values
            from_list, _ = seek_update_stacked(
                prev_rates, prev_ctrl, group.expand(n) if granularity == "group" else sig, group,
                active, sizes, hypergrad_lr=betas, seek=SEEK, granularity=granularity,
            )  # fmt: skip
            assert torch.equal(from_list, rate_vec)
        assert torch.equal(rate_vec, torch.stack(rates)), f"rates, step {t + 1}"
        assert torch.equal(ctrl_mat, torch.stack(ctrls)), f"controllers, step {t + 1}"
    assert float(ctrl_mat[0, RAMP]) == 0 and math.isfinite(float(ctrl_mat[0, CEILING]))


def test_stacked_update_refuses_element_granularity():
    with pytest.raises(ValueError, match="element"):
        seek_update_stacked(
            torch.ones(2), torch.zeros(2, CONTROLLER_SIZE), torch.zeros(2), torch.tensor(0.0),
            torch.tensor(True), [1, 1], hypergrad_lr=0.1, seek=SEEK, granularity="element",
        )  # fmt: skip


def test_reopened_ramp_matches_the_reference_and_ramps_again():
    """A turn whose signal recovers within resume_window steps re-opens the ramp (no ceiling)
    until the next turn; later recoveries do nothing. Against the float64 reference."""
    seek = resolve_seek({**SEEK, "resume_window": 12, "resume_level": 0.6, "turn_decay": 0.0})
    sizes, steps, beta = [10, 50], 50, 0.05
    # agree, dip (a turn at step 6), recover (re-opened), dip again (a second turn), recover late
    group = [0.8] * 5 + [0.1] * 2 + [0.7] * 6 + [0.0] * 3 + [0.3] * 14 + [0.8] * 20
    signals = [[0.5 * c, -0.2 + c] for c in group]
    expected = reference([math.log(0.01)] * 2, signals, group, sizes, beta, seek)
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in sizes]
    ctrls = [initial_controller(torch.zeros(s), torch.float64, seek) for s in sizes]
    ramps = []
    for t in range(steps):
        rates, ctrls = seek_update(
            rates, ctrls, [torch.tensor(x, dtype=torch.float64) for x in signals[t]],
            torch.tensor(group[t], dtype=torch.float64), torch.tensor(True), sizes,
            hypergrad_lr=beta, seek=seek, granularity="tensor",
        )  # fmt: skip
        assert [math.log(float(r)) for r in rates] == pytest.approx(expected[t], rel=1e-9, abs=1e-9)
        ramps.append(float(ctrls[0][RAMP]))
    assert ramps[5] == 0 and ramps[7] > 0, "turned at step 6, re-opened at step 8"
    assert ramps[-1] == 0 and math.isfinite(float(ctrls[0][CEILING])), "settled for good"
    assert sum(1 for a, b in itertools.pairwise(ramps) if a == 0 and b > 0) == 1, "one re-opening"


@pytest.mark.parametrize(("noise_hold", "fall"), [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)])
@pytest.mark.parametrize("stacked", [False, True])
def test_vanished_gradient_gate_matches_the_reference_and_stops_the_climb(
    stacked, noise_hold, fall
):
    """With ``vanish`` > 0, once the running average of the group's gradient norm falls below
    ``vanish`` × its peak, settled rates may fall but not climb, however consistent the signal
    (an interpolated training loss); ``noise_hold`` hands the evidence back in proportion to
    the average over its peak. Against the float64 reference, list and stacked forms."""
    seek = resolve_seek(
        {**SEEK, "vanish": 0.05, "vanish_decay": 0.8, "headroom": 1e6, "noise_hold": noise_hold,
         "vanish_fall": fall}
    )  # fmt: skip
    sizes, steps, beta = [10, 50], 80, 0.05
    # a ramp that turns, then a consistent positive signal (the rate would climb) while the
    # gradient norm decays a thousandfold
    group = [0.8] * 6 + [0.0] * 4 + [0.6] * (steps - 10)
    signals = [[0.9 * c, c] for c in group]
    norms = [1.0 if t < 10 else 0.9 ** (t - 10) for t in range(steps)]
    expected = reference([math.log(0.01)] * 2, signals, group, sizes, beta, seek, norms)
    free = reference([math.log(0.01)] * 2, signals, group, sizes, beta, {**seek, "vanish": 0.0})
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in sizes]
    ctrls = [initial_controller(torch.zeros(s), torch.float64, seek) for s in sizes]
    for t in range(steps):
        sig = [torch.tensor(x, dtype=torch.float64) for x in signals[t]]
        args = (torch.tensor(group[t], dtype=torch.float64), torch.tensor(True), sizes)
        norm = torch.tensor(norms[t], dtype=torch.float64)
        if stacked:
            vec, mat = seek_update_stacked(
                torch.stack(rates), torch.stack(ctrls), torch.stack(sig), *args,
                hypergrad_lr=beta, seek=seek, granularity="tensor", grad_norm=norm,
            )  # fmt: skip
            rates, ctrls = list(vec.unbind(0)), list(mat.unbind(0))
        else:
            rates, ctrls = seek_update(
                rates, ctrls, sig, *args, hypergrad_lr=beta, seek=seek, granularity="tensor",
                grad_norm=norm,
            )  # fmt: skip
        assert [math.log(float(r)) for r in rates] == pytest.approx(expected[t], rel=1e-9, abs=1e-9)
    gated = [row[0] for row in expected]
    averages = _running(norms, 0.8)
    closed = next(t for t, a in enumerate(averages) if a < 0.05 * max(averages[: t + 1]))
    assert 30 < closed < steps - 20
    moves = [b - a for a, b in itertools.pairwise(gated[closed:])]
    assert all(m <= 1e-12 for m in moves), "no climb once closed"
    if fall:  # the collapsed gradient anneals at least at fall · β · evidence a step
        assert all(m <= -fall * beta * seek["evidence"] + 1e-12 for m in moves)
    assert free[-1][0] > gated[-1] + 1.0, "without the gate the rate climbs on"
    assert float(ctrls[0][GRAD_PEAK]) == pytest.approx(max(averages), rel=1e-12)
    assert float(ctrls[0][GRAD]) == pytest.approx(averages[-1], rel=1e-9)


def _running(values, decay):
    avg, out = 0.0, []
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def test_vanished_gradient_gate_off_leaves_its_entries_and_the_rates():
    """``vanish`` 0 (the default) or no gradient norm: the gate's entries stay 0 and the rates
    are those of the rule without it."""
    seek = resolve_seek({**SEEK, "vanish": 0.0})
    rates = [torch.full((), 0.01, dtype=torch.float64) for _ in range(2)]
    ctrls = [initial_controller(torch.zeros(3), torch.float64, seek) for _ in range(2)]
    common = {"hypergrad_lr": 0.05, "seek": seek, "granularity": "tensor"}
    sig = [torch.tensor(0.5, dtype=torch.float64)] * 2
    args = (torch.tensor(0.5, dtype=torch.float64), torch.tensor(True), [3, 3])
    a_rates, a_ctrls = seek_update(rates, ctrls, sig, *args, **common, grad_norm=torch.tensor(2.0))
    b_rates, b_ctrls = seek_update(rates, ctrls, sig, *args, **common)
    for a, b in zip(a_rates + a_ctrls, b_rates + b_ctrls):
        assert torch.equal(a, b)
    assert float(a_ctrls[0][GRAD]) == 0 and float(a_ctrls[0][GRAD_PEAK]) == 0


def test_noise_hold_keeps_a_noisy_rate_while_the_gradient_is_at_its_peak():
    """A signal that is pure noise (SNR 0) anneals the settled rate by β·evidence a step; with
    ``noise_hold`` 1 and the gradient norm at its peak the evidence is handed back: the rate
    holds; as the norm falls to half its peak, half the evidence comes back. Float64 reference."""
    seek = resolve_seek({**SEEK, "noise_hold": 1.0, "vanish_decay": 0.0, "resume_window": 0})
    sizes, beta = [10], 0.05
    group = [0.8] * 6 + [0.0] * 4 + [0.0] * 40
    signals = [[0.0] for _ in group]  # SNR 0 once settled
    for norms, expected_move in (([1.0] * 50, 0.0), ([1.0] * 10 + [0.5] * 40, -0.5)):
        expected = reference([math.log(0.01)], signals, group, sizes, beta, seek, norms)
        rates = [torch.full((), 0.01, dtype=torch.float64)]
        ctrls = [initial_controller(torch.zeros(10), torch.float64, seek)]
        logs = []
        for t, (sig, c, norm) in enumerate(zip(signals, group, norms)):
            rates, ctrls = seek_update(
                rates, ctrls, [torch.tensor(sig[0], dtype=torch.float64)],
                torch.tensor(c, dtype=torch.float64), torch.tensor(True), sizes,
                hypergrad_lr=beta, seek=seek, granularity="tensor",
                grad_norm=torch.tensor(norm, dtype=torch.float64),
            )  # fmt: skip
            logs.append(math.log(float(rates[0])))
            assert logs[-1] == pytest.approx(expected[t][0], rel=1e-9, abs=1e-9)
        moves = [b - a for a, b in itertools.pairwise(logs[20:])]
        assert moves == pytest.approx([expected_move * beta * seek["evidence"]] * len(moves))


@pytest.mark.parametrize("snr_signal", [0.02, 0.6])
def test_noise_hold_slows_a_fall_but_never_adds_a_climb(snr_signal):
    """The hold is capped: a noisy signal whose tracking step is below 0 (SNR ≈ 0.04 < evidence)
    falls more slowly with ``noise_hold`` 0.5 and stands still with 5 (never climbs), and a
    consistent one (SNR ≈ 0.77 > evidence: the rate climbs) climbs exactly as without the hold.
    Every path against the float64 reference."""
    base = {**SEEK, "vanish_decay": 0.0, "resume_window": 0, "headroom": 1e6}
    group = [0.8] * 6 + [0.0] * 4 + [0.0] * 40
    # a small offset under alternating noise: SNR ≈ offset / √(offset² + 0.25)
    signals = [[snr_signal + (0.5 if t % 2 else -0.5)] for t in range(len(group))]
    paths = {}
    for hold in (0.0, 0.5, 5.0):
        seek = resolve_seek({**base, "noise_hold": hold})
        rates = [torch.full((), 0.01, dtype=torch.float64)]
        ctrls = [initial_controller(torch.zeros(10), torch.float64, seek)]
        logs = []
        for sig, c in zip(signals, group):
            rates, ctrls = seek_update(
                rates, ctrls, [torch.tensor(sig[0], dtype=torch.float64)],
                torch.tensor(c, dtype=torch.float64), torch.tensor(True), [10],
                hypergrad_lr=0.05, seek=seek, granularity="tensor",
                grad_norm=torch.tensor(1.0, dtype=torch.float64),
            )  # fmt: skip
            logs.append(math.log(float(rates[0])))
        paths[hold] = logs
        expected = reference([math.log(0.01)], signals, group, [10], 0.05, seek, [1.0] * 50)
        assert logs == pytest.approx([row[0] for row in expected], rel=1e-9, abs=1e-9)
    free, held, strong = (
        [b - a for a, b in itertools.pairwise(paths[h][20:])] for h in (0.0, 0.5, 5.0)
    )
    if snr_signal < 0.1:  # noise: the rule anneals; the hold slows it, never past a standstill
        assert all(f < h <= 0 for f, h in zip(free, held)) and sum(held) < 0
        assert all(abs(m) <= 1e-15 for m in strong)
    else:  # the signal climbs: no hold changes that
        assert paths[0.5] == paths[0.0] and paths[5.0] == paths[0.0]
        assert min(free) > 0
