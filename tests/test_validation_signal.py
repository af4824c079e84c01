"""``observe_validation``: the validation hypergradient, the rates it moves, state and failures.

References: central finite differences of the validation loss through the real optimizer's last
step, autograd through the pure step, and hand-written float64 versions of the update equations
(:mod:`metalr.functional.validation`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _validation_setup import LR, OPTIMIZERS, TRAIN, VAL, _data, _loss, _model, _train_step

import metalr
from metalr.functional import adam_hd_step, hypergradient
from metalr.optim._base import CONTROLLER_KEY, RATE_KEY, VALIDATION_KEY


def _frozen_rates(name: str, granularity: str):
    """A model and optimizer after 3 steps with fixed rates (multipliers 1.3)."""
    model = _model()
    opt = OPTIMIZERS[name](
        model.parameters(), hypergrad_lr=0.0, rule="normalized", granularity=granularity
    )
    for _ in range(3):
        _train_step(model, opt)
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p][RATE_KEY].fill_(1.3)
    return model, opt


def _val_after_step(model, opt, snapshot, params_index: int, delta: torch.Tensor) -> float:
    """Validation loss after one more step with the rate of one tensor moved by ``delta``."""
    model.load_state_dict(snapshot[0])
    opt.load_state_dict(copy.deepcopy(snapshot[1]))
    p = list(model.parameters())[params_index]
    with torch.no_grad():
        opt.state[p][RATE_KEY].add_(delta)
    _train_step(model, opt)
    return float(_loss(model, VAL).detach())


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_validation_hypergradient_equals_finite_differences(name, granularity):
    """∂L_val(θ_t)/∂m = -lr ⟨∇L_val(θ_t), d_t⟩ with d_t what ``_last_directions`` recomputes."""
    model, opt = _frozen_rates(name, granularity)
    snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    _train_step(model, opt)
    params = list(model.parameters())
    val_grads = torch.autograd.grad(_loss(model, VAL), params)
    group = opt.param_groups[0]
    directions = opt._last_directions(group, params)
    predicted = [LR * h for h in hypergradient(val_grads, directions, granularity)]
    h = 1e-5
    for i, p in enumerate(params):
        shape = p.shape if granularity == "element" else ()
        e = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        plus = _val_after_step(model, opt, snapshot, i, h * e)
        minus = _val_after_step(model, opt, snapshot, i, -h * e)
        fd = (plus - minus) / (2 * h)
        assert fd == pytest.approx(float((predicted[i] * e).sum()), rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
def test_validation_hypergradient_equals_autograd_through_the_pure_step(granularity):
    model, opt = _frozen_rates("adam", granularity)
    params = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(_loss(model, TRAIN), list(model.parameters()))
    st = [opt.state[p] for p in model.parameters()]
    shape = (lambda p: p.shape) if granularity == "element" else (lambda p: ())
    leaves = [torch.full(shape(p), 1.3, dtype=torch.float64, requires_grad=True) for p in params]
    new = adam_hd_step(
        params, list(grads), [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], leaves,
        [s["step"] for s in st], lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        decoupled_weight_decay=False, hypergrad_lr=0.0, rule="normalized",
        granularity="tensor" if granularity == "group" else granularity, lr_bounds=(0, math.inf),
    )  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, new.params)), (VAL[0],))
    autograd = torch.autograd.grad(((out - VAL[1]) ** 2).mean(), leaves)
    _train_step(model, opt)  # the optimizer's own step from the same state
    for p, q in zip(model.parameters(), new.params):
        torch.testing.assert_close(p.detach(), q.detach())
    params = list(model.parameters())
    val_grads = torch.autograd.grad(_loss(model, VAL), params)
    directions = opt._last_directions(opt.param_groups[0], params)
    predicted = [LR * h for h in hypergradient(val_grads, directions, granularity)]
    if granularity == "group":  # one shared rate: the sum over tensors
        torch.testing.assert_close(predicted[0], sum(a.sum() for a in autograd))
    else:
        for a, b in zip(autograd, predicted):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "hyperlr_rmsprop"])
def test_additive_rule_moves_the_rate_by_the_validation_hypergradient(name, granularity):
    """rule="additive": α ← α + β_val ⟨∇L_val, d_t⟩, i.e. m ← m + β_val ⟨∇L_val, d_t⟩ / lr."""
    model = _model()
    beta = 1e-3
    opt = OPTIMIZERS[name](
        model.parameters(), hypergrad_lr=0.0, rule="additive", granularity=granularity,
        validation={"hypergrad_lr": beta},
    )  # fmt: skip
    for _ in range(3):
        _train_step(model, opt)
    params = list(model.parameters())
    before = [opt.state[p][RATE_KEY].clone() for p in params]
    val_grads = torch.autograd.grad(_loss(model, VAL), params)
    directions = opt._last_directions(opt.param_groups[0], params)
    dots = [-h for h in hypergradient(val_grads, directions, granularity)]
    opt.observe_validation(_loss(model, VAL))
    for p, m0, dot in zip(params, before, dots):
        torch.testing.assert_close(opt.state[p][RATE_KEY], (m0 + beta * dot / LR).clamp_min(0))
    assert all(float(opt.state[p][VALIDATION_KEY][2]) == 1 for p in params)


def _snr(mu, nu, n, b1, b2):
    return (mu / (1 - b1**n)) / (math.sqrt(nu / (1 - b2**n)) + 1e-8) if n > 0 else 0.0


def _seek_reference(rates, stats, cosines, options, ceiling, train_snrs=None):
    """The seek rule's validation step for settled tensor rates, in Python floats (no tie);
    ``train_snrs``: the training signal's μ̂/√ν̂ per tensor (read with ``gap``)."""
    b1, b2 = options["signal_decay"], options["signal_sq_decay"]
    out_rates, out_stats = [], []
    for i, (m, (mu, nu, n), c) in enumerate(zip(rates, stats, cosines)):
        mu, nu, n = b1 * mu + (1 - b1) * c, b2 * nu + (1 - b2) * c * c, n + 1
        track = _snr(mu, nu, n, b1, b2) - options["evidence"]
        if options.get("gap", 0.0):  # less agreement than on the training data
            track -= options["gap"] * train_snrs[i]
        if track > 0:  # a move up is scaled by climb (1: kept, 0: the signal only holds back)
            track *= options.get("climb", 1.0)
        log_m = min(math.log(m) + options["hypergrad_lr"] * track, ceiling)
        out_rates.append(math.exp(log_m))
        out_stats.append((mu, nu, n))
    return out_rates, out_stats


