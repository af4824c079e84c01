"""The ray ceiling's rate-weighted clock (``validation={"ray_clock": 1}``,
:mod:`metalr.functional._ray`): ``t_eff ← t_eff · m̄_prev / m̄ + Δt`` at each finite observation;
and its gate (``ray_gate`` γ): it acts only where ``G_t < γ · H_t``.

References: the clock against ``Σ_i (t_i − t_{i−1}) m̄_i / m̄_now`` written out in Python floats;
the decision (window and factor on ``t_eff``) against the same; the optimizer's clock against
the steps and rates recorded by the test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _configs import same_state_value
from _validation_setup import (
    LR,
    OPTIMIZERS,
    VAL,
    _data,
    _loss,
    _model,
    _overfitting_run,
    _train_step,
)

import metalr
from metalr.functional._controller import COUNT, GRAD, GRAD_PEAK, RAMP, initial_controller
from metalr.functional._ray import (
    DONE,
    EFFECTIVE,
    KEPT,
    RAY_SIZE,
    SEEN,
    STREAK,
    initial_ray_state,
    ray_update,
)
from metalr.functional._validation_state import initial_validation_stats
from metalr.functional.validation import VALIDATION_DEFAULTS
from metalr.optim._state_keys import CONTROLLER_KEY, RATE_KEY, RAY_KEY

SEEK = dict(metalr.functional.SEEK_DEFAULTS)
#: The ray alone on the rate-weighted clock (no validation signal, no hold).
RAY_CLOCK = {"ray_steps": 1000, "ray_clock": 1, "hypergrad_lr": 0.0, "hold": 0}


def _python_clock(looks: list[tuple[float, float, bool]]) -> list[float]:
    """``t_eff`` after each look ``(t, log m̄, finite)``: the travel so far in steps at the
    present rate, each interval between finite looks at the rate of its end."""
    travel, last, out, level = 0.0, 0.0, [], None
    for t, lv, finite in looks:
        if finite:
            travel += (t - last) * math.exp(lv)
            last, level = t, lv
        out.append(travel / math.exp(level) if level is not None else 0.0)
    return out


def _feed(looks, options, rate=0.8):
    """``ray_update`` over ``looks`` ``(t, log m̄, finite)`` with cosines above τ; the ray
    states and rates after each."""
    param = torch.zeros(3, dtype=torch.float64)
    ctrl = initial_controller(param, torch.float64, SEEK)
    ctrl[RAMP] = 0.2
    stats = initial_validation_stats(param, torch.float64)
    ray = initial_ray_state(param, torch.float64)
    rate = torch.tensor(rate, dtype=torch.float64)
    states, rates = [], []
    for t, lv, finite in looks:
        out = ray_update(
            [rate], [ctrl], [stats], [ray], torch.tensor(0.5, dtype=torch.float64),
            torch.tensor(finite), options=options, seek=SEEK, granularity="tensor",
            steps=torch.tensor(float(t), dtype=torch.float64),
            level=torch.tensor(lv, dtype=torch.float64),
        )  # fmt: skip
        rate, ctrl, stats, ray = out.rates[0], out.controllers[0], out.stats[0], out.ray[0]
        states.append(ray.clone())
        rates.append(float(rate))
    return states, rates


def test_the_clock_is_the_travel_in_steps_at_the_present_rate():
    """A ramp (the level climbing a decade every other look), a NaN look, then a fixed rate:
    ``t_eff`` is the Python sum at every look, ``t_eff − t`` stays fixed once the rate does."""
    looks = [(20, -9.0, True), (40, -6.7, True), (60, -4.4, False), (80, -2.1, True),
             (100, -2.1, True), (120, -2.1, True), (140, -3.0, True)]  # fmt: skip
    options = {**VALIDATION_DEFAULTS, **RAY_CLOCK, "ray_tau": 1.0}  # never acts
    states, _ = _feed(looks, options)
    expected = _python_clock(looks)
    for i, (state, want) in enumerate(zip(states, expected)):
        assert float(state[EFFECTIVE]) == pytest.approx(want, rel=1e-12), i
    assert float(states[2][SEEN]) == 40.0  # the NaN look counted nothing
    assert float(states[4][EFFECTIVE]) - 100 == pytest.approx(float(states[3][EFFECTIVE]) - 80)
    assert float(states[0][EFFECTIVE]) == 20.0  # the first look: t_eff = t


def test_a_ramp_keeps_the_window_open_on_the_clock_and_the_factor_reads_it():
    """By step 120 the step clock's window (w·T = 100) has closed; the travel since a ramp of
    two decades is worth far fewer steps, so the rate-weighted clock acts there, at the
    factor ``t_eff / (a·T)``."""
    looks = [(20, -4.6, True), (40, -2.3, True), (60, 0.0, True), (80, 0.0, True),
             (100, 0.0, True), (120, 0.0, True)]  # fmt: skip
    base = {**VALIDATION_DEFAULTS, "ray_steps": 1000, "ray_tau": 0.0, "ray_persist": 6,
            "hypergrad_lr": 0.0, "hold": 0}  # fmt: skip
    steps_states, steps_rates = _feed(looks, {**base, "ray_clock": 0})
    assert float(steps_states[-1][DONE]) == 0.0 and steps_rates[-1] == 0.8
    clock_states, clock_rates = _feed(looks, {**base, "ray_clock": 1})
    t_eff = _python_clock(looks)[-1]
    assert t_eff < 0.1 * 1000  # the window on the clock is open at step 120
    assert float(clock_states[-1][DONE]) == 1.0
    assert clock_rates[-1] == pytest.approx(0.8 * t_eff / (0.3 * 1000), rel=1e-12)
    assert [float(s[DONE]) for s in clock_states[:-1]] == [0.0] * 5  # the sixth look acts
    # once it has acted the clock stops (nothing reads it any more)
    assert float(clock_states[-1][EFFECTIVE]) == pytest.approx(t_eff, rel=1e-12)


def test_the_optimizer_reads_the_groups_step_and_largest_rate():
    """End to end (tensor granularity, τ 1: it never acts): after each observation the state's
    clock is the Python sum over the steps and the largest multiplier the test read before it
    (the ray alone moves no rate at an observation)."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, granularity="tensor",
                        validation={**RAY_CLOCK, "ray_tau": 1.0})  # fmt: skip
    looks = []
    for t in range(1, 22):
        _train_step(model, opt, _data(10 + t))
        if t % 4 == 0:
            params = list(model.parameters())
            steps = max(float(opt.state[p][CONTROLLER_KEY][COUNT]) for p in params) + 1
            level = max(math.log(float(opt.state[p][RATE_KEY])) for p in params)
            looks.append((steps, level, True))
            opt.observe_validation(_loss(model, VAL))
            want = _python_clock(looks)[-1]
            for p in params:
                assert float(opt.state[p][RAY_KEY][EFFECTIVE]) == pytest.approx(want, rel=1e-9)
    assert looks[-1][1] != looks[0][1]  # the rates moved between the looks: a real test


