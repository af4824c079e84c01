"""The seek rule's rewind (``validation={"rewind": r}``): the parameters at the validation loss's
best running average are kept, and when the hold's cut fires the parameters go back to them
(``θ ← θ + r (S − θ)``) as the rates are cut.

Reference: the hold's trend in Python floats (``tests/test_validation_hold.py``'s
``_hold_reference`` decides when the average made a new best and when the cut fires) and the
parameters recorded by the test at those observations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _validation_setup import LR, OPTIMIZERS, VAL, _data, _loss, _model, _train_step
from test_validation_hold import SETTLED_ANNEALING, _observe

import metalr
from metalr.functional._validation_state import kept_snapshots, restored
from metalr.optim._base import RATE_KEY, VALIDATION_KEY
from metalr.optim._state_keys import REWIND_DUE_KEY, SNAPSHOT_KEY

#: Running averages (δ 0.5): 1, .75, .675 (the best, third observation), .6875, .744, .822.
RISING = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]
#: 3 training steps between observations; a cut 6 steps after the best: the fifth and sixth.
OPTIONS = {"hold": 6, "cut_after": 0, "plateau_cut": 0.5, "rewind": 1.0}
BEST, CUTS = 2, (4, 5)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _run(make, validation, losses=RISING, granularity="tensor"):
    """Parameters before and after every observation of ``losses`` (3 training steps apart),
    and after the first training step that follows each one."""
    model = _model()
    opt = make(model.parameters(), seek=SETTLED_ANNEALING, validation=validation,
               granularity=granularity)  # fmt: skip
    before, after, next_step = [], [], []
    for t in range(len(losses) + 1):
        for k in range(3):
            _train_step(model, opt, _data(10 + 3 * t + k))
            if k == 0 and t > 0:
                next_step.append(_params(model))
        if t == len(losses):
            break
        before.append(_params(model))
        _observe(opt, model, losses[t])
        after.append(_params(model))
    return before, after, next_step, opt


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum", "hyperlr_rmsprop"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_the_cut_sends_the_parameters_back_to_the_best_observation(name, granularity):
    """The observation itself never moves the parameters; the step after a cut ends where the
    parameters were at the best observation, exactly (r = 1), whatever that step computed."""
    before, after, next_step, opt = _run(OPTIMIZERS[name], OPTIONS, granularity=granularity)
    best = before[BEST]
    for t in range(len(RISING)):
        for p, q in zip(after[t], before[t]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        if t in CUTS:
            for p, s in zip(next_step[t], best):
                torch.testing.assert_close(p, s, rtol=0, atol=0)
            assert any(not torch.equal(p, s) for p, s in zip(before[t], best))  # it had moved on
        else:
            assert any(not torch.equal(p, s) for p, s in zip(next_step[t], before[t]))
    for p, s in zip(opt.param_groups[0]["params"], best):
        torch.testing.assert_close(opt.state[p][SNAPSHOT_KEY], s, rtol=0, atol=0)
        assert not bool(opt.state[p][REWIND_DUE_KEY])  # cleared once applied


def test_a_partial_rewind_goes_that_fraction_of_the_way_back_from_the_step():
    """Up to the first cut's step the runs with r = 0.25 and r = 0 are the same; that step then
    ends a quarter of the way back from where it went to the snapshot."""
    before, _, partial, _ = _run(OPTIMIZERS["adam"], {**OPTIONS, "rewind": 0.25})
    _, _, free, _ = _run(OPTIMIZERS["adam"], {**OPTIONS, "rewind": 0.0})
    t = CUTS[0]
    for a, f, s in zip(partial[t], free[t], before[BEST]):
        torch.testing.assert_close(a, f + 0.25 * (s - f), rtol=1e-12, atol=1e-15)


def test_without_the_rewind_no_snapshot_is_kept_and_nothing_goes_back():
    before, after, free, opt = _run(OPTIMIZERS["adam"], {**OPTIONS, "rewind": 0.0})
    for b, a in zip(before, after):
        for p, q in zip(b, a):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    for t in CUTS:
        assert any(not torch.equal(p, s) for p, s in zip(free[t], before[BEST]))
    assert all(SNAPSHOT_KEY not in s and REWIND_DUE_KEY not in s for s in opt.state.values())


def test_the_rates_are_cut_as_without_the_rewind_at_the_first_cut():
    """The rewind moves the parameters only: at the first cut the rates equal the run without it
    (the paths are the same up to then)."""
    rates = {}
    for rewind in (0.0, 1.0):
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING,
                            validation={**OPTIONS, "rewind": rewind})  # fmt: skip
        for t, value in enumerate(RISING[: CUTS[0] + 1]):
            for k in range(3):
                _train_step(model, opt, _data(10 + 3 * t + k))
            _observe(opt, model, value)
        rates[rewind] = [opt.state[p][RATE_KEY].clone() for p in model.parameters()]
    for a, b in zip(rates[0.0], rates[1.0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kept_snapshots_and_restored_are_pure_wheres():
    p = [torch.tensor([1.0, 2.0]), torch.tensor(3.0)]
    s = [torch.tensor([0.0, 0.0]), torch.tensor(-1.0)]
    new_s = kept_snapshots(p, s, torch.tensor([True, False]))
    torch.testing.assert_close(new_s[0], p[0])  # kept: the snapshot is the parameter
    torch.testing.assert_close(new_s[1], s[1])
    new_p = restored(p, s, torch.tensor([False, True]), 0.5)
    torch.testing.assert_close(new_p[0], p[0])
    torch.testing.assert_close(new_p[1], torch.tensor(1.0))  # halfway back from 3 to -1
    assert torch.equal(p[0], torch.tensor([1.0, 2.0])) and torch.equal(s[1], torch.tensor(-1.0))


def test_rewind_skips_a_non_finite_loss_and_resumes_bit_exactly():
    """A NaN loss changes nothing; a checkpoint saved between a cut's observation and the step
    that rewinds carries the pending rewind, and the resumed run applies it as the first would."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=OPTIONS)
    for t, value in enumerate(RISING[:4]):
        for k in range(3):
            _train_step(model, opt, _data(10 + 3 * t + k))
        _observe(opt, model, value)
    state = {p: copy.deepcopy(opt.state[p]) for p in model.parameters()}
    params = _params(model)
    opt.observe_validation(_loss(model, VAL) * float("nan"))
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
        for key in (RATE_KEY, VALIDATION_KEY, SNAPSHOT_KEY):
            torch.testing.assert_close(opt.state[p][key], state[p][key], rtol=0, atol=0)
    _train_step(model, opt, _data(5))  # the step after it: no rewind (nothing was due)
    assert all(not torch.equal(p.detach(), opt.state[p][SNAPSHOT_KEY]) for p in model.parameters())
    t = CUTS[0]
    for k in range(3):
        _train_step(model, opt, _data(10 + 3 * t + k))
    _observe(opt, model, RISING[t])  # a cut: the rewind is due at the next step
    saved = copy.deepcopy(opt.state_dict())
    assert all(REWIND_DUE_KEY in s for s in saved["state"].values())
    twin = _model()
    twin.load_state_dict(model.state_dict())
    twin_opt = metalr.AdamHD(twin.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=OPTIONS)
    twin_opt.load_state_dict(saved)
    assert all(s[REWIND_DUE_KEY].dtype == torch.bool for s in twin_opt.state.values())
    snapshots = [opt.state[p][SNAPSHOT_KEY].clone() for p in model.parameters()]
    for m, o in ((model, opt), (twin, twin_opt)):
        _train_step(m, o, _data(50))
        for p, s in zip(m.parameters(), snapshots):  # rewound, in both runs
            torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
        for k in range(2):
            _train_step(m, o, _data(51 + k))
        _observe(o, m, RISING[t + 1])
        _train_step(m, o, _data(60))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p][SNAPSHOT_KEY], twin_opt.state[q][SNAPSHOT_KEY],
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"validation": {"rewind": 1.5}}, r"validation\['rewind'\]|rewind"),
        ({"validation": {"rewind": -0.1}}, "rewind"),
        ({"validation": {"rewind": 1.0, "hold": 0}}, r"needs the hold"),
        ({"validation": {"rewind": 1.0}, "rule": "normalized"}, "rule='seek' only"),
    ],
)
def test_bad_rewind_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metalr.AdamHD(_model().parameters(), lr=LR, **kwargs)


