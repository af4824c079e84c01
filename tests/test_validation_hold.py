"""The seek rule's hold (``validation={"hold": P, "plateau_cut": c}``): rates that keep their level
while the validation loss improves and fall once it has stopped improving.

References: a float64 version of the equations in Python floats
(:func:`metalr.functional._controller._loss_trend` and ``_held_rates``, then the validation
move of ``tests/test_validation_signal.py``'s reference), and constructed cases where the
training signal anneals the rates at every step while the validation loss is prescribed.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _validation_setup import LR, TRAIN, VAL, _data, _loss, _model, _train_step
from test_validation_signal import _seek_reference

import metalr
from metalr.functional.validation import (
    LEVEL,
    LOSS_AVG,
    SEEK_ONLY_VALIDATION_KEYS,
    VALIDATION_DEFAULTS,
    VALIDATION_SIZE,
)
from metalr.optim._base import RATE_KEY, VALIDATION_KEY

#: Prescribed validation losses: falling, a noisy rise, falling again, then rising for good.
LOSSES = [1.0, 0.8, 0.9, 0.7, 0.75, 0.72, 0.9, 1.1, 1.3, 1.5]
#: Settled from the start (no ramp, no ceiling), rates independent (no tie), and a training
#: signal that can only anneal (evidence 1: every step's tracking move is ≤ 0; no noise hold to
#: hand it back).
SETTLED_ANNEALING = {"ramp_rate": 0.0, "init_scale": 1.0, "tie": math.inf, "evidence": 1.0,
                     "noise_hold": 0.0}  # fmt: skip


def _observe(opt, model, target: float, batch=VAL) -> None:
    """``observe_validation`` with a loss of value ``target`` (the validation loss rescaled: the
    cosine the rates follow does not change with the scale)."""
    raw = _loss(model, batch)
    opt.observe_validation(raw * (target / float(raw.detach())))


def _hold_reference(rates, levels, trend, value, step, options):
    """The hold in Python floats: the loss trend ``(A, B, t_B, n)`` after ``value`` at training
    step ``step`` (active steps counted) and the rates (per tensor) the validation move starts
    from."""
    avg, best, best_step, count = trend
    d = options["loss_decay"]
    avg = value if count == 0 else d * avg + (1 - d) * value
    best_step = step if avg < best else best_step
    best = min(best, avg)
    holding = step - best_step < options["hold"]
    cutting = step - best_step >= max(options["cut_after"], options["hold"])
    held = []
    for m, level in zip(rates, levels):
        if holding:
            held.append(max(m, math.exp(level)) if level > -math.inf else m)
        else:  # between the hold's patience and the cut's, the training signal alone
            held.append(m * options["plateau_cut"] if cutting else m)
    return held, (avg, best, best_step, count + 1)


@pytest.mark.parametrize(("cut", "cut_after"), [(1.0, 0.0), (0.5, 0.0), (0.5, 12.0)])
def test_hold_equals_a_float64_reference(cut, cut_after):
    # 3 training steps between observations: a patience of 6 steps is two observations
    options = {"hold": 6, "plateau_cut": cut, "cut_after": cut_after, "loss_decay": 0.5, "hypergrad_lr": 0.3,
               "signal_decay": 0.7, "signal_sq_decay": 0.95, "evidence": -0.2, "climb": 0.0}  # fmt: skip
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=options)
    params = list(model.parameters())
    stats = [(0.0, 0.0, 0)] * len(params)
    levels = [-math.inf] * len(params)
    trend = (0.0, math.inf, 0, 0)
    restored = cut_seen = 0
    for t, value in enumerate(LOSSES):
        for k in range(3):  # the training signal anneals the rates between observations
            _train_step(model, opt, _data(10 + 3 * t + k))
        rates = [float(opt.state[p][RATE_KEY]) for p in params]
        grads = torch.autograd.grad(_loss(model, VAL), params)
        dirs = opt._last_directions(opt.param_groups[0], params)
        cos = [float((g * d).sum() / (g.norm() * d.norm())) for g, d in zip(grads, dirs)]
        active_steps = 3 * (t + 1) - 1  # the first step has no last direction: not counted
        held, trend = _hold_reference(rates, levels, trend, value, active_steps, options)
        restored += sum(h > r * (1 + 1e-9) for h, r in zip(held, rates))
        cut_seen += sum(h < r * (1 - 1e-9) for h, r in zip(held, rates))
        new_rates, stats = _seek_reference(held, stats, cos, options, math.inf)
        levels = [math.log(m) for m in new_rates]
        _observe(opt, model, value)
        for p, m, level in zip(params, new_rates, levels):
            state = opt.state[p][VALIDATION_KEY]
            assert float(opt.state[p][RATE_KEY]) == pytest.approx(m, rel=1e-12)
            expected = torch.tensor([*trend, level], dtype=torch.float64)
            torch.testing.assert_close(state[LOSS_AVG:], expected, rtol=1e-12, atol=0)
    assert restored > 0  # the anneal between observations was undone while the loss improved
    assert (cut_seen > 0) == (cut < 1)  # and the rise made the cut


def _rate_path(validation, granularity="tensor", losses=LOSSES):
    """Each tensor's largest rate after every observation of ``losses``."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING,
                        validation=validation, granularity=granularity)  # fmt: skip
    path = []
    for t, value in enumerate(losses):
        for k in range(3):
            _train_step(model, opt, _data(10 + 3 * t + k))
        _observe(opt, model, value)
        path.append([float(opt.state[p][RATE_KEY].amax()) for p in model.parameters()])
    return path


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_rates_keep_their_level_while_the_validation_loss_improves(granularity):
    """No validation move (β_val 0): with the hold, every observation of a falling validation
    loss brings each rate (per element: the tensor's largest) back up to at least its level after
    the previous observation. At group and tensor granularity the training signal can only
    anneal here, so the hold keeps them exactly at the first observation's level while without it
    they fall further at every observation (per-element rates follow their own signs, which
    can rise)."""
    falling = [1.0, 0.9, 0.8, 0.7, 0.6]
    held = _rate_path({"hold": 6, "hypergrad_lr": 0.0}, granularity, falling)
    free = _rate_path({"hold": 0, "hypergrad_lr": 0.0}, granularity, falling)
    assert held[0] == pytest.approx(free[0], rel=1e-12)  # nothing to hold at the first observation
    for before, after in itertools.pairwise(held):
        assert all(a >= b * (1 - 1e-12) for a, b in zip(after, before))
    if granularity != "element":
        for row in held[1:]:
            assert row == pytest.approx(held[0], rel=1e-12)
        assert all(a < b * 0.999 for a, b in zip(free[-1], free[0]))
    else:  # the hold made a difference: some tensor's largest rate would have fallen
        assert any(a > b * 1.001 for a, b in zip(held[-1], free[-1]))