def test_a_checkpoint_from_before_the_clock_resumes_counting_from_t():
    """A ray state of three entries (a checkpoint from before the clock) is padded at the next
    observation, whose ``t_eff`` is then its step count; streak and flags are kept."""
    validation = {**RAY_CLOCK, "ray_tau": 1.0}
    model, opt, _, _ = _overfitting_run(OPTIMIZERS["adam"], validation, steps=6)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state[RAY_KEY] = state[RAY_KEY][:3].clone()  # the old layout
    twin = _model()
    twin.load_state_dict(model.state_dict())
    resumed = metalr.AdamHD(twin.parameters(), lr=LR, validation=validation)
    resumed.load_state_dict(saved)
    for t in range(7, 10):
        _train_step(twin, resumed, _data(10 + t))
    params = list(twin.parameters())
    steps = max(float(resumed.state[p][CONTROLLER_KEY][COUNT]) for p in params) + 1
    resumed.observe_validation(_loss(twin, VAL))
    for p, old in zip(params, saved["state"].values()):
        ray = resumed.state[p][RAY_KEY]
        assert ray.numel() == RAY_SIZE
        assert float(ray[EFFECTIVE]) == steps and float(ray[SEEN]) == steps
        assert float(ray[KEPT]) == float(old[RAY_KEY][KEPT]) == 1.0
        assert float(ray[STREAK]) == 0.0 and float(ray[DONE]) == 0.0


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_a_clock_other_than_0_or_1_is_refused_by_name(value):
    with pytest.raises(ValueError, match="ray_clock"):
        metalr.AdamHD(_model().parameters(), lr=LR,
                      validation={"ray_steps": 100, "ray_clock": value})  # fmt: skip


