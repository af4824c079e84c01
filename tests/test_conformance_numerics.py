"""Table-driven conformance checks, part 2 (part 1, the ``torch.optim.Optimizer`` contract, and
the table's description are ``test_conformance.py``): dtypes, complex parameters, non-finite
gradients, ``lr_bounds``, ``hypergrad_lr = 0`` against ``torch.optim``, sparse gradients."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _configs import (
    CONFIGS,
    GRANULARITIES,
    NATIVE_CONFIGS,
    RULES,
    WRAPPER_CONFIGS,
    OptimConfig,
    Problem,
    adapted,
    all_params,
    assert_all_equal,
    assert_same_trajectory,
    assert_trees_equal,
    build,
    mlp_problem,
    param_groups,
    params_for,
    rates,
    snapshot,
    state_entry_is_sound,
    state_tensors,
    train,
    with_foreach,
)

import metalr
from metalr.optim._state_keys import CONTROLLER_KEY, SPIKE_KEY, VALIDATION_KEY

ALL = params_for(CONFIGS)
NATIVE = params_for(NATIVE_CONFIGS)


# ------------------------------------------------------------------------------------------
# 9. dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cfg", "foreach"), with_foreach(CONFIGS))
def test_dtype_is_kept(cfg: OptimConfig, foreach: bool | None, dtype: torch.dtype) -> None:
    kwargs = {} if foreach is None else {"foreach": foreach}
    pb, opt = build(cfg, problem=mlp_problem(dtype=dtype), **kwargs)
    losses = train(opt, pb.loss, 5)
    assert all(math.isfinite(v) for v in losses)
    rate_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    params = all_params(opt)
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
    seen = set()
    for i, key, t in state_tensors(opt):
        seen.add(key)
        p = params[i]
        if key == "lr_multiplier":
            assert t.dtype == rate_dtype, key
            assert t.shape == (p.shape if cfg.granularity == "element" else ())
        elif key == "step":
            assert t.dtype == torch.float32  # as torch.optim.Adam
        elif key in (CONTROLLER_KEY, VALIDATION_KEY, SPIKE_KEY):  # small vectors per tensor
            assert t.dtype == rate_dtype and t.dim() == 1, key
        else:
            assert t.dtype == dtype and t.shape == p.shape, key
        assert state_entry_is_sound(key, t), key
    assert "lr_multiplier" in seen
    eff = opt.effective_lrs()
    assert all(eff[p].dtype == rate_dtype for p in params)


# ------------------------------------------------------------------------------------------
# 10. complex parameters
# ------------------------------------------------------------------------------------------


def _complex_problem(as_real: bool) -> Problem:
    """A complex tensor (3 elements) and a real one; the loss reads the complex one's real view."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, generator=g, dtype=torch.complex128)
    w = torch.randn(2, generator=g, dtype=torch.float64)
    a = torch.randn(6, 8, generator=g, dtype=torch.float64) / 3
    b = torch.randn(6, generator=g, dtype=torch.float64)
    first = torch.view_as_real(z).clone() if as_real else z.clone()
    params = [first.requires_grad_(), w.clone().requires_grad_()]

    def loss(ps, k=0):
        zr = torch.view_as_real(ps[0]) if ps[0].is_complex() else ps[0]
        x = torch.cat([zr.reshape(-1), ps[1]])
        return ((torch.tanh(a @ x) - b) ** 2).mean() + 0.1 * (x**2).sum() * (1 + k % 2)

    return Problem(params, loss)


