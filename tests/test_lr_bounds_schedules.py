"""``lr_bounds`` with a schedule that crosses them: the bound clamps the rate in use, never the
stored multiplier (before, a warm-up above ``max`` rescaled the multiplier for good, even with
``hypergrad_lr=0``).

Every step applies ``clamp(lr_t · m_t, min, max)``; a multiplier the rule moved lands in
``[min/lr_t, max/lr_t]`` (the controller continues from the rate in use), one it did not move
keeps its value, so a scheduled ``lr`` alone never moves it. Checked on every path that applies a rate (eager
single-tensor and ``foreach``, torch's fused kernels under them, the C++ kernels exact, lagged
and per element, HyperLR) against torch's optimizers in float64; the Triton kernels' test is in
``tests/test_triton_kernels.py``.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import metalr
from metalr.functional import clamp_rates

LO, HI = 1e-3, 2e-2
#: scheduled rates: inside, above the upper bound, back, below the lower bound, back
SCHEDULE = (1e-2, 5e-2, 8e-2, 1e-2, 1e-4, 5e-4, 1e-2, 1.5e-2)
SHAPES = ((6, 5), (7,), (1,))


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _train(opt: torch.optim.Optimizer, params, schedule=SCHEDULE, seed: int = 1) -> None:
    """One step per scheduled rate on a fixed quadratic (so the rules see real agreement)."""
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for lr in schedule:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
        opt.step()


ADAM_PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "cpp": {"fused": True},
    "cpp-lagged": {"fused": True, "lagged": True},
    "element-foreach": {"foreach": True, "granularity": "element"},
    "element-cpp": {"fused": True, "granularity": "element"},
}
SGD_PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "cpp-lagged": {"fused": True, "lagged": True},
    "element-foreach": {"foreach": True, "granularity": "element"},
}


def _rates(opt) -> list[torch.Tensor]:
    return [opt.state[p]["lr_multiplier"] for g in opt.param_groups for p in g["params"]]


def _torch_run(make, params) -> None:
    """torch's optimizer with the schedule clamped to the bounds: what the bounds promise."""
    _train(make(params), params, schedule=[min(max(lr, LO), HI) for lr in SCHEDULE])


@pytest.mark.parametrize("rule", ["seek", "normalized"])
@pytest.mark.parametrize("path", ADAM_PATHS, ids=str)
def test_adam_hd_with_hypergrad_lr_zero_is_adam_at_the_clamped_schedule(path, rule):
    ours, theirs = _params(), _params()
    opt = metalr.AdamHD(ours, lr=1e-2, hypergrad_lr=0.0, rule=rule, lr_bounds=(LO, HI),
                        **ADAM_PATHS[path])  # fmt: skip
    _train(opt, ours)
    _torch_run(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for rate in _rates(opt):  # never rescaled by the schedule (was max / 8e-2 = 0.25 for good)
        assert bool((rate == 1).all())


@pytest.mark.parametrize("path", SGD_PATHS, ids=str)
def test_sgd_hd_with_hypergrad_lr_zero_is_sgd_at_the_clamped_schedule(path):
    ours, theirs = _params(), _params()
    opt = metalr.SGDHD(ours, lr=1e-2, momentum=0.9, hypergrad_lr=0.0, lr_bounds=(LO, HI),
                       **SGD_PATHS[path])  # fmt: skip
    _train(opt, ours)
    _torch_run(lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False), theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(bool((rate == 1).all()) for rate in _rates(opt))


@pytest.mark.parametrize(
    "inner",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=False),
    ],
    ids=["adam", "sgd"],
)
def test_hyper_lr_with_hypergrad_lr_zero_is_the_inner_optimizer_at_the_clamped_schedule(inner):
    ours, theirs = _params(), _params()
    opt = metalr.HyperLR(inner(ours), hypergrad_lr=0.0, lr_bounds=(LO, HI))
    _train(opt, ours)
    _torch_run(inner, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(bool((rate == 1).all()) for rate in _rates(opt))


@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_each_step_applies_the_clamped_rate_and_a_moved_multiplier_lands_in_the_bounds(
    granularity,
):
    """SGD without momentum moves θ by exactly the rate in use times the gradient, so each
    step's rate can be read back; the rule climbs (a consistent quadratic) into the bound."""
    (w,) = params = [torch.nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))]
    opt = metalr.SGDHD(params, lr=1e-2, momentum=0.0, rule="normalized", hypergrad_lr=0.3,
                       granularity=granularity, lr_bounds=(LO, HI), foreach=False)  # fmt: skip
    schedule = (1e-2,) * 6 + (6e-2,) * 4 + (1e-2,) * 4 + (2e-4,) * 3 + (1e-2,) * 3
    at_the_bound = 0
    for lr in schedule:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (0.5 * (w**2).sum()).backward()
        grad, before = w.grad.clone(), w.detach().clone()
        opt.step()
        rate = opt.state[w]["lr_multiplier"].expand(4)
        applied = (before - w.detach()) / grad
        torch.testing.assert_close(applied, (lr * rate).clamp(LO, HI), rtol=1e-12, atol=0)
        # the rule moved every multiplier (the signal is never 0 here): each lies in the bounds,
        # so the controller continues from the rate in use, without a dead zone past a bound
        assert bool(((lr * rate >= LO * (1 - 1e-12)) & (lr * rate <= HI * (1 + 1e-12))).all())
        at_the_bound += int(
            bool(torch.isclose(lr * rate, torch.tensor(HI, dtype=rate.dtype)).any())
        )
    assert at_the_bound >= 2  # the climb and the rise of lr both met the upper bound