def test_rates_are_cut_once_the_validation_loss_stops_improving():
    """Once ``hold`` training steps (here two observations) have passed without a new best of the
    loss's running average, each observation multiplies the rates by ``plateau_cut`` (beside
    the training signal's anneal)."""
    rising = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # averages 1, .75, .675 (the best), .6875, .744, .822
    cut = _rate_path({"hold": 6, "cut_after": 0, "plateau_cut": 0.5, "hypergrad_lr": 0.0},
                     losses=rising)  # fmt: skip
    kept = _rate_path({"hold": 6, "plateau_cut": 1.0, "hypergrad_lr": 0.0}, losses=rising)
    assert cut[3] == pytest.approx(kept[3], rel=1e-12)  # one observation without a best: held
    for t in (4, 5):
        for a, b, a0, b0 in zip(cut[t], kept[t], cut[t - 1], kept[t - 1]):
            # about the same training anneal since the last observation (the paths differ by the
            # cut's steps only from the fourth on), then ×0.5
            assert a / a0 == pytest.approx(0.5 * b / b0, rel=1e-3)


def test_hold_resumes_bit_exactly_and_skips_a_non_finite_loss():
    # 2 steps: one observation (one step apart here); the cut after 3 observations without a best
    options = {"hold": 2, "cut_after": 3, "plateau_cut": 0.5}
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=options)
    for t, value in enumerate(LOSSES[:5]):
        _train_step(model, opt, _data(10 + t))
        _observe(opt, model, value)
    before = {p: copy.deepcopy(opt.state[p]) for p in model.parameters()}
    opt.observe_validation(_loss(model, VAL) * float("nan"))
    for p in model.parameters():  # nothing moved: rates, statistics, the loss trend
        for key in (RATE_KEY, VALIDATION_KEY):
            torch.testing.assert_close(opt.state[p][key], before[p][key], rtol=0, atol=0)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    twin_opt = metalr.AdamHD(twin.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=options)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t, value in enumerate(LOSSES[5:]):
        for m, o in ((model, opt), (twin, twin_opt)):
            _train_step(m, o, _data(30 + t))
            _observe(o, m, value)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key in (RATE_KEY, VALIDATION_KEY):
            torch.testing.assert_close(opt.state[p][key], twin_opt.state[q][key], rtol=0, atol=0)


