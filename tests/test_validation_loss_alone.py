"""``observe_validation(loss, hypergradient=False)``: the loss alone, no validation gradient.

What it must equal: an observation *with* the gradient whose validation signal cannot move the
rates (``validation["hypergrad_lr"]`` 0) — the hold and the rewind read the same loss, so the
rates and the parameters are the same (to rounding: the zero move still passes through log and
exp) — while the signal's own statistics (μ, ν,
count) stay untouched and nothing is backpropagated.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _validation_setup import LR, OPTIMIZERS, VAL, _data, _loss, _model, _train_step
from test_validation_hold import SETTLED_ANNEALING

import metalr
from metalr.functional._validation_state import LOSS_AVG, VAL_COUNT, VAL_MEAN, VAL_SQ
from metalr.optim._base import RATE_KEY, VALIDATION_KEY

#: A loss that falls, then rises (the hold holds, then cuts; the rewind goes back).
LOSSES = [1.0, 0.6, 0.5, 0.55, 0.7, 0.8, 0.9, 1.0]
OPTIONS = {"hold": 6, "cut_after": 0, "plateau_cut": 0.5, "loss_decay": 0.0}


def _run(make, validation, alone: bool, granularity="tensor", losses=LOSSES):
    """Rates, parameters and validation statistics after each observation of ``losses`` (3
    training steps apart), observed alone or with the gradient."""
    model = _model()
    opt = make(model.parameters(), seek=SETTLED_ANNEALING, validation=validation,
               granularity=granularity)  # fmt: skip
    trace = []
    for t, target in enumerate(losses):
        for k in range(3):
            _train_step(model, opt, _data(10 + 3 * t + k))
        raw = _loss(model, VAL)
        if alone:
            opt.observe_validation((raw * (target / float(raw.detach()))).detach(),
                                   hypergradient=False)  # fmt: skip
        else:
            opt.observe_validation(raw * (target / float(raw.detach())))
        params = list(model.parameters())
        trace.append((
            [opt.state[p][RATE_KEY].clone() for p in params],
            [p.detach().clone() for p in params],
            [opt.state[p][VALIDATION_KEY].clone() for p in params],
        ))  # fmt: skip
    return trace, opt, model


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum", "hyperlr_rmsprop"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("rewind", [0.0, 1.0])
def test_the_loss_alone_equals_a_gradient_that_cannot_move_the_rates(name, granularity, rewind):
    options = {**OPTIONS, "rewind": rewind}
    alone, _, _ = _run(OPTIMIZERS[name], options, True, granularity)
    with_grad, _, _ = _run(OPTIMIZERS[name], {**options, "hypergrad_lr": 0.0}, False, granularity)
    cut = False
    for (rates_a, params_a, stats_a), (rates_g, params_g, stats_g) in zip(alone, with_grad):
        for a, g in zip(rates_a + params_a, rates_g + params_g):
            torch.testing.assert_close(a, g, rtol=1e-13, atol=1e-15)
        for a, g in zip(stats_a, stats_g):
            torch.testing.assert_close(a[LOSS_AVG:], g[LOSS_AVG:], rtol=0, atol=0)
            assert a[VAL_MEAN] == 0 and a[VAL_SQ] == 0 and a[VAL_COUNT] == 0  # no signal seen
            assert g[VAL_COUNT] > 0
        cut = cut or any(not torch.equal(a, b) for a, b in zip(rates_a, alone[0][0]))
    assert cut  # the hold moved the rates: the comparison is not of two idle runs


def test_the_hold_cuts_a_rising_loss_observed_alone():
    """A loss that keeps rising: after ``cut_after``/``hold`` steps without a new best, each
    observation halves every settled rate (the training signal alone moves them in between)."""
    trace, _, _ = _run(OPTIMIZERS["adam"], OPTIONS, True)
    free, _, _ = _run(OPTIMIZERS["adam"], {**OPTIONS, "plateau_cut": 1.0}, True)
    # best at the third observation (0.5); 6 steps later (the fifth) the cut fires
    for t in (0, 1, 2, 3):
        for a, b in zip(trace[t][0], free[t][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ratio = [float(a / b) for a, b in zip(trace[4][0], free[4][0])]
    assert ratio == pytest.approx([0.5] * len(ratio), rel=1e-12)


def test_nothing_is_backpropagated_and_a_closure_runs_without_grad():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=OPTIONS)
    _train_step(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return _loss(model, VAL)

    value = opt.observe_validation(closure, hypergradient=False)
    assert seen == [False] and not value.requires_grad
    with_graph = _loss(model, VAL)  # a loss with a graph is read, not backpropagated
    opt.observe_validation(with_graph, hypergradient=False)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    for number in (0.5, 1):  # a Python number is a loss too
        assert float(opt.observe_validation(number, hypergradient=False)) == float(number)


def test_a_non_finite_loss_alone_changes_nothing():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=OPTIONS)
    for t in range(3):
        _train_step(model, opt, _data(t))
    opt.observe_validation(0.5, hypergradient=False)
    _train_step(model, opt, _data(5))
    before = copy.deepcopy(opt.state_dict())
    for bad in (float("nan"), float("inf")):
        opt.observe_validation(bad, hypergradient=False)
    after = opt.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(after["state"][key][name], value, rtol=0, atol=0,
                                           equal_nan=True)  # fmt: skip


def test_a_run_observing_the_loss_alone_resumes_bit_exactly():
    options = {**OPTIONS, "rewind": 1.0}
    _, opt, model = _run(OPTIMIZERS["adam"], options, True, losses=LOSSES[:4])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    def go_on(model, opt):
        out = []
        for t, value in enumerate(LOSSES[4:]):
            for k in range(3):
                _train_step(model, opt, _data(40 + 3 * t + k))
            opt.observe_validation(value, hypergradient=False)
            out += [p.detach().clone() for p in model.parameters()]
        return out

    straight = go_on(model, opt)
    model2 = _model(1)
    model2.load_state_dict(saved_model)
    opt2 = metalr.AdamHD(model2.parameters(), lr=LR, seek=SETTLED_ANNEALING, validation=options)
    opt2.load_state_dict(saved_opt)
    for a, b in zip(go_on(model2, opt2), straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "observe", "match"),
    [
        ({"rule": "normalized"}, {}, r"param group 0 .*rule='normalized'"),
        ({"validation": {"hold": 0}}, {}, r"validation\['hold'\]=0"),
        ({}, {"scaler": object()}, "Invalid scaler"),
    ],
)
def test_bad_uses_of_the_loss_alone_are_refused_by_name(kwargs, observe, match):
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR, **kwargs)
    _train_step(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.observe_validation(0.5, hypergradient=False, **observe)


@pytest.mark.parametrize("bad", [torch.ones(2), torch.tensor(1), True, "0.5"])
def test_a_loss_alone_must_be_one_real_number(bad):
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR)
    _train_step(model, opt)
    with pytest.raises(ValueError, match=r"hypergradient=False\): expected a one-element"):
        opt.observe_validation(bad, hypergradient=False)


def test_a_loss_without_grad_names_the_option():
    model = _model()
    opt = metalr.AdamHD(model.parameters(), lr=LR)
    _train_step(model, opt)
    with torch.no_grad():
        loss = _loss(model, VAL)
    with pytest.raises(ValueError, match="hypergradient=False observes a loss without"):
        opt.observe_validation(loss)
