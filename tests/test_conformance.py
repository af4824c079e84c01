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
    NATIVE_CONFIGS,
    OptimConfig,
    adapted,
    all_params,
    assert_all_equal,
    assert_same_trajectory,
    assert_trees_equal,
    build,
    mlp_problem,
    param_groups,
    params_for,
    quadratic_problem,
    rates,
    rosenbrock_problem,
    same_tensors,
    snapshot,
    state_tensors,
    train,
)
from torch import Tensor
from torch.optim import lr_scheduler

import metalr

ALL = params_for(CONFIGS)
NATIVE = params_for(NATIVE_CONFIGS)


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
        pb, opt = build(cfg, foreach=foreach)
        train(opt, pb.loss, 12)
        runs.append((pb.params, opt))
    (p_single, o_single), (p_multi, o_multi) = runs
    assert adapted(o_single)
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
    ref, ref_opt = build(cfg)
    train(ref_opt, ref.loss, n + m)

    pb, opt = build(cfg)
    train(opt, pb.loss, n)
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_trees_equal(saved, loaded)

    resumed_params = [p.detach().clone().requires_grad_() for p in pb.params]
    resumed = cfg.make(param_groups(resumed_params, cfg.lr()))
    resumed.load_state_dict(loaded)
    assert_trees_equal(saved, resumed.state_dict())
    train(resumed, pb.loss, m, start=n, params=resumed_params)

    assert_all_equal(resumed_params, ref.params)
    ref_eff, res_eff = ref_opt.effective_lrs(), resumed.effective_lrs()
    assert_all_equal([res_eff[p] for p in resumed_params], [ref_eff[p] for p in ref.params])
    assert_all_equal(rates(resumed, resumed_params), rates(ref_opt, ref.params))


# ------------------------------------------------------------------------------------------
# 4. deepcopy and pickle
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cfg", ALL)
def test_copy_steps_identically(cfg: OptimConfig, how: str) -> None:
    pb, opt = build(cfg)
    train(opt, pb.loss, 3)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert type(clone) is type(opt)
    clone_params = all_params(clone)
    assert len(clone_params) == len(pb.params)
    assert all(c is not p for c, p in zip(clone_params, pb.params, strict=True))
    assert_all_equal([c.detach() for c in clone_params], [p.detach() for p in pb.params])
    if cfg.is_wrapper:
        assert clone.param_groups is clone.optimizer.param_groups
        assert all(c is q for c, q in zip(clone_params, all_params(clone.optimizer), strict=True))
    assert_trees_equal(snapshot(opt), snapshot(clone))

    train(opt, pb.loss, 3, start=3)
    train(clone, pb.loss, 3, start=3, params=clone_params)
    assert_all_equal([c.detach() for c in clone_params], [p.detach() for p in pb.params])
    assert_trees_equal(snapshot(opt), snapshot(clone))
    assert_all_equal(rates(clone), rates(opt))


# ------------------------------------------------------------------------------------------
# 5. param groups
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_param_groups_with_different_lr_are_independent(cfg: OptimConfig) -> None:
    """Three groups with lr, lr/2, 2 lr step exactly like three one-group optimizers."""
    pb, opt = build(cfg)
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
    assert_all_equal(pb.params, ref.params)
    assert_all_equal(rates(opt), [r for o in singles for r in rates(o)])
    assert adapted(opt)


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
    assert_all_equal([p.detach() for p in later], later_init)

    opt.add_param_group({"params": later, "lr": cfg.lr() * 0.5})
    group = opt.param_groups[-1]
    assert same_tensors(group["params"], later) and group["lr"] == cfg.lr() * 0.5
    assert (group["granularity"], group["rule"]) == (cfg.granularity, cfg.rule)
    assert group["hypergrad_lr"] == cfg.hypergrad_lr()
    if cfg.is_wrapper:  # delegated to the wrapped optimizer, groups still shared
        assert opt.param_groups is opt.optimizer.param_groups
        assert same_tensors(opt.optimizer.param_groups[-1]["params"], later)

    train(opt, pb.loss, 1, start=3, params=pb.params)
    train(ref, ref_loss, 1, start=3, params=ref_params)
    for p in later:  # the first hypergradient is zero: new rates start (and stay) at exactly 1
        assert torch.equal(
            opt.state[p]["lr_multiplier"], torch.ones_like(opt.state[p]["lr_multiplier"])
        )
    assert all(not torch.equal(p.detach(), q) for p, q in zip(later, later_init, strict=True))
    # the old group carried on as if nothing had been added
    assert_all_equal([p.detach() for p in first], [p.detach() for p in ref_params])
    assert_all_equal(rates(opt, first), rates(ref, ref_params))

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
    pb, opt = build(cfg)
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
        assert_all_equal(rates(opt), before)  # the scheduler leaves the multipliers alone
        eff = opt.effective_lrs()
        for group in opt.param_groups:
            for p in group["params"]:
                assert torch.equal(eff[p], group["lr"] * opt.state[p]["lr_multiplier"])
    assert opt.param_groups[0]["lr"] != lrs[0]  # the schedule did move the lr
    assert adapted(opt)  # ... and the adaptation survived it
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
    pa, a = build(cfg, hypergrad_lr=0.0)
    pb_, b = build(cfg, hypergrad_lr=0.0)
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
    pb, opt = build(cfg, lr_bounds=(0.0, 1.0))
    sched = lr_scheduler.LambdaLR(opt, lambda k: min(k / 3, 1.0))
    assert all(g["lr"] == 0 for g in opt.param_groups)
    init = [p.detach().clone() for p in pb.params]
    train(opt, pb.loss, 1)
    assert_all_equal([p.detach() for p in pb.params], init)
    assert all(torch.all(r == 1) for r in rates(opt))
    sched.step()
    losses = []
    for k in range(1, 10):
        losses += train(opt, pb.loss, 1, start=k)
        sched.step()
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(r).all() for r in rates(opt))
    assert adapted(opt)


@pytest.mark.parametrize("cfg", ALL)
def test_tensor_lr_equals_float_lr(cfg: OptimConfig) -> None:
    pa, a = build(cfg)
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
    pa, a = build(cfg)
    pb_, b = build(cfg, maximize=True)
    train(a, pa.loss, 8)
    train(b, lambda ps, k: -pb_.loss(ps, k), 8, params=pb_.params)
    assert_same_trajectory(pa.params, a, pb_.params, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# 7. closure
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", ALL)
def test_closure(cfg: OptimConfig) -> None:
    pa, a = build(cfg)
    pb_, b = build(cfg)
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
    assert_all_equal(pa.params, pb_.params)
    assert_all_equal(rates(a), rates(b))


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
        assert_all_equal([p.detach() for p in pb.params], before_params)
        assert_trees_equal(snapshot(opt), before_state)
    else:
        assert all(p.grad is g for p, g in zip(pb.params, grads, strict=True))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in pb.params)
        old_rates = [r.clone() for r in rates(opt, pb.params)]
        opt.step()  # a zero gradient carries no hypergradient signal
        assert_all_equal(rates(opt, pb.params), old_rates)
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
