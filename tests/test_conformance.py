"""Table-driven conformance checks that every optimizer configuration in ``_configs`` must pass.

Each test is parametrized over the table (``CONFIGS``: SGDHD plain/momentum/Nesterov/weight
decay, AdamHD, AdamWHD, and HyperLR around SGD/Adam/RMSprop/Adagrad, each × granularity × rule),
in the spirit of torch's ``OptimizerInfo`` tests and optax's shared optimizer harness.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
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
    all_params,
    mlp_problem,
    param_groups,
    params_for,
    quadratic_problem,
    rates,
    rosenbrock_problem,
    snapshot,
    state_tensors,
    train,
    with_foreach,
)
from torch import Tensor
from torch.optim import lr_scheduler

import metalr

ALL = params_for(CONFIGS)
NATIVE = params_for(NATIVE_CONFIGS)


def _build(cfg: OptimConfig, problem: Problem | None = None, **kwargs: Any):
    """The MLP problem and ``cfg``'s optimizer over it, as three param groups."""
    problem = mlp_problem() if problem is None else problem
    lr = kwargs.get("lr") or cfg.lr()
    return problem, cfg.make(param_groups(problem.params, lr), **kwargs)


def _assert_trees_equal(a: Any, b: Any, path: str = "root") -> None:
    """Structural equality with bit-exact tensors (for state dicts)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_trees_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_trees_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def _assert_all_equal(xs: list[Tensor], ys: list[Tensor]) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x, y), f"tensor {i} differs: max |Δ| = {(x - y).abs().max().item()}"


def _same_tensors(xs: list[Tensor], ys: list[Tensor]) -> bool:
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys, strict=True))


def _adapted(opt: torch.optim.Optimizer) -> bool:
    """Some multiplier moved away from 1 (the adaptation did something)."""
    return any(not torch.all(r == 1) for r in rates(opt))


# ------------------------------------------------------------------------------------------
# 1. goes downhill
# ------------------------------------------------------------------------------------------

PROBLEMS = {
    # name: (factory, steps, final/initial loss must be below)
    "quadratic": (quadratic_problem, 100, 1e-2),
    # Rosenbrock starts at 24.2; the valley floor at the start's x is 4.84 = 0.2 × 24.2, so
    # getting below that means the optimizer also moved along the valley towards (1, 1).
    "rosenbrock": (rosenbrock_problem, 150, 0.2),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("cfg", ALL)
def test_goes_downhill(cfg: OptimConfig, problem: str) -> None:
    factory, steps, fraction = PROBLEMS[problem]
    pb = factory()
    opt = cfg.make(pb.params, problem=problem)
    losses = train(opt, pb.loss, steps)
    final = pb.loss(pb.params).item()
    assert all(math.isfinite(v) for v in losses) and math.isfinite(final)
    assert final < fraction * losses[0], f"{losses[0]:.4g} -> {final:.4g}"
    assert all(torch.isfinite(r).all() for r in rates(opt))


# ------------------------------------------------------------------------------------------
# 2. foreach == single-tensor
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", NATIVE)
def test_foreach_matches_single_tensor(cfg: OptimConfig) -> None:
    runs = []
    for foreach in (False, True):
        pb, opt = _build(cfg, foreach=foreach)
        train(opt, pb.loss, 12)
        runs.append((pb.params, opt))
    (p_single, o_single), (p_multi, o_multi) = runs
    assert _adapted(o_single)
    for a, b in zip(p_single, p_multi, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    s_single, s_multi = state_tensors(o_single), state_tensors(o_multi)
    assert [(i, k) for i, k, _ in s_single] == [(i, k) for i, k, _ in s_multi]
    for (i, key, a), (_, _, b) in zip(s_single, s_multi, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, key)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"state[{i}][{key!r}]")


# ------------------------------------------------------------------------------------------
# 3. state_dict round trip and bit-exact resume
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_state_dict_resume_is_bit_exact(cfg: OptimConfig) -> None:
    n, m = 4, 4
    ref, ref_opt = _build(cfg)
    train(ref_opt, ref.loss, n + m)

    pb, opt = _build(cfg)
    train(opt, pb.loss, n)
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_trees_equal(saved, loaded)

    resumed_params = [p.detach().clone().requires_grad_() for p in pb.params]
    resumed = cfg.make(param_groups(resumed_params, cfg.lr()))
    resumed.load_state_dict(loaded)
    _assert_trees_equal(saved, resumed.state_dict())
    train(resumed, pb.loss, m, start=n, params=resumed_params)

    _assert_all_equal(resumed_params, ref.params)
    ref_eff, res_eff = ref_opt.effective_lrs(), resumed.effective_lrs()
    _assert_all_equal([res_eff[p] for p in resumed_params], [ref_eff[p] for p in ref.params])
    _assert_all_equal(rates(resumed, resumed_params), rates(ref_opt, ref.params))


# ------------------------------------------------------------------------------------------
# 4. deepcopy and pickle
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cfg", ALL)
def test_copy_steps_identically(cfg: OptimConfig, how: str) -> None:
    pb, opt = _build(cfg)
    train(opt, pb.loss, 3)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert type(clone) is type(opt)
    clone_params = all_params(clone)
    assert len(clone_params) == len(pb.params)
    assert all(c is not p for c, p in zip(clone_params, pb.params, strict=True))
    _assert_all_equal([c.detach() for c in clone_params], [p.detach() for p in pb.params])
    if cfg.is_wrapper:
        assert clone.param_groups is clone.optimizer.param_groups
        assert all(c is q for c, q in zip(clone_params, all_params(clone.optimizer), strict=True))
    _assert_trees_equal(snapshot(opt), snapshot(clone))

    train(opt, pb.loss, 3, start=3)
    train(clone, pb.loss, 3, start=3, params=clone_params)
    _assert_all_equal([c.detach() for c in clone_params], [p.detach() for p in pb.params])
    _assert_trees_equal(snapshot(opt), snapshot(clone))
    _assert_all_equal(rates(clone), rates(opt))


# ------------------------------------------------------------------------------------------
# 5. param groups
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_param_groups_with_different_lr_are_independent(cfg: OptimConfig) -> None:
    """Three groups with lr, lr/2, 2 lr step exactly like three one-group optimizers."""
    pb, opt = _build(cfg)
    assert [g["lr"] for g in opt.param_groups] == [cfg.lr(), cfg.lr() * 0.5, cfg.lr() * 2]
    ref = mlp_problem()
    singles = [cfg.make([g]) for g in param_groups(ref.params, cfg.lr())]
    for k in range(6):
        train(opt, pb.loss, 1, start=k)
        for o in singles:
            o.zero_grad()
        ref.loss(ref.params, k).backward()
        for o in singles:
            o.step()
    _assert_all_equal(pb.params, ref.params)
    _assert_all_equal(rates(opt), [r for o in singles for r in rates(o)])
    assert _adapted(opt)


@pytest.mark.parametrize("cfg", ALL)
def test_add_param_group_mid_run(cfg: OptimConfig) -> None:
    pb = mlp_problem()
    first, later = pb.params[:2], pb.params[2:]
    opt = cfg.make([{"params": first}])
    ref_params = [p.detach().clone().requires_grad_() for p in first]
    ref = cfg.make([{"params": ref_params}])
    later_init = [p.detach().clone() for p in later]

    def ref_loss(ps, k):
        return pb.loss(list(ps) + list(later_init), k)

    train(opt, pb.loss, 3, params=pb.params)
    train(ref, ref_loss, 3, params=ref_params)
    assert all(p not in opt.state for p in later)
    _assert_all_equal([p.detach() for p in later], later_init)

    opt.add_param_group({"params": later, "lr": cfg.lr() * 0.5})
    group = opt.param_groups[-1]
    assert _same_tensors(group["params"], later) and group["lr"] == cfg.lr() * 0.5
    assert (group["granularity"], group["rule"]) == (cfg.granularity, cfg.rule)
    assert group["hypergrad_lr"] == cfg.hypergrad_lr()
    if cfg.is_wrapper:  # delegated to the wrapped optimizer, groups still shared
        assert opt.param_groups is opt.optimizer.param_groups
        assert _same_tensors(opt.optimizer.param_groups[-1]["params"], later)

    train(opt, pb.loss, 1, start=3, params=pb.params)
    train(ref, ref_loss, 1, start=3, params=ref_params)
    for p in later:  # the first hypergradient is zero: new rates start (and stay) at exactly 1
        assert torch.equal(
            opt.state[p]["lr_multiplier"], torch.ones_like(opt.state[p]["lr_multiplier"])
        )
    assert all(not torch.equal(p.detach(), q) for p, q in zip(later, later_init, strict=True))
    # the old group carried on as if nothing had been added
    _assert_all_equal([p.detach() for p in first], [p.detach() for p in ref_params])
    _assert_all_equal(rates(opt, first), rates(ref, ref_params))

    losses = train(opt, pb.loss, 4, start=4, params=pb.params)
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.all(r == 1) for r in rates(opt, later))


# ------------------------------------------------------------------------------------------
# 6. LR schedulers compose with the learned multipliers
# ------------------------------------------------------------------------------------------

STEPS = 8


def _cycle_momentum(opt: torch.optim.Optimizer) -> bool:
    return "betas" in opt.defaults or opt.defaults.get("momentum", 0) > 0


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, list[float], bool], Any]] = {
    "StepLR": lambda o, lrs, cyc: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o, lrs, cyc: lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1.0 + 0.5 * k)),
    "OneCycleLR": lambda o, lrs, cyc: lr_scheduler.OneCycleLR(
        o, max_lr=lrs, total_steps=STEPS + 1, cycle_momentum=cyc
    ),
    "CosineAnnealingLR": lambda o, lrs, cyc: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "ReduceLROnPlateau": lambda o, lrs, cyc: lr_scheduler.ReduceLROnPlateau(
        o, factor=0.5, patience=0
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("cfg", ALL)
def test_scheduler_composes(cfg: OptimConfig, scheduler: str) -> None:
    pb, opt = _build(cfg)
    lrs = [g["lr"] for g in opt.param_groups]
    cycle = _cycle_momentum(opt)
    sched = SCHEDULERS[scheduler](opt, lrs, cycle)
    # The same schedule on a plain torch optimizer gives the expected group['lr'] sequence.
    dummy = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs], momentum=0.9
    )
    ref_sched = SCHEDULERS[scheduler](dummy, lrs, cycle)
    dummy.step()  # no gradients: a no-op that keeps the scheduler's step-order check quiet
    for k in range(STEPS):
        train(opt, pb.loss, 1, start=k)
        before = [r.clone() for r in rates(opt)]
        if scheduler == "ReduceLROnPlateau":
            sched.step(1.0)  # never improves: halves the lr every step
            ref_sched.step(1.0)
        else:
            sched.step()
            ref_sched.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in dummy.param_groups]
        _assert_all_equal(rates(opt), before)  # the scheduler leaves the multipliers alone
        eff = opt.effective_lrs()
        for group in opt.param_groups:
            for p in group["params"]:
                assert torch.equal(eff[p], group["lr"] * opt.state[p]["lr_multiplier"])
    assert opt.param_groups[0]["lr"] != lrs[0]  # the schedule did move the lr
    assert _adapted(opt)  # ... and the adaptation survived it
    assert all(torch.isfinite(p).all() for p in pb.params)


@pytest.mark.parametrize("inner", ["SGD", "Adam", "RMSprop"])
def test_one_cycle_lr_cycles_momentum_of_hyperlr(inner: str) -> None:
    """HyperLR's docstring example: OneCycleLR (cycle_momentum=True) on HyperLR(RMSprop)."""
    pb = mlp_problem()
    base = {
        "SGD": lambda: torch.optim.SGD(pb.params, lr=0.05, momentum=0.9),
        "Adam": lambda: torch.optim.Adam(pb.params, lr=0.01),
        "RMSprop": lambda: torch.optim.RMSprop(pb.params, lr=1e-3),
    }[inner]()
    opt = metalr.HyperLR(base)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    key = "betas" if inner == "Adam" else "momentum"
    first = base.param_groups[0][key]
    for k in range(5):
        train(opt, pb.loss, 1, start=k)
        sched.step()
    assert base.param_groups[0][key] != first