@pytest.mark.parametrize(
    ("cfg", "foreach"), with_foreach([c for c in CONFIGS if c.granularity != "element"])
)
def test_complex_equals_real_view(cfg: OptimConfig, foreach: bool | None) -> None:
    kwargs = {} if foreach is None else {"foreach": foreach}
    pc, pr = _complex_problem(as_real=False), _complex_problem(as_real=True)
    oc, or_ = cfg.make(pc.params, **kwargs), cfg.make(pr.params, **kwargs)
    train(oc, pc.loss, 8)
    train(or_, pr.loss, 8)
    assert pc.params[0].is_complex()
    torch.testing.assert_close(
        torch.view_as_real(pc.params[0].detach()), pr.params[0].detach(), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(pc.params[1], pr.params[1], rtol=1e-10, atol=1e-12)
    for rc, rr in zip(rates(oc), rates(or_), strict=True):
        assert rc.dtype == torch.float64 and rc.shape == ()
        torch.testing.assert_close(rc, rr, rtol=1e-10, atol=0)
    assert adapted(oc)


@pytest.mark.parametrize(
    ("cfg", "foreach"), with_foreach([c for c in CONFIGS if c.granularity == "element"])
)
def test_complex_element_granularity_has_one_rate_per_element(
    cfg: OptimConfig, foreach: bool | None
) -> None:
    pb = _complex_problem(as_real=False)
    opt = cfg.make(pb.params, **({} if foreach is None else {"foreach": foreach}))
    losses = train(opt, pb.loss, 20)
    z = pb.params[0]
    rate = opt.state[z]["lr_multiplier"]
    assert rate.shape == z.shape and rate.dtype == torch.float64
    assert torch.isfinite(rate).all() and not torch.all(rate == 1)
    assert z.dtype == torch.complex128 and torch.isfinite(torch.view_as_real(z)).all()
    assert pb.loss(pb.params, 20).item() < losses[0]


# ------------------------------------------------------------------------------------------
# 11. non-finite gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(("cfg", "foreach"), with_foreach(CONFIGS))
def test_non_finite_gradient_skips_the_step(
    cfg: OptimConfig, foreach: bool | None, bad: float
) -> None:
    """One param group of four tensors; NaN/±inf lands in the first tensor's gradient."""
    kwargs = {} if foreach is None else {"foreach": foreach}
    pb = mlp_problem()
    opt = cfg.make(pb.params, **kwargs)
    train(opt, pb.loss, 3)
    opt.zero_grad()
    pb.loss(pb.params, 3).backward()
    pb.params[0].grad[1, 2] = bad
    pb.params[0].grad[0, 0] = -bad
    before_params = [p.detach().clone() for p in pb.params]
    before_state = snapshot(opt)
    before_rates = [r.clone() for r in rates(opt)]
    opt.step()
    assert_all_equal([p.detach() for p in pb.params], before_params)
    assert_all_equal(rates(opt), before_rates)
    if not cfg.is_wrapper:  # the whole step is skipped: moments, buffers and step counts too
        assert_trees_equal(snapshot(opt), before_state)
    if cfg.is_wrapper and not cfg.inner_is_stateless:
        return  # the wrapped optimizer's own state took the NaN (documented: its business)
    losses = train(opt, pb.loss, 5, start=4)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in pb.params)
    assert all(state_entry_is_sound(k, t) for _, k, t in state_tensors(opt))
    assert not torch.equal(pb.params[0].detach(), before_params[0])


@pytest.mark.parametrize(
    "cfg",
    params_for(
        [
            next(c for c in CONFIGS if c.family == f)
            for f in ("SGDHD", "AdamHD", "AdamWHD", "HyperLR")
        ]
    ),
)
def test_non_finite_gradient_skips_the_whole_step_across_groups(cfg: OptimConfig) -> None:
    """The docstrings promise the *step* is skipped ("skipped entirely"), as GradScaler does: a
    NaN in one param group must not let the other groups advance."""
    pb, opt = build(cfg)  # three param groups
    train(opt, pb.loss, 3)
    opt.zero_grad()
    pb.loss(pb.params, 3).backward()
    pb.params[0].grad[1, 2] = math.nan  # group 0 only
    before = [p.detach().clone() for p in pb.params]
    before_rates = [r.clone() for r in rates(opt)]
    opt.step()
    assert_all_equal([p.detach() for p in pb.params], before)
    assert_all_equal(rates(opt), before_rates)


# ------------------------------------------------------------------------------------------
# 12. lr_bounds
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_rates_stay_within_lr_bounds(cfg: OptimConfig) -> None:
    lo, hi, lr = 1e-4, 1e-2, 1e-3
    beta = 1.0 if cfg.rule == "normalized" else 0.1  # aggressive
    pb, opt = build(cfg, lr=lr, hypergrad_lr=beta, lr_bounds=(lo, hi))
    touched = set()
    for k in range(25):
        train(opt, pb.loss, 1, start=k)
        eff = opt.effective_lrs()
        for group in opt.param_groups:
            for p in group["params"]:
                used = group["lr"] * opt.state[p]["lr_multiplier"]  # the rate the step applies
                assert torch.isfinite(used).all()
                assert used.min().item() >= lo * (1 - 1e-12), used.min().item()
                assert used.max().item() <= hi * (1 + 1e-12), used.max().item()
                torch.testing.assert_close(eff[p], used, rtol=1e-12, atol=0)
                if used.min().item() <= lo * (1 + 1e-9):
                    touched.add("lo")
                if used.max().item() >= hi * (1 - 1e-9):
                    touched.add("hi")
    assert touched, "the aggressive hypergrad_lr never reached a bound: the test is vacuous"
    assert all(torch.isfinite(p).all() for p in pb.params)


# ------------------------------------------------------------------------------------------
# 13. hypergrad_lr = 0 equals torch.optim
# ------------------------------------------------------------------------------------------