def _gated_looks(falls, gate, peak=2.0):
    """Looks every 10 steps at a fixed rate, each reading above τ, with the group's gradient
    average at ``fall × peak``; the rates and DONE flags after each."""
    options = {**VALIDATION_DEFAULTS, "ray_steps": 1000, "ray_tau": 0.0, "ray_persist": 2,
               "hypergrad_lr": 0.0, "hold": 0, "ray_gate": gate}  # fmt: skip
    param = torch.zeros(2, dtype=torch.float64)
    ctrl = initial_controller(param, torch.float64, SEEK)
    stats = initial_validation_stats(param, torch.float64)
    ray = initial_ray_state(param, torch.float64)
    rate = torch.tensor(0.8, dtype=torch.float64)
    done, rates = [], []
    for i, fall in enumerate(falls):
        ctrl[COUNT], ctrl[GRAD], ctrl[GRAD_PEAK] = 10 * (i + 1) - 1, fall * peak, peak
        out = ray_update([rate], [ctrl], [stats], [ray], torch.tensor(0.5, dtype=torch.float64),
                         torch.tensor(True), options=options, seek=SEEK, granularity="tensor")  # fmt: skip
        rate, ray = out.rates[0], out.ray[0]
        ctrl = out.controllers[0].clone()
        done.append(float(ray[DONE]))
        rates.append(float(rate))
    return done, rates, ray


def test_the_gate_holds_the_action_until_the_gradient_has_fallen():
    """Streak of two from the second look; the gradient at its peak until the fourth, where it
    has fallen to 0.5 of it: γ 0.8 acts there (at t = 40, f = 40 / 300), γ 1 at the second
    (t = 20: f at its floor, 0.1)."""
    falls = [1.0, 1.0, 0.9, 0.5, 0.4]
    done, rates, ray = _gated_looks(falls, gate=0.8)
    assert done == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert rates[3] == pytest.approx(0.8 * 40 / 300, rel=1e-12)
    assert float(ray[STREAK]) == 4.0  # the streak ran on while the gate held the action
    done, rates, _ = _gated_looks(falls, gate=1.0)  # no gate: G = H does not hold it
    assert done == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert rates[1] == pytest.approx(0.8 * max(20 / 300, 0.1), rel=1e-12)  # at the floor


def test_the_gate_is_open_where_no_gradient_norm_is_kept():
    done, _, _ = _gated_looks([0.0, 0.0, 0.0], gate=0.8, peak=0.0)  # SGD-HD's defaults
    assert done == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_gate_outside_0_1_is_refused_by_name(value):
    with pytest.raises(ValueError, match="ray_gate"):
        metalr.AdamHD(_model().parameters(), lr=LR,
                      validation={"ray_steps": 100, "ray_gate": value})  # fmt: skip