def test_a_dip_below_the_lower_bound_does_not_let_the_rule_climb_unseen():
    """While a schedule dips below ``min`` the rate in use sits at ``min``; a rule that kept
    climbing there without effect (a dead zone) would come back far too fast."""
    (w,) = params = [torch.nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))]
    opt = metalr.AdamHD(params, lr=1e-2, lr_bounds=(LO, HI), foreach=False)  # seek: ramps
    for lr in (1e-2,) * 3 + (1e-6,) * 20 + (1e-2,):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (0.5 * (w**2).sum()).backward()
        opt.step()
    assert 1e-2 * float(opt.state[w]["lr_multiplier"]) <= HI * (1 + 1e-12)


def test_the_spike_guard_cuts_the_rate_in_use():
    """At a scheduled lr above ``max`` the rate in use is ``max``; a spike halves it at once
    (a cut of the stored multiplier alone would stay above the bound and change nothing)."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = metalr.SGDHD([w], lr=8e-2, momentum=0.0, hypergrad_lr=0.0, lr_bounds=(1e-4, HI),
                       spike_guard={"warmup": 3, "sigmas": 4.0}, foreach=False)  # fmt: skip
    applied = []
    for loss in (1.0, 1.01, 0.99, 1.0, 1.005, 50.0):  # the last one spikes

        def closure(loss=loss):
            opt.zero_grad()
            w.grad = torch.ones_like(w)
            return torch.tensor(loss, dtype=torch.float64)

        before = w.detach().clone()
        opt.step(closure)
        applied.append(float((before - w.detach())[0]))
    assert applied[-2] == pytest.approx(HI, rel=1e-12)
    assert applied[-1] < 0.75 * HI


@pytest.mark.parametrize(
    "fused",
    [{"fused": True}, {"fused": True, "lagged": True}, {"fused": True, "granularity": "element"}],
    ids=["cpp", "cpp-lagged", "element-cpp"],
)
@pytest.mark.parametrize("rule", ["seek", "normalized"])
def test_adam_kernels_equal_the_eager_step_across_a_crossing_schedule(fused, rule):
    kw = {"lr": 1e-2, "rule": rule, "lr_bounds": (LO, HI)}
    if rule == "normalized":
        kw["hypergrad_lr"] = 0.2
    eager = {k: v for k, v in fused.items() if k != "fused"}
    a, b = _params(), _params()
    opt_a = metalr.AdamHD(a, **kw, **fused)
    opt_b = metalr.AdamHD(b, **kw, **eager, foreach=True)
    _train(opt_a, a)
    _train(opt_b, b)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(opt_a.state[p]["lr_multiplier"], opt_b.state[q]["lr_multiplier"],
                                   rtol=1e-10, atol=1e-13)  # fmt: skip


def test_sgd_kernel_equals_the_eager_step_across_a_crossing_schedule():
    kw = {
        "lr": 1e-2,
        "momentum": 0.9,
        "rule": "normalized",
        "hypergrad_lr": 0.2,
        "lr_bounds": (LO, HI),
    }
    a, b = _params(), _params()
    opt_a = metalr.SGDHD(a, **kw, fused=True, lagged=True)
    opt_b = metalr.SGDHD(b, **kw, foreach=True, lagged=True)
    _train(opt_a, a)
    _train(opt_b, b)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)


def test_clamp_rates_with_previous_keeps_unmoved_multipliers_and_clamps_moved_ones():
    rate = torch.tensor([0.5, 3.0, 0.01, 2.5, 0.02], dtype=torch.float64)
    previous = torch.tensor([0.4, 2.5, 0.02, 2.5, 0.02], dtype=torch.float64)
    # lr 1: bounds [0.05, 1] on the multiplier
    plain = clamp_rates(rate, 1.0, (0.05, 1.0))
    expected = torch.tensor([0.5, 1.0, 0.05, 1.0, 0.05], dtype=torch.float64)
    torch.testing.assert_close(plain, expected)
    held = clamp_rates(rate, 1.0, (0.05, 1.0), previous=previous)
    # moved: clamped as usual; not moved (2.5, 0.02): kept where they were, outside the bounds
    expected = torch.tensor([0.5, 1.0, 0.05, 2.5, 0.02], dtype=torch.float64)
    torch.testing.assert_close(held, expected)
    as_tensor = clamp_rates(rate, torch.tensor(1.0, dtype=torch.float64), (0.05, 1.0), previous)
    torch.testing.assert_close(as_tensor, held)
    assert clamp_rates(rate, 1.0, (0.0, math.inf), previous) is rate  # unbounded: untouched


def test_clamp_rates_with_previous_is_differentiable():
    rate = torch.tensor([0.5, 3.0, 0.01], dtype=torch.float64, requires_grad=True)
    previous = torch.tensor([0.4, 2.5, 0.02], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, p, lr: clamp_rates(r, lr, (0.05, 1.0), previous=p), (rate, previous, lr)
    )


_COMPILED_SCHEDULE = """
import copy, sys
import torch
import metalr
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
x, y = torch.randn(64, 8), torch.randn(64, 1)
twin = copy.deepcopy(model)
kw = dict(lr=1e-2, rule="normalized", lr_bounds=(1.5e-2, 2e-2))
opt, eager = metalr.AdamHD(model.parameters(), **kw), metalr.AdamHD(twin.parameters(), **kw)
factor = lambda t: 1 + 2.5 * ((t // 5) % 2)  # lr 0.01 and 0.035 in turns: both cross a bound
schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt, eager)]
compiled_step = torch.compile(opt.step)
worst = 0.0
for _ in range(20):
    for net, o, step, schedule in zip((model, twin), (opt, eager), (compiled_step, eager.step),
                                      schedules):
        o.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        step()
        schedule.step()
    worst = max(worst, max((p - q).abs().max().item()
                           for p, q in zip(model.parameters(), twin.parameters())))