def test_a_checkpoint_without_a_snapshot_takes_one_at_its_next_observation():
    """A run that turns the rewind on (or a checkpoint from before it) has no snapshot: the next
    observation takes the parameters as they are (so a cut due then restores nothing)."""
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING,
                        validation={**OPTIONS, "rewind": 0.0})  # fmt: skip
    for t, value in enumerate(RISING[:5]):
        for k in range(3):
            _train_step(model, opt, _data(10 + 3 * t + k))
        _observe(opt, model, value)
    on = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=OPTIONS)
    on.load_state_dict(opt.state_dict())  # the checkpoint's groups: the rewind off, as saved
    assert on.param_groups[0]["validation"]["rewind"] == 0.0
    on.param_groups[0]["validation"]["rewind"] = 1.0
    for k in range(3):
        _train_step(model, on, _data(40 + k))
    params = _params(model)
    _observe(on, model, RISING[5])  # a cut: back to the snapshot taken now, at the next step
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(on.state[p][SNAPSHOT_KEY], q, rtol=0, atol=0)
        assert bool(on.state[p][REWIND_DUE_KEY])
    _train_step(model, on, _data(50))
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_a_compiled_step_rewinds_as_eager_without_recompiling():
    """``torch.compile(opt.step)`` with the rewind equals the eager run, and the rewind's flags
    (created once, written in place) add one graph to the run without it (the step's post hook
    that applies them), not a recompilation of the step at every observation."""
    from torch._dynamo.utils import counters

    def run(rewind: float, compiled: bool) -> tuple[list[torch.Tensor], int]:
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING,
                            validation={**OPTIONS, "rewind": rewind})  # fmt: skip
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for t, value in enumerate(RISING):
            for k in range(3):
                opt.zero_grad()
                _loss(model, _data(10 + 3 * t + k)).backward()
                step()
            _observe(opt, model, value)
        opt.zero_grad()
        _loss(model, _data(99)).backward()
        step()  # the last cut's rewind
        return _params(model), counters["stats"]["unique_graphs"]

    eager, _ = run(1.0, compiled=False)
    compiled, graphs = run(1.0, compiled=True)
    _, baseline = run(0.0, compiled=True)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert 0 < baseline and graphs <= baseline + 1
