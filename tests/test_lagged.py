"""The one-step-lagged rate (``lagged=True``) against a float64 reference of its equations.

Reference, per step t (``metalr.functional.adam_rule`` docstring): ``d_{t-1}`` recomputed from the
moments before the update (step t-1, floored at 1), the Adam (SGD) half with the multipliers from
*before* the step, then ``m ← rule(m, ⟨g_t, d_{t-1}⟩)`` through the public rule function
:func:`metalr.functional._hypergrad.adapt_rates` (the same rule math as the exact mode). The
Adam/SGD half is written out here by hand. Every path (pure, single-tensor, foreach, fused
kernels where present) must match it; the exact mode is untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch

import metalr
from metalr.functional import SEEK_DEFAULTS, initial_controller, initial_rate
from metalr.functional._controller import DEFAULT_SGD_SEEK_HYPERGRAD_LR, SGD_SEEK_DEFAULTS
from metalr.functional._hypergrad import adapt_rates

B1, B2, EPS = 0.9, 0.999, 1e-8
SHAPES = ((6, 5), (5,), (3, 4))


def _grads(step: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _weights(dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def _rule_state(params, rule, granularity, hypergrad_lr, seek=SEEK_DEFAULTS):
    init = seek["init_scale"] if rule == "seek" and hypergrad_lr != 0 else 1.0
    rates = [initial_rate(p, granularity, init) for p in params]
    ctrls = [initial_controller(p, p.dtype, seek) for p in params]
    return rates, (ctrls if rule == "seek" else None)


def adam_reference(steps, *, lr, rule, granularity, hypergrad_lr, weight_decay=0.0,
                   decoupled=False):  # fmt: skip
    """Lagged AdamHD, float64, written from the equations."""
    params = _weights()
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rates, ctrls = _rule_state(params, rule, granularity, hypergrad_lr)
    for t in range(1, steps + 1):
        grads = _grads(t)
        if weight_decay and not decoupled:
            grads_eff = [g + weight_decay * p for g, p in zip(grads, params)]
        else:
            grads_eff = grads
        prev = max(t - 1, 1)
        d_prev = [
            mi / ((1 - B1**prev) * (vi.sqrt() / (1 - B2**prev) ** 0.5 + EPS))
            for mi, vi in zip(m, v)
        ]
        extra = {"controllers": ctrls, "seek": SEEK_DEFAULTS} if ctrls is not None else {}
        # the hypergradient reads ∇L, as in the exact mode; the decay is Adam's
        update = adapt_rates(
            rates, grads, d_prev, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
            granularity=granularity, lr_bounds=(0.0, float("inf")), **extra,
        )  # fmt: skip
        for i, (p, g) in enumerate(zip(params, grads_eff)):
            m[i] = B1 * m[i] + (1 - B1) * g
            v[i] = B2 * v[i] + (1 - B2) * g * g
            d = m[i] / ((1 - B1**t) * (v[i].sqrt() / (1 - B2**t) ** 0.5 + EPS))
            if decoupled:
                p = p * (1 - lr * weight_decay)
            params[i] = p - lr * rates[i] * d  # the rate from before this step
        rates = update.rates
        ctrls = update.controllers if ctrls is not None else None
    return params, rates


def sgd_reference(steps, *, lr, momentum, rule, granularity, hypergrad_lr):
    """Lagged SGDHD (momentum or plain), float64, written from the equations."""
    params = _weights()
    buf = [torch.zeros_like(p) for p in params]  # b_0 = 0 and b_1 = g_1: the same here
    prev_dir = [torch.zeros_like(p) for p in params]
    rates, ctrls = _rule_state(params, rule, granularity, hypergrad_lr, SGD_SEEK_DEFAULTS)
    for t in range(1, steps + 1):
        grads = _grads(t)
        extra = {"controllers": ctrls, "seek": SGD_SEEK_DEFAULTS} if ctrls is not None else {}
        d_prev = buf if momentum else prev_dir
        update = adapt_rates(
            rates, grads, d_prev, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
            granularity=granularity, lr_bounds=(0.0, float("inf")), **extra,
        )  # fmt: skip
        for i, g in enumerate(grads):
            if momentum:
                buf[i] = momentum * buf[i] + g if t > 1 else g.clone()
                d = buf[i]
            else:
                d = prev_dir[i] = g
            params[i] = params[i] - lr * rates[i] * d
        rates = update.rates
        ctrls = update.controllers if ctrls is not None else None
    return params, rates


def _run_optimizer(make, steps, dtype=torch.float64, nan_at=None):
    params = [torch.nn.Parameter(w) for w in _weights(dtype)]
    opt = make(params)
    for t in range(1, steps + 1):
        for p, g in zip(params, _grads(t, dtype)):
            if t == nan_at and p is params[0]:
                g[0, 0] = float("nan")
            p.grad = g
        opt.step()
    return params, opt


CASES = [
    ("seek", "tensor", None),
    ("seek", "group", None),
    ("seek", "element", None),
    ("normalized", "tensor", 0.05),
    ("normalized", "group", 0.05),
    ("normalized", "element", 0.05),
    ("additive", "tensor", 1e-4),
    ("additive", "element", 1e-4),
]
PATHS = {"foreach": {"foreach": True}, "single": {"foreach": False}}
#: The reference has no moment restart (tests/test_restart_match.py checks it on the lagged path)
NO_RESTART = {"seek": {"seek": {"moment_restart": 0}}}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("rule", "granularity", "beta"), CASES)
def test_adam_lagged_matches_reference(rule, granularity, beta, path):
    lr = 3e-2
    hyper = beta if beta is not None else metalr.functional.DEFAULT_SEEK_HYPERGRAD_LR
    ref_params, ref_rates = adam_reference(
        8, lr=lr, rule=rule, granularity=granularity, hypergrad_lr=hyper
    )
    params, opt = _run_optimizer(
        lambda ps: metalr.AdamHD(
            ps, lr=lr, rule=rule, granularity=granularity, hypergrad_lr=beta, lagged=True,
            **PATHS[path], **NO_RESTART.get(rule, {}),
        ),
        8,
    )  # fmt: skip
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref_rates):
        torch.testing.assert_close(opt.state[p]["lr_multiplier"], r, rtol=1e-10, atol=1e-12)
    assert any((r != 1.0).any() for r in ref_rates)  # the rates really moved


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_lagged_weight_decay_matches_reference(decoupled):
    ref, _ = adam_reference(
        5, lr=1e-2, rule="normalized", granularity="tensor", hypergrad_lr=0.05,
        weight_decay=0.1, decoupled=decoupled,
    )  # fmt: skip
    params, _ = _run_optimizer(
        lambda ps: metalr.AdamHD(
            ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled, rule="normalized",
            hypergrad_lr=0.05, lagged=True,
        ),
        5,
    )  # fmt: skip
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize(("rule", "granularity", "beta"), CASES[:4] + CASES[6:7])
def test_sgd_lagged_matches_reference(rule, granularity, beta, momentum, path):
    lr = 1e-2
    hyper = beta if beta is not None else DEFAULT_SGD_SEEK_HYPERGRAD_LR
    ref_params, ref_rates = sgd_reference(
        7, lr=lr, momentum=momentum, rule=rule, granularity=granularity, hypergrad_lr=hyper
    )
    params, opt = _run_optimizer(
        lambda ps: metalr.SGDHD(
            ps, lr=lr, momentum=momentum, rule=rule, granularity=granularity,
            hypergrad_lr=beta, lagged=True, **PATHS[path],
        ),
        7,
    )  # fmt: skip
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref_rates):
        torch.testing.assert_close(opt.state[p]["lr_multiplier"], r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_lagged_with_hypergrad_lr_zero_is_torch_adam(path):
    ours, _ = _run_optimizer(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, hypergrad_lr=0, lagged=True, **PATHS[path]), 6
    )
    theirs, _ = _run_optimizer(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), 6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", ["AdamHD", "SGDHD"])
@pytest.mark.parametrize("path", list(PATHS))
def test_lagged_skips_non_finite_gradients_per_element(family, path):
    """A NaN gradient entry leaves its own θ and buffers as they were, the rest of the step
    happens, and no multiplier or controller moves."""
    kwargs = {"lagged": True, **PATHS[path]}
    if family == "AdamHD":

        def make(ps):
            return metalr.AdamHD(ps, lr=1e-2, **kwargs)
    else:

        def make(ps):
            return metalr.SGDHD(ps, lr=1e-2, momentum=0.9, **kwargs)

    before, opt = _run_optimizer(make, 3)
    state_before = copy.deepcopy(opt.state_dict())
    weights_before = [p.detach().clone() for p in before]
    grads = _grads(4)
    grads[0][0, 0] = float("nan")
    for p, g in zip(before, grads):
        p.grad = g
    opt.step()
    state_after = opt.state_dict()
    assert torch.isfinite(before[0]).all()
    assert before[0][0, 0] == weights_before[0][0, 0]
    assert (before[0].view(-1)[1:] != weights_before[0].view(-1)[1:]).all()
    for pid, s in state_after["state"].items():
        old = state_before["state"][pid]
        for key in ("lr_multiplier", "hd_controller"):
            assert torch.equal(s[key], old[key]), key
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in s:
                assert torch.isfinite(s[key]).all()
                if pid == 0:
                    assert s[key][0, 0] == old[key][0, 0]


def test_lagged_state_is_adams_and_resumes_bit_exactly():
    def make(ps):
        return metalr.AdamHD(ps, lr=1e-2, lagged=True)

    params, opt = _run_optimizer(make, 4, dtype=torch.float32)
    ref, _ = _run_optimizer(lambda ps: torch.optim.Adam(ps, lr=1e-2), 1, dtype=torch.float32)
    for p in params:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "lr_multiplier",
                                     "hd_controller", "hd_validation",
                                     "hd_follows_validation"}  # fmt: skip
    saved = copy.deepcopy(opt.state_dict())
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(clone)
    resumed.load_state_dict(saved)
    for t in (5, 6, 7):
        for a, b, g in zip(params, clone, _grads(t, torch.float32)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)
    del ref


def test_lagged_must_be_a_bool():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid lagged value: 'yes'; expected True or False"):
        metalr.AdamHD([p], lagged="yes")
    with pytest.raises(ValueError, match="Invalid lagged value: 1"):
        metalr.SGDHD([p], lagged=1)


def test_exact_mode_differs_from_lagged():
    """The flag reaches the step: with the same gradients the exact and lagged runs part."""
    exact, _ = _run_optimizer(lambda ps: metalr.AdamHD(ps, lr=1e-2), 3)
    lagged, _ = _run_optimizer(lambda ps: metalr.AdamHD(ps, lr=1e-2, lagged=True), 3)
    assert not torch.equal(exact[0], lagged[0])