def test_checkpoint_from_before_the_hold_loads_with_a_fresh_loss_trend():
    """A checkpoint whose statistics have the old 3 entries (μ, ν, count) loads with a fresh
    trend (no best loss, no level) and keeps its signal statistics."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation={"hold": 2})
    _train_step(model, opt)
    opt.observe_validation(_loss(model, VAL))
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():
        s[VALIDATION_KEY] = s[VALIDATION_KEY][:3].clone()
    again = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation={"hold": 2})
    again.load_state_dict(state)
    for p in model.parameters():
        stats = again.state[p][VALIDATION_KEY]
        assert stats.numel() == VALIDATION_SIZE
        torch.testing.assert_close(stats[:3], opt.state[p][VALIDATION_KEY][:3])
        assert float(stats[LOSS_AVG + 1]) == math.inf and float(stats[LEVEL]) == -math.inf
    _train_step(model, again, TRAIN)
    again.observe_validation(_loss(model, VAL))  # and runs on
    assert all(float(again.state[p][VALIDATION_KEY][LEVEL]) > -math.inf
               for p in model.parameters())  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("hold", -1.0), ("loss_decay", 1.5),
                                            ("plateau_cut", 0.0), ("plateau_cut", 1.2),
                                            ("cut_after", -5.0)])  # fmt: skip
def test_bad_hold_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        metalr.AdamHD(_model().parameters(), lr=LR, validation={key: value})


def test_the_cut_waits_cut_after_steps():
    """``cut_after`` 12 (four observations here) with the hold's 6: an observation 6–11 steps after
    the best neither holds nor cuts (the training signal alone moves the rates); from 12 on,
    each observation halves them."""
    rising = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]  # best average at the third (step 8)
    late = _rate_path({"hold": 6, "cut_after": 12, "plateau_cut": 0.5, "hypergrad_lr": 0.0},
                      losses=rising)  # fmt: skip
    free = _rate_path({"hold": 6, "plateau_cut": 1.0, "hypergrad_lr": 0.0}, losses=rising)
    for t in (3, 4):  # 3 and 6 steps after the best: held, then neither (the same rates as no cut)
        assert late[t] == pytest.approx(free[t], rel=1e-12)
    for t in (6, 7):  # 12 and 15 steps after it: cut (the fifth observation, 9 steps, was not)
        for a, b, a0, b0 in zip(late[t], free[t], late[t - 1], free[t - 1]):
            assert a / a0 == pytest.approx(0.5 * b / b0, rel=1e-3)
    assert late[5] == pytest.approx(free[5], rel=1e-12)


@pytest.mark.parametrize("key", sorted(SEEK_ONLY_VALIDATION_KEYS))
@pytest.mark.parametrize(
    "make",
    [
        lambda params, v: metalr.AdamHD(params, lr=LR, rule="normalized", validation=v),
        lambda params, v: metalr.SGDHD(params, lr=LR, rule="additive", validation=v),
        lambda params, v: metalr.HyperLR(
            torch.optim.Adam(params, lr=LR), rule="normalized", validation=v
        ),
    ],
    ids=["adamhd-normalized", "sgdhd-additive", "hyperlr-normalized"],
)
def test_seek_only_options_are_refused_by_the_other_rules(key, make):
    """A hold, gap or evidence given to a rule that never reads it is an error, not a no-op."""
    value = VALIDATION_DEFAULTS[key]
    with pytest.raises(ValueError, match=key):
        make(_model().parameters(), {key: value})
    make(_model().parameters(), {"climb": 0.5, "train_weight": 0.5})  # the keys they read
