"""The hypergradient each rule uses equals dL(θ_t)/dα_{t-1} by autograd and by finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from metalr.functional import (
    adam_direction,
    adam_hd_step,
    hypergradient,
    sgd_hd_step,
)

GRANULARITIES = ["group", "tensor", "element"]
BOUNDS = (0.0, math.inf)


def _problem(seed: int = 0):
    """A small tanh MLP regression in float64 with non-degenerate data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model = model.double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]

    def loss_fn(params):
        out = functional_call(model, dict(zip(names, params)), (x,))
        return ((out - y) ** 2).mean()

    params = [p.detach().clone() for p in model.parameters()]
    return params, loss_fn


def _grads(loss_fn, params):
    with torch.enable_grad():
        params = [p.detach().requires_grad_() for p in params]
        return list(torch.autograd.grad(loss_fn(params), params))


def _leaf_rates(params, granularity, value=0.7):
    """Multipliers as leaves; "group" shares one leaf across tensors."""
    if granularity == "group":
        leaf = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        return [leaf], [leaf for _ in params]
    shapes = [p.shape if granularity == "element" else () for p in params]
    leaves = [torch.full(s, value, dtype=torch.float64, requires_grad=True) for s in shapes]
    return leaves, leaves


SGD_VARIANTS = {
    "plain": {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "momentum": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "nesterov": False},
    "nesterov": {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": True},
}
ADAM_VARIANTS = {
    "adam": {"weight_decay": 0.0, "decoupled_weight_decay": False},
    "adam_l2": {"weight_decay": 0.05, "decoupled_weight_decay": False},
    "adamw": {"weight_decay": 0.05, "decoupled_weight_decay": True},
}


def _sgd_state_and_step(variant, granularity):
    """Warm the state up with 3 steps, then return (state_{t-1}, step(rates) -> state_t)."""
    params, loss_fn = _problem()
    hyper = dict(lr=0.05, hypergrad_lr=0.0, rule="additive", granularity=granularity,
                 lr_bounds=BOUNDS, **SGD_VARIANTS[variant])  # fmt: skip
    state = (params, [None] * len(params), [None] * len(params),
             [torch.ones(p.shape if granularity == "element" else (), dtype=torch.float64)
              for p in params])  # fmt: skip
    for _ in range(3):
        state = sgd_hd_step(state[0], _grads(loss_fn, state[0]), *state[1:], **hyper)

    def step(rates):
        p, bufs, dirs, _ = state
        return sgd_hd_step(p, _grads(loss_fn, p), bufs, dirs, rates, **hyper)

    def direction(new):  # d_t as the next step's hypergradient will read it
        if SGD_VARIANTS[variant]["momentum"] != 0 and not SGD_VARIANTS[variant]["nesterov"]:
            return new.momentum_buffers
        return new.prev_directions

    return loss_fn, hyper["lr"], step, direction, state[0]


def _adam_state_and_step(variant, granularity):
    params, loss_fn = _problem()
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8, hypergrad_lr=0.0, rule="additive",
                 granularity=granularity, lr_bounds=BOUNDS, **ADAM_VARIANTS[variant])  # fmt: skip
    zeros = [torch.zeros_like(p) for p in params]
    rates = [torch.ones(p.shape if granularity == "element" else (), dtype=torch.float64)
             for p in params]  # fmt: skip
    state = (params, list(zeros), [z.clone() for z in zeros], rates,
             [torch.zeros((), dtype=torch.float32) for _ in params])  # fmt: skip
    for _ in range(3):
        state = adam_hd_step(state[0], _grads(loss_fn, state[0]), *state[1:], **hyper)

    def step(rates):
        p, m, v, _, s = state
        return adam_hd_step(p, _grads(loss_fn, p), m, v, rates, s, **hyper)

    def direction(new):
        return [adam_direction(m, v, s, 0.9, 0.99, 1e-8)
                for m, v, s in zip(new.exp_avgs, new.exp_avg_sqs, new.steps)]  # fmt: skip

    return loss_fn, hyper["lr"], step, direction, state[0]