@pytest.mark.parametrize("cfg", ALL)
def test_step_uses_lr_times_multiplier(cfg: OptimConfig) -> None:
    """With β = 0, multipliers of 2 step exactly like a doubled scheduled lr.

    Decoupled weight decay follows the scheduled lr only (documented), so AdamWHD's doubled-lr
    twin halves its weight decay to keep ``lr · λ``.
    """
    pa, a = _build(cfg, hypergrad_lr=0.0)
    pb_, b = _build(cfg, hypergrad_lr=0.0)
    train(a, pa.loss, 1)
    train(b, pb_.loss, 1)
    for r in rates(a):
        r.fill_(2.0)
    for group in b.param_groups:
        group["lr"] *= 2
        if cfg.family == "AdamWHD":
            group["weight_decay"] /= 2
    train(a, pa.loss, 5, start=1)
    train(b, pb_.loss, 5, start=1)
    for x, y in zip(pa.params, pb_.params, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert all(torch.all(r == 2) for r in rates(a))
    assert all(torch.all(r == 1) for r in rates(b))


@pytest.mark.parametrize("cfg", ALL)
def test_warmup_from_zero_lr(cfg: OptimConfig) -> None:
    """A schedule starting at lr = 0 (linear warmup): that step moves nothing, rates stay finite
    (the additive rule divides by lr), then training proceeds and adapts."""
    pb, opt = _build(cfg, lr_bounds=(0.0, 1.0))
    sched = lr_scheduler.LambdaLR(opt, lambda k: min(k / 3, 1.0))
    assert all(g["lr"] == 0 for g in opt.param_groups)
    init = [p.detach().clone() for p in pb.params]
    train(opt, pb.loss, 1)
    _assert_all_equal([p.detach() for p in pb.params], init)
    assert all(torch.all(r == 1) for r in rates(opt))
    sched.step()
    losses = []
    for k in range(1, 10):
        losses += train(opt, pb.loss, 1, start=k)
        sched.step()
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(r).all() for r in rates(opt))
    assert _adapted(opt)


