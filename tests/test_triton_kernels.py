"""The Triton kernels (``fused=True`` on CUDA) run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` executes the ``triton.jit`` kernels with CPU tensors (the module routes
CPU tensors through the interpreter). The optimizers' fused dispatch is pointed at the Triton
module for CPU tensors, so the whole step (tables, launches, the rate update from the sums,
the skip flags) runs as it would on a GPU, and is compared with the eager ``foreach`` path.
Small tensors keep the interpreter fast (a few seconds for the file).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _configs import same_state_value

import metalr

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it when there is no GPU
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

from metalr.functional import _fused, _triton_kernels

# several chunks for the first tensor (BLOCK = 1024), a partial chunk, a scalar-sized tensor
SHAPES = ((50, 60), (129,), (7, 3), (1,))


@pytest.fixture(autouse=True)
def _triton_for_cpu(monkeypatch):
    """fused=True steps of CPU tensors go to the Triton kernels (interpreted)."""

    def backend(params, rates, hyper):
        return _triton_kernels if _triton_kernels.applies(params, rates, **hyper) else None

    monkeypatch.setattr(_fused, "kernel_backend", backend)
    monkeypatch.setattr(metalr.functional.adam_rule, "kernel_backend", backend)
    monkeypatch.setattr(metalr.functional.sgd_rule, "kernel_backend", backend)


def _run(make, steps=5, nan_at=None, seed=0, no_grad_at=()):
    """``steps`` steps on random gradients; a NaN in the first tensor's at step ``nan_at``, no
    gradient for the second tensor at the steps in ``no_grad_at``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = make(params)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            if t == nan_at and p is params[0]:
                p.grad[3, 4] = float("nan")
        if t in no_grad_at:
            params[1].grad = None
        opt.step()
    return params, opt


def _compare(make_kernel, make_eager, **kw):
    a, opt_a = _run(make_kernel, **kw)
    b, opt_b = _run(make_eager, **kw)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=1e-6)
        for key, value in opt_b.state[q].items():
            torch.testing.assert_close(opt_a.state[p][key], value, rtol=2e-5, atol=1e-6)
    return a, opt_a


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"rule": "normalized", "granularity": "group", "hypergrad_lr": 0.05, "maximize": True},
        {"rule": "additive", "hypergrad_lr": 1e-4, "weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    ids=["seek", "normalized-group-max", "additive-l2", "decoupled"],
)
def test_adam_triton_equals_eager(kw, lagged):
    params, opt = _compare(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=lagged, **kw),
        lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, lagged=lagged, **kw),
        nan_at=2,
    )
    assert all(torch.isfinite(p).all() for p in params)
    assert len({float(opt.state[p]["lr_multiplier"]) for p in params}) > 1 or kw


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9},
        {"momentum": 0.0, "rule": "normalized", "hypergrad_lr": 0.05},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True},
    ],
    ids=["momentum", "plain", "nesterov"],
)
def test_sgd_triton_equals_eager(kw, lagged):
    _compare(
        lambda ps: metalr.SGDHD(ps, lr=1e-2, fused=True, lagged=lagged, **kw),
        lambda ps: metalr.SGDHD(ps, lr=1e-2, foreach=True, lagged=lagged, **kw),
        nan_at=3,
    )