# name: (metalr class or None for HyperLR, torch class, shared kwargs, lr, objective sign)
REFERENCES: dict[str, tuple[Any, type[torch.optim.Optimizer], dict[str, Any], float, float]] = {
    "SGD": (metalr.SGDHD, torch.optim.SGD, {}, 0.1, 1.0),
    "SGD-momentum": (metalr.SGDHD, torch.optim.SGD, {"momentum": 0.9}, 0.05, 1.0),
    "SGD-nesterov": (metalr.SGDHD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, 0.05, 1.0),
    "SGD-dampening-wd": (
        metalr.SGDHD, torch.optim.SGD,
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-2}, 0.05, 1.0,
    ),
    "SGD-maximize": (
        metalr.SGDHD, torch.optim.SGD, {"momentum": 0.9, "maximize": True}, 0.05, -1.0,
    ),
    "Adam": (metalr.AdamHD, torch.optim.Adam, {}, 0.01, 1.0),
    "Adam-wd": (metalr.AdamHD, torch.optim.Adam, {"weight_decay": 1e-2}, 0.01, 1.0),
    "Adam-maximize": (metalr.AdamHD, torch.optim.Adam, {"maximize": True}, 0.01, -1.0),
    "AdamW": (metalr.AdamWHD, torch.optim.AdamW, {"weight_decay": 1e-2}, 0.01, 1.0),
    "HyperLR(SGD)": (None, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-2}, 0.05, 1.0),
    "HyperLR(Adam)": (None, torch.optim.Adam, {"weight_decay": 1e-2}, 0.01, 1.0),
    "HyperLR(RMSprop)": (None, torch.optim.RMSprop, {"momentum": 0.5, "centered": True}, 1e-3, 1.0),
    "HyperLR(Adagrad)": (None, torch.optim.Adagrad, {"lr_decay": 1e-2}, 0.05, 1.0),
}  # fmt: skip


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_zero_hypergrad_lr_equals_torch(
    name: str, granularity: str, rule: str, foreach: bool
) -> None:
    cls, torch_cls, kwargs, lr, sign = REFERENCES[name]
    kwargs = {**kwargs, "foreach": foreach}
    hyper = {"hypergrad_lr": 0.0, "granularity": granularity, "rule": rule}
    pm, pt = mlp_problem(), mlp_problem()
    init = [p.detach().clone() for p in pm.params]
    groups_m, groups_t = param_groups(pm.params, lr), param_groups(pt.params, lr)
    if cls is None:
        opt = metalr.HyperLR(torch_cls(groups_m, lr=lr, **kwargs), **hyper)
    else:
        opt = cls(groups_m, lr=lr, **kwargs, **hyper)
    ref = torch_cls(groups_t, lr=lr, **kwargs)

    def objective(ps, k):
        return sign * pm.loss(ps, k)

    train(opt, objective, 20)
    train(ref, objective, 20, params=pt.params)
    for p, q, p0 in zip(pm.params, pt.params, init, strict=True):
        torch.testing.assert_close(p.detach() - p0, q.detach() - p0, rtol=1e-10, atol=1e-13)
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(pm.params, init, strict=True))
    assert all(torch.all(r == 1) for r in rates(opt))
    if cls is not None:  # the moments/buffers torch also keeps are the same
        for p, q in zip(pm.params, pt.params, strict=True):
            for key, value in ref.state[q].items():
                torch.testing.assert_close(
                    opt.state[p][key], value, rtol=1e-10, atol=1e-13, msg=key
                )


# HyperLR's docstring: "Around torch.optim.SGD this is exactly SGDHD; around torch.optim.Adam
# (without weight decay) exactly AdamHD" -- with the adaptation on.
@pytest.mark.parametrize(
    "cfg",
    params_for([c for c in WRAPPER_CONFIGS if c.variant in ("SGD", "Adam")]),
)
def test_hyperlr_matches_native_optimizer(cfg: OptimConfig) -> None:
    native = next(
        c for c in NATIVE_CONFIGS
        if c.family == {"SGD": "SGDHD", "Adam": "AdamHD"}[cfg.variant]
        and c.variant in ("plain", "default")
        and (c.granularity, c.rule) == (cfg.granularity, cfg.rule)
    )  # fmt: skip
    pw, w = build(cfg)
    pn, n = build(native)
    train(w, pw.loss, 15)
    train(n, pn.loss, 15)
    assert_same_trajectory(pw.params, w, pn.params, n, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 14. sparse gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_sparse_gradients_raise(cfg: OptimConfig) -> None:
    emb = torch.nn.Embedding(5, 3, sparse=True).double()
    before = emb.weight.detach().clone()
    opt = cfg.make(list(emb.parameters()))
    emb(torch.tensor([0, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