def test_at_its_defaults_the_ray_acts_at_the_first_look_past_the_gate_on_the_clock():
    """The defaults (the clock, γ 0.8), end to end (τ −1: every look reads above it): the
    optimizer acts at the first look from the second on where the group's G/H, read by the
    test before the look, is below 0.8, and caps the rates at ``clamp(t_eff / (0.3 T), 0.1, 1)``
    × their value, ``t_eff`` the Python clock over the steps and rates the test read."""
    budget = 400
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, granularity="tensor",
                        validation={"ray_steps": budget, "ray_tau": -1.0, "ray_before": 1.0,
                                    "hypergrad_lr": 0.0, "hold": 0})  # fmt: skip
    assert opt.param_groups[0]["validation"]["ray_clock"] == 1.0
    assert opt.param_groups[0]["validation"]["ray_gate"] == 0.8
    looks, acted, falls = [], None, []
    for t in range(1, 200):
        _train_step(model, opt, _data(10 + t))
        if t % 4:
            continue
        params = list(model.parameters())
        ctrl = opt.state[params[0]][CONTROLLER_KEY]
        fall = float(ctrl[GRAD] / ctrl[GRAD_PEAK])
        steps = max(float(opt.state[p][CONTROLLER_KEY][COUNT]) for p in params) + 1
        rates = {p: float(opt.state[p][RATE_KEY]) for p in params}
        looks.append((steps, math.log(max(rates.values())), True))
        falls.append(fall)
        opt.observe_validation(_loss(model, VAL))
        if float(opt.state[params[0]][RAY_KEY][DONE]) == 1.0:
            acted = len(looks) - 1
            break
    assert acted is not None, falls
    expected = next(i for i, f in enumerate(falls) if i >= 1 and f < 0.8)
    assert acted == expected and acted >= 2, falls  # the gate held it at least one look
    factor = min(max(_python_clock(looks)[-1] / (0.3 * budget), 0.1), 1.0)
    for p in model.parameters():
        assert float(opt.state[p][RATE_KEY]) == pytest.approx(rates[p] * factor, rel=1e-9)


@pytest.mark.parametrize("acts", [True, False], ids=["acts", "never_acts"])
def test_on_cpu_an_observation_skips_what_would_return_its_input_bit_for_bit(monkeypatch, acts):
    """Once the rule has acted it is inert (its update returns its input), and a look that keeps
    no snapshot and flags no rewind leaves both as they were; on CPU state an observation reads
    that on the host and skips the work: the same run with the skips switched off ends with the
    same parameters and state bit for bit. Acting at the second look (τ −1), only the run
    without the skip calls the rule afterwards; never acting (τ 1: every look at or below it,
    the window closing at step 12), the runs differ in nothing."""
    import metalr.optim._observing as observing

    calls = []
    original = observing.ray_decision

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(observing, "ray_decision", counted)
    validation = {"ray_steps": 100, "ray_gate": 1.0, "ray_clock": 0.0,
                  "ray_tau": -1.0 if acts else 1.0, "ray_before": 1.0 if acts else 0.12}  # fmt: skip
    runs = {}
    for skipping in (True, False):
        if not skipping:  # as on an accelerator: no flag is read on the host
            monkeypatch.setattr(observing, "host_readable", lambda t: False)
        calls.clear()
        model, opt, _, _ = _overfitting_run(OPTIMIZERS["adam"], validation, steps=60, every=3)
        runs[skipping] = (model, opt, len(calls))
    (skip_model, skip_opt, skip_calls), (full_model, full_opt, full_calls) = runs[True], runs[False]
    first = next(iter(skip_opt.state.values()))
    assert float(first[RAY_KEY][DONE]) == (1.0 if acts else 0.0)
    assert float(first[RAY_KEY][KEPT]) == (0.0 if acts else 1.0)
    assert full_calls == 20 and skip_calls == (2 if acts else 20)
    for p, q in zip(skip_model.parameters(), full_model.parameters(), strict=True):
        assert torch.equal(p, q)
        a, b = skip_opt.state[p], full_opt.state[q]
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert same_state_value(value, b[key]), key