CASES = [("sgd", v) for v in SGD_VARIANTS] + [("adam", v) for v in ADAM_VARIANTS]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("family,variant", CASES)
def test_rule_hypergradient_equals_autograd_and_finite_differences(family, variant, granularity):
    build = _sgd_state_and_step if family == "sgd" else _adam_state_and_step
    loss_fn, lr, step, direction, _ = build(variant, granularity)
    leaves, rates = _leaf_rates(_problem()[0], granularity)

    new = step(rates)
    loss = loss_fn(new.params)
    autograd = torch.autograd.grad(loss, leaves)

    # What the next step's rule uses: -<g_t, d_{t-1}>, per rate (w.r.t. the effective rate α = lr·m).
    g_t = _grads(loss_fn, [p.detach() for p in new.params])
    used = hypergradient(g_t, [d.detach() for d in direction(new)], granularity)
    used = used[:1] if granularity == "group" else used
    for a, u in zip(autograd, used):
        torch.testing.assert_close(a / lr, u, rtol=1e-9, atol=1e-12)
        assert u.abs().max() > 1e-8  # non-degenerate: the comparison means something

    # Central finite differences of L(θ_t(m)) in each multiplier (first few entries).
    h = 1e-6
    for leaf, a in zip(leaves, autograd):
        flat = leaf.detach().reshape(-1)
        for i in range(min(flat.numel(), 3)):

            def loss_at(delta, i=i, leaf=leaf):
                shifted = [r.detach().clone() for r in leaves]
                idx = next(j for j, r in enumerate(leaves) if r is leaf)
                shifted[idx].view(-1)[i] += delta
                rs = shifted * len(rates) if granularity == "group" else shifted
                with torch.no_grad():
                    return loss_fn(step(rs).params).item()

            fd = (loss_at(h) - loss_at(-h)) / (2 * h)
            assert fd == pytest.approx(a.reshape(-1)[i].item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("granularity", ["group", "tensor"])
def test_additive_rule_is_the_papers_update(granularity):
    """α_t = α_{t-1} + β<g_t, d_{t-1}> exactly, i.e. m_t = m_{t-1} - β h / lr."""
    loss_fn, lr, _, direction, params = _adam_state_and_step("adam", granularity)
    hyper = {"lr": lr, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0,
                 "decoupled_weight_decay": False, "rule": "additive", "granularity": granularity,
                 "lr_bounds": BOUNDS}  # fmt: skip
    zeros = [torch.zeros_like(p) for p in params]
    state = (params, zeros, [z.clone() for z in zeros],
             [torch.ones((), dtype=torch.float64) for _ in params],
             [torch.zeros((), dtype=torch.float32) for _ in params])  # fmt: skip
    state = adam_hd_step(state[0], _grads(loss_fn, state[0]), *state[1:], hypergrad_lr=0.0, **hyper)
    g = _grads(loss_fn, state.params)
    h = hypergradient(g, direction(state), granularity)
    beta = 1e-3
    new = adam_hd_step(state.params, g, *state[1:], hypergrad_lr=beta, **hyper)
    for m_new, h_i in zip(new.rates, h):
        torch.testing.assert_close(m_new, 1.0 - beta * h_i / lr, rtol=1e-12, atol=0)


def test_normalized_rule_uses_the_cosine():
    """log m_t = log m_{t-1} + β cos(g_t, d_{t-1}) per tensor."""
    loss_fn, lr, _, _, params = _sgd_state_and_step("plain", "tensor")
    g_prev = _grads(loss_fn, params)
    rates = [torch.ones((), dtype=torch.float64) for _ in params]
    hyper = {"lr": lr, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
                 "rule": "normalized", "granularity": "tensor", "lr_bounds": BOUNDS}  # fmt: skip
    s1 = sgd_hd_step(params, g_prev, [None] * 4, [None] * 4, rates, hypergrad_lr=0.1, **hyper)
    assert all(r.item() == 1.0 for r in s1.rates)  # no previous direction: no change
    g = _grads(loss_fn, s1.params)
    s2 = sgd_hd_step(s1.params, g, *s1[1:], hypergrad_lr=0.1, **hyper)
    for rate, gi, di in zip(s2.rates, g, g_prev):
        cos = torch.dot(gi.reshape(-1), di.reshape(-1)) / (gi.norm() * di.norm())
        torch.testing.assert_close(rate, torch.exp(0.1 * cos), rtol=1e-12, atol=0)


def test_meta_gradient_through_two_steps_reaches_rates_and_hypergrad_lr():
    """The pure step is differentiable in the initial rates and in a per-tensor hypergrad_lr."""
    params, loss_fn = _problem()
    log_rates = torch.zeros(len(params), dtype=torch.float64, requires_grad=True)
    betas = torch.full((len(params),), 0.05, dtype=torch.float64, requires_grad=True)
    zeros = [torch.zeros_like(p) for p in params]
    state = (params, zeros, [z.clone() for z in zeros], list(log_rates.exp().unbind()),
             [torch.zeros((), dtype=torch.float32) for _ in params])  # fmt: skip
    for _ in range(3):
        p = state[0]
        g = torch.autograd.grad(loss_fn(p), p, create_graph=True) if p[0].requires_grad else None
        if g is None:
            p = [q.requires_grad_() for q in p]
            g = torch.autograd.grad(loss_fn(p), p, create_graph=True)
        state = adam_hd_step(p, list(g), *state[1:], lr=0.02, beta1=0.9, beta2=0.99, eps=1e-8,
                             weight_decay=0.0, decoupled_weight_decay=False,
                             hypergrad_lr=list(betas.unbind()), rule="normalized",
                             granularity="tensor", lr_bounds=BOUNDS)  # fmt: skip
    d_rates, d_betas = torch.autograd.grad(loss_fn(state.params), (log_rates, betas))
    assert torch.isfinite(d_rates).all() and d_rates.abs().sum() > 0
    assert torch.isfinite(d_betas).all() and d_betas.abs().sum() > 0