@pytest.mark.parametrize(("climb", "gap"), [(1.0, 0.0), (0.5, 0.0), (0.0, 0.0), (1.0, 1.0),
                                            (0.0, 0.5)])  # fmt: skip
def test_seek_validation_step_equals_a_float64_reference(climb, gap):
    model = _model()
    options = {"hypergrad_lr": 0.2, "evidence": -0.3, "signal_decay": 0.6,
               "signal_sq_decay": 0.9, "climb": climb, "gap": gap, "hold": 0}  # fmt: skip
    # ramp_rate 0: the controller starts settled (no ramp), tie off: rates move independently
    seek = {"ramp_rate": 0.0, "init_scale": 1.0, "tie": math.inf}
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=seek, validation=options)
    params = list(model.parameters())
    rates = [1.0] * len(params)
    stats = [(0.0, 0.0, 0)] * len(params)
    scaled = trained = 0  # observations where climb changed a rate's move / gap had a signal
    for t in range(4):
        _train_step(model, opt, _data(10 + t))
        rates = [float(opt.state[p][RATE_KEY]) for p in params]  # the training step's move
        val = _data(20 + t)
        grads = torch.autograd.grad(_loss(model, val), params)
        dirs = opt._last_directions(opt.param_groups[0], params)
        cos = [float((g * d).sum() / (g.norm() * d.norm())) for g, d in zip(grads, dirs)]
        ceilings = [float(opt.state[p][CONTROLLER_KEY][4]) for p in params]
        assert all(c == math.inf for c in ceilings)  # settled from the start: no turn, no ceiling
        seek = opt.param_groups[0]["seek"]
        train = [_snr(*opt.state[p][CONTROLLER_KEY][2:4].tolist(),
                      float(opt.state[p][CONTROLLER_KEY][5]), seek["signal_decay"],
                      seek["signal_sq_decay"]) for p in params]  # fmt: skip
        trained += sum(abs(t) > 0.01 for t in train)  # observations the gap term reads
        kept, _ = _seek_reference(rates, stats, cos, {**options, "climb": 1.0}, math.inf, train)
        rates, stats = _seek_reference(rates, stats, cos, options, math.inf, train)
        scaled += sum(abs(a - b) > 1e-9 * a for a, b in zip(kept, rates))
        opt.observe_validation(_loss(model, val))
        for p, m, s in zip(params, rates, stats):
            assert float(opt.state[p][RATE_KEY]) == pytest.approx(m, rel=1e-12)
            torch.testing.assert_close(  # the signal's (μ, ν, count); the rest: test_validation_hold
                opt.state[p][VALIDATION_KEY][:3], torch.tensor(s, dtype=torch.float64)
            )
    assert (scaled > 0) == (climb != 1.0)  # the case has moves up, which climb scales
    assert trained > 0


@pytest.mark.parametrize(("climb", "gap"), [(1.0, 0.0), (0.0, 0.0), (0.5, 0.0), (0.0, 0.5)])
def test_seek_validation_step_per_element_equals_a_float64_reference(climb, gap):
    """Per element the step is the element's sign of g_val·d, shaped as the tensor's track is
    (less evidence and the gap term, positive parts times climb): with climb 0 no element rises
    (it moved every element by ±β_val before, whatever climb, evidence and gap said)."""
    model = _model()
    options = {"hypergrad_lr": 0.2, "evidence": -0.3, "climb": climb, "gap": gap, "hold": 0}
    seek = {"ramp_rate": 0.0, "init_scale": 1.0}
    opt = metalr.AdamHD(model.parameters(), lr=LR, seek=seek, validation=options,
                        granularity="element")  # fmt: skip
    params = list(model.parameters())
    rose = 0
    for t in range(3):
        _train_step(model, opt, _data(10 + t))
        before = [opt.state[p][RATE_KEY].clone() for p in params]
        val = _data(20 + t)
        grads = torch.autograd.grad(_loss(model, val), params)
        dirs = opt._last_directions(opt.param_groups[0], params)
        group_seek = opt.param_groups[0]["seek"]
        expected = []
        for p, m, g, d in zip(params, before, grads, dirs):
            ctrl = opt.state[p][CONTROLLER_KEY]
            train = _snr(*ctrl[2:4].tolist(), float(ctrl[5]), group_seek["signal_decay"],
                         group_seek["signal_sq_decay"])  # fmt: skip
            step = torch.sign(g * d).double() - options["evidence"] - gap * train
            step = torch.where(step > 0, climb * step, step)
            expected.append(torch.exp(torch.log(m) + options["hypergrad_lr"] * step))
        opt.observe_validation(_loss(model, val))
        for p, m, e in zip(params, before, expected):
            torch.testing.assert_close(opt.state[p][RATE_KEY], e, rtol=1e-12, atol=0)
            rose += int((opt.state[p][RATE_KEY] > m).sum())
    assert (rose > 0) == (climb > 0)