@pytest.mark.parametrize("cfg", ALL)
def test_tensor_lr_equals_float_lr(cfg: OptimConfig) -> None:
    pa, a = _build(cfg)
    pb_ = mlp_problem()
    lr = torch.tensor(cfg.lr(), dtype=torch.float64)
    b = cfg.make(pb_.params[:2], lr=lr)
    b.add_param_group({"params": [pb_.params[2]], "lr": lr * 0.5})
    b.add_param_group({"params": [pb_.params[3]], "lr": lr * 2.0})
    train(a, pa.loss, 8)
    train(b, pb_.loss, 8, params=pb_.params)
    for x, y in zip(pa.params, pb_.params, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)
    for x, y in zip(rates(a), rates(b, pb_.params), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=0)


@pytest.mark.parametrize("cfg", ALL)
def test_maximize_is_minimizing_the_negation(cfg: OptimConfig) -> None:
    """maximize=True on -f equals minimizing f, rates included (the hypergradient's sign too)."""
    pa, a = _build(cfg)
    pb_, b = _build(cfg, maximize=True)
    train(a, pa.loss, 8)
    train(b, lambda ps, k: -pb_.loss(ps, k), 8, params=pb_.params)
    for x, y in zip(pa.params, pb_.params, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for x, y in zip(rates(a), rates(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
    assert _adapted(a)


# ------------------------------------------------------------------------------------------
# 7. closure
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_closure(cfg: OptimConfig) -> None:
    pa, a = _build(cfg)
    pb_, b = _build(cfg)
    for k in range(4):

        def closure(pb=pa, opt=a, k=k):
            opt.zero_grad()
            loss = pb.loss(pb.params, k)
            loss.backward()
            return loss

        returned = a.step(closure)
        b.zero_grad()
        expected = pb_.loss(pb_.params, k)
        expected.backward()
        b.step()
        assert isinstance(returned, Tensor) and torch.equal(returned.detach(), expected.detach())
    _assert_all_equal(pa.params, pb_.params)
    _assert_all_equal(rates(a), rates(b))


# ------------------------------------------------------------------------------------------
# 8. zero_grad; parameters without a gradient
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("cfg", ALL)
def test_zero_grad_and_params_without_grad(cfg: OptimConfig, set_to_none: bool) -> None:
    pb = mlp_problem()
    unused = torch.arange(3, dtype=torch.float64).requires_grad_()
    groups = param_groups(pb.params, cfg.lr())
    groups[0]["params"].append(unused)
    opt = cfg.make(groups)
    train(opt, pb.loss, 3, params=pb.params)
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.arange(3, dtype=torch.float64))
    assert unused not in opt.state  # (a wrapped torch.optim.Adagrad fills its own state eagerly)

    grads = [p.grad for p in pb.params]
    opt.zero_grad(set_to_none=set_to_none)
    before_params = [p.detach().clone() for p in pb.params]
    before_state = snapshot(opt)
    if set_to_none:
        assert all(p.grad is None for p in pb.params)
        opt.step()  # nothing has a gradient: nothing changes
        _assert_all_equal([p.detach() for p in pb.params], before_params)
        _assert_trees_equal(snapshot(opt), before_state)
    else:
        assert all(p.grad is g for p, g in zip(pb.params, grads, strict=True))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in pb.params)
        old_rates = [r.clone() for r in rates(opt, pb.params)]
        opt.step()  # a zero gradient carries no hypergradient signal
        _assert_all_equal(rates(opt, pb.params), old_rates)
        assert all(torch.isfinite(p).all() for p in pb.params)
    assert unused.grad is None and unused not in opt.state


@pytest.mark.parametrize("cls", ["SGDHD", "AdamHD", "AdamWHD", "HyperLR"])
def test_reading_effective_lrs_creates_no_state(cls: str) -> None:
    """``effective_lrs``/``lr_summary`` are read-only: they must not add state for params never
    stepped (that state would then show up in ``state_dict()``)."""
    cfg = next(c for c in CONFIGS if c.family == cls)
    pb = mlp_problem()
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = cfg.make([{"params": [*pb.params, unused]}])
    train(opt, pb.loss, 2, params=pb.params)
    eff = opt.effective_lrs()
    assert torch.equal(eff[unused], torch.tensor(cfg.lr(), dtype=torch.float64))
    opt.lr_summary()
    assert unused not in opt.state
    assert len(opt.state_dict()["state"]) == len(pb.params)


# ------------------------------------------------------------------------------------------
# 9. dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cfg", "foreach"), with_foreach(CONFIGS))
def test_dtype_is_kept(cfg: OptimConfig, foreach: bool | None, dtype: torch.dtype) -> None:
    kwargs = {} if foreach is None else {"foreach": foreach}
    pb, opt = _build(cfg, problem=mlp_problem(dtype=dtype), **kwargs)
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
        else:
            assert t.dtype == dtype and t.shape == p.shape, key
        assert torch.isfinite(t).all(), key
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
    assert _adapted(oc)


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
    _assert_all_equal([p.detach() for p in pb.params], before_params)
    _assert_all_equal(rates(opt), before_rates)
    if not cfg.is_wrapper:  # the whole step is skipped: moments, buffers and step counts too
        _assert_trees_equal(snapshot(opt), before_state)
    if cfg.is_wrapper and not cfg.inner_is_stateless:
        return  # the wrapped optimizer's own state took the NaN (documented: its business)
    losses = train(opt, pb.loss, 5, start=4)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in pb.params)
    assert all(torch.isfinite(t).all() for _, _, t in state_tensors(opt))
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
    pb, opt = _build(cfg)  # three param groups
    train(opt, pb.loss, 3)
    opt.zero_grad()
    pb.loss(pb.params, 3).backward()
    pb.params[0].grad[1, 2] = math.nan  # group 0 only
    before = [p.detach().clone() for p in pb.params]
    before_rates = [r.clone() for r in rates(opt)]
    opt.step()
    _assert_all_equal([p.detach() for p in pb.params], before)
    _assert_all_equal(rates(opt), before_rates)


# ------------------------------------------------------------------------------------------
# 12. lr_bounds
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_rates_stay_within_lr_bounds(cfg: OptimConfig) -> None:
    lo, hi, lr = 1e-4, 1e-2, 1e-3
    beta = 1.0 if cfg.rule == "normalized" else 0.1  # aggressive
    pb, opt = _build(cfg, lr=lr, hypergrad_lr=beta, lr_bounds=(lo, hi))
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
    pw, w = _build(cfg)
    pn, n = _build(native)
    train(w, pw.loss, 15)
    train(n, pn.loss, 15)
    for a, b in zip(pw.params, pn.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(rates(w), rates(n), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    assert _adapted(w)


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