print(worst)
"""


def test_a_compiled_step_follows_the_schedule_with_a_warm_graph_cache(tmp_path):
    """Under ``torch.compile`` a Python-float ``lr`` used as a clamp bound can come back stale
    from inductor's cache (pytorch/pytorch#194976): the second process, with the cache warm,
    clamped with an old ``lr`` (weights 0.1 off the eager step). The bounds are constants now."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    script = tmp_path / "compiled_schedule.py"
    script.write_text(_COMPILED_SCHEDULE)
    for run in ("cold", "warm"):
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=600, check=True)  # fmt: skip
        assert float(out.stdout.strip().splitlines()[-1]) < 1e-5, run


def test_a_rule_moves_the_rate_in_use_while_a_warm_up_rises_past_the_bound():
    """The rule's move starts from the rate in use: with ``lr`` rising past ``max`` and the
    signal saying "down", the rate in use falls at once (it stayed at ``max`` while the move
    was applied to a stored multiplier beyond the bound)."""
    from metalr.functional import update_rates

    one = torch.tensor(1.0, dtype=torch.float64)
    m = torch.tensor(HI / 0.04, dtype=torch.float64)  # at the bound for the previous lr, 0.04
    (new,) = update_rates([m], [-one], [one], [one], lr=0.05, hypergrad_lr=0.1,
                          rule="normalized", granularity="tensor", lr_bounds=(0.0, HI))  # fmt: skip
    assert 0.05 * float(new) == pytest.approx(HI * math.exp(-0.1), rel=1e-12)
    (p,) = params = [torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))]
    opt = metalr.SGDHD(params, lr=0.03, hypergrad_lr=0.2, rule="normalized", lr_bounds=(0.0, HI))
    in_use = []
    for lr in (0.03, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (60 * p**2).sum().backward()  # lr · 120 > 2: the steps overshoot, the signs alternate
        opt.step()
        in_use.append(min(lr * float(opt.state[p]["lr_multiplier"]), HI))
    assert in_use[-1] < 0.8 * HI and all(b <= a for a, b in itertools.pairwise(in_use[3:]))