def _scheduled(make, schedule, pull=0.0):
    """One step per scheduled ``lr`` on random gradients (plus ``pull`` × the weights)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = make(params)
    for lr in schedule:
        opt.param_groups[0]["lr"] = lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + pull * p.detach()
        opt.step()
    return params, opt


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
@pytest.mark.parametrize("rule", ["seek", "normalized"])
def test_triton_applies_the_bounded_rate_across_a_crossing_schedule(rule, lagged):
    """``lr_bounds`` clamp the rate a launch applies, not the stored multiplier: a schedule
    above the upper bound and below the lower one gives the eager step's weights and rates
    (``tests/test_lr_bounds_schedules.py`` has the semantics against torch)."""
    schedule = (1e-2, 5e-2, 8e-2, 1e-2, 1e-4, 1e-2)
    kw = {"rule": rule, "lr_bounds": (1e-3, 2e-2), "lagged": lagged}
    if rule == "normalized":
        kw["hypergrad_lr"] = 0.2
    a, opt_a = _scheduled(lambda ps: metalr.AdamHD(ps, lr=1e-2, **kw, fused=True), schedule, 0.5)
    b, opt_b = _scheduled(lambda ps: metalr.AdamHD(ps, lr=1e-2, **kw, foreach=True), schedule, 0.5)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(opt_a.state[p]["lr_multiplier"], opt_b.state[q]["lr_multiplier"],
                                   rtol=2e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
def test_triton_with_hypergrad_lr_zero_is_adam_at_the_clamped_schedule(lagged):
    schedule = (1e-2, 5e-2, 8e-2, 1e-2, 1e-4, 1e-2)
    ours, opt = _scheduled(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, hypergrad_lr=0.0, lr_bounds=(1e-3, 2e-2),
                                 fused=True, lagged=lagged),
        schedule,
    )  # fmt: skip
    theirs, _ = _scheduled(
        lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
        [min(max(lr, 1e-3), 2e-2) for lr in schedule],
    )
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=1e-6)
        assert float(opt.state[p]["lr_multiplier"]) == 1.0  # the schedule never rescales it


def test_exact_kernel_skips_a_non_finite_step_on_the_device():
    params, opt = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True), steps=3)
    before = {k: v.clone() if torch.is_tensor(v) else v
              for k, v in opt.state[params[0]].items()}  # fmt: skip
    weights = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = float("inf")
    opt.step()
    for p, w in zip(params, weights):
        assert torch.equal(p, w)
    for k, v in before.items():
        assert same_state_value(opt.state[params[0]][k], v), k


def test_tables_are_built_once_for_the_same_tensors():
    _triton_kernels._TABLE_CACHE.clear()
    _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=True), steps=3)
    kinds = [key[1] for key in _triton_kernels._TABLE_CACHE]
    # one chunk table (same sizes every step); address tables for θ, m, v once each, and for
    # the gradients (new tensors every step here) at most one per step
    assert kinds.count("chunks") == 1
    assert 4 <= kinds.count("pointers") <= 3 + 3


def test_seek_state_lives_in_one_buffer_that_resumes_bit_exactly():
    """The kernels step the seek rule's state as rows of one buffer (no per-tensor stack and
    copy): each state tensor stays the object in ``optimizer.state``, now a row of it; a
    checkpoint loaded into a new optimizer (new tensors, moved into a new buffer on its first
    step) continues exactly as the uninterrupted run."""
    make = lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=True)
    params, opt = _run(make, steps=3, seed=1)
    first = params[0]
    for key in ("lr_multiplier", "hd_controller", "step"):
        storages = {opt.state[p][key].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1, key
    held = opt.state[first]["lr_multiplier"]
    saved = copy.deepcopy(opt.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(copies)
    resumed.load_state_dict(saved)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    assert held is opt.state[first]["lr_multiplier"]  # the same object, updated in place
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert same_state_value(resumed.state[q][key], value), key


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
def test_kernels_equal_eager_when_a_parameter_skips_some_steps(lagged):
    """A parameter without a gradient on some steps makes the step's state lists shorter (their
    tensors move to another buffer); the full list must not come back from its stale buffer."""
    _compare(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=lagged),
        lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, lagged=lagged),
        steps=6, seed=3, no_grad_at=(2, 3),
    )  # fmt: skip


def test_rows_of_shares_one_buffer_and_declines_mixed_lists():
    from metalr.functional._flat_state import rows_of

    scalars = [torch.tensor(float(i)) for i in range(4)]
    buffer = rows_of(scalars)
    assert torch.equal(buffer, torch.arange(4.0))
    buffer.mul_(3)  # writes through to the tensors, and back
    scalars[1].add_(1)
    assert [float(t) for t in scalars] == [0.0, 4.0, 6.0, 9.0]
    assert rows_of(scalars) is buffer
    vectors = [torch.randn(5) for _ in range(3)]
    assert torch.equal(rows_of(vectors)[2], vectors[2])
    assert rows_of([torch.zeros(2), torch.zeros(3)]) is None
    # a shorter list (a parameter without a gradient this step) moves its tensors elsewhere;
    # the full list must then be moved again, not served from its stale buffer
    shorter = rows_of(scalars[:2])
    shorter.add_(1)
    again = rows_of(scalars)
    assert again is not buffer
    assert [float(t) for t in scalars] == again.tolist() == [1.0, 5.0, 6.0, 9.0]
    again.zero_()
    assert all(float(t) == 0 for t in scalars)
    assert rows_of([torch.zeros(()), torch.zeros((), dtype=torch.float64)]) is None
    assert rows_of([torch.zeros((), requires_grad=True)]) is None


def test_default_path_takes_the_kernels_where_fused_none_applies(monkeypatch):
    """fused=None on a device in AUTO_FUSED_DEVICES (CUDA; the CPU here, through the
    interpreter) takes the kernels: the same numbers as fused=True; foreach=True, element
    granularity or METALR_DEFAULT_FUSED=0 keep the eager path."""
    monkeypatch.setattr(_fused, "AUTO_FUSED_DEVICES", frozenset({"cpu", "cuda"}))
    calls = []
    real = _triton_kernels.adam_hd_step
    monkeypatch.setattr(
        _triton_kernels, "adam_hd_step", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    a, _ = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2), nan_at=2)
    assert len(calls) == 5
    b, _ = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True), nan_at=2)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    calls.clear()
    _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True))
    _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, granularity="element"))
    monkeypatch.setenv("METALR_DEFAULT_FUSED", "0")
    _run(lambda ps: metalr.AdamHD(ps, lr=1e-2))
    assert calls == []


def test_default_path_falls_back_to_eager_when_the_kernels_fail_on_first_use(monkeypatch):
    monkeypatch.setattr(_fused, "AUTO_FUSED_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_fused, "_AUTO", {"ran": False, "failed": False})

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(_triton_kernels, "adam_hd_step", broken)
    with pytest.warns(RuntimeWarning, match="no kernel for this GPU"):
        a, _ = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2))
    b, _ = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True))
    for p, q in zip(a, b):
        assert torch.equal(p, q)  # every step eager: nothing applied twice
    with pytest.raises(RuntimeError, match="no kernel"):  # fused=True shows the error
        _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True))


def test_kernels_compile_for_a_cuda_target():
    """The interpreter does not type-check like the compiler: compile every kernel variant for
    sm_90 (PTX and cubin with the ptxas that ships in triton's wheel), no GPU needed."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, str(root / "tests" / "_triton_aot.py")],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 18  # every variant compiled (two restart launches)
    # Occupancy: ≤ 64 registers per thread lets 4 programs of 8 warps share an SM (50%); the
    # first GPU run (2048 × 4 warps, 211 registers) ran 2.5× slower than torch's fused AdamW.
    for line in lines:
        regs, spills = map(int, re.search(r"registers=(\d+) spills=(\d+)", line).groups())
        assert regs <= 64 and spills == 0, line


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_the_moment_restart_in_the_kernel_equals_eager(granularity, lagged, monkeypatch):
    """Through the ramp's first turn (the default restarts Adam's moments there and matches the
    rate to the last step's size): the kernels equal the eager path. On the exact path the
    writing launch restarts the moments itself (the eager restart is not called); lagged, the
    turn is known only after the launch, and the eager restart follows it."""
    calls = []
    eager_restart = metalr.functional.adam_rule.restart_in_place

    def counted(*args):
        calls.append(1)
        return eager_restart(*args)

    monkeypatch.setattr(metalr.functional.adam_rule, "restart_in_place", counted)
    kw = {"granularity": granularity, "lagged": lagged}
    params, opt = _compare(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, **kw),
        lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, **kw),
        steps=12,
    )
    assert all(int(opt.state[p]["step"]) < 12 for p in params), "every tensor restarted"
    kernel_calls = len(calls) - 12  # the eager run calls it at every step
    assert kernel_calls == (12 if lagged else 0)
