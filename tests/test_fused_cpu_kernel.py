"""``fused=True`` on the CPU: the C++ kernel (``metalr/csrc/hd_step.cpp``) against the eager path.

The kernel implements the same equations (lagged: one pass; exact: two passes), so in float64
(plain loops) it must equal the eager ``foreach`` path to rounding; in float32 the AVX-512 loop
estimates ``d_{t-1}`` (which only feeds the hypergradient sums) with 14-bit reciprocals, so the
rates agree to ~1e-4. The first use builds the extension (~40 s once per machine; cached).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _configs import same_state_value

import metalr
from metalr.functional import _cpu_kernels

pytestmark = pytest.mark.compile

SHAPES = ((37, 29), (29,), (300, 4), (1,))


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if _cpu_kernels.load() is None:
        pytest.skip("no C++ compiler: fused=True uses the eager path")


def _run(make, steps=6, dtype=torch.float64, nan_at=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    opt = make(params)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            if t == nan_at and p is params[0]:
                p.grad[3, 4] = float("nan")
        opt.step()
    return params, opt


def _compare(make_kernel, make_eager, rtol, atol, **kw):
    a, opt_a = _run(make_kernel, **kw)
    b, opt_b = _run(make_eager, **kw)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)
        for key, value in opt_b.state[q].items():
            torch.testing.assert_close(opt_a.state[p][key], value, rtol=rtol, atol=atol)
    return opt_a


ADAM = [
    {"rule": "seek", "granularity": "tensor"},
    {"rule": "seek", "granularity": "group"},
    {"rule": "normalized", "granularity": "tensor", "hypergrad_lr": 0.05},
    {"rule": "additive", "granularity": "group", "hypergrad_lr": 1e-4},
    {"rule": "normalized", "weight_decay": 0.1, "maximize": True},
    {"rule": "seek", "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"rule": "seek", "seek": {"vanish": 0.9, "vanish_decay": 0.5, "noise_hold": 1.5}},  # gate, hold
]


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
@pytest.mark.parametrize("kw", ADAM, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_adam_kernel_equals_eager_float64(kw, lagged):
    opt = _compare(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=lagged, **kw),
        lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, lagged=lagged, **kw),
        rtol=1e-9, atol=1e-12, nan_at=3,
    )  # fmt: skip
    rates = [opt.state[p]["lr_multiplier"] for p in opt.param_groups[0]["params"]]
    assert any(r != rates[0].new_tensor(metalr.functional.SEEK_DEFAULTS["init_scale"]) and r != 1
               for r in rates)  # fmt: skip


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
def test_adam_kernel_float32_close_to_eager(lagged):
    _compare(
        lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=lagged),
        lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, lagged=lagged),
        rtol=1e-4, atol=1e-6, dtype=torch.float32, steps=8, nan_at=4,
    )  # fmt: skip


def test_adam_kernel_with_hypergrad_lr_zero_is_torch_adam():
    ours, _ = _run(lambda ps: metalr.AdamHD(ps, lr=1e-2, hypergrad_lr=0, fused=True, lagged=True))
    theirs, _ = _run(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


SGD = [
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "rule": "normalized"},
    {"momentum": 0.0, "rule": "additive", "hypergrad_lr": 1e-3},
    {"momentum": 0.9, "nesterov": True, "granularity": "group", "maximize": True},
]


@pytest.mark.parametrize("kw", SGD, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_sgd_lagged_kernel_equals_eager_float64(kw):
    _compare(
        lambda ps: metalr.SGDHD(ps, lr=1e-2, fused=True, lagged=True, **kw),
        lambda ps: metalr.SGDHD(ps, lr=1e-2, foreach=True, lagged=True, **kw),
        rtol=1e-9, atol=1e-12, nan_at=3,
    )  # fmt: skip


def _assert_resumes_bit_exactly(make) -> None:
    """Three steps, a state_dict into a fresh optimizer (``make(params)``), three more steps of
    both on the same gradients: parameters and multipliers bit-equal."""
    params, opt = _run(make, steps=3)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(clone)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for a, b in zip(params, clone):
            a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            b.grad = a.grad.clone()
        opt.step()
        resumed.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["lr_multiplier"], resumed.state[b]["lr_multiplier"])


def test_kernel_state_resumes_bit_exactly():
    _assert_resumes_bit_exactly(lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, lagged=True))


@pytest.mark.parametrize("family", ["AdamHD", "SGDHD"])
def test_without_a_compiler_fused_takes_the_eager_path(monkeypatch, family):
    """When the extension cannot be built, fused=True steps exactly as the eager path."""
    monkeypatch.setattr(_cpu_kernels, "load", lambda: None)
    cls = getattr(metalr, family)
    kw = {"momentum": 0.9} if family == "SGDHD" else {}
    a, _ = _run(lambda ps: cls(ps, lr=1e-2, fused=True, lagged=True, **kw))
    b, _ = _run(lambda ps: cls(ps, lr=1e-2, foreach=True, lagged=True, **kw))
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# Element granularity (exact mode): one pass after a scan of the gradients
# (metalr/csrc/hd_element.cpp, metalr/functional/_cpu_element.py).

ELEMENT = [
    {"rule": "seek"},
    {"rule": "seek", "seek": {"turn_threshold": 0.9}},  # turns at step 3: the corrected guess
    {"rule": "seek", "seek": {"turn_threshold": 0.9}, "lr_bounds": (1e-5, 10.0)},  # two passes
    {"rule": "seek", "hypergrad_lr": 0.0},
    {"rule": "seek", "seek": {"vanish": 0.9, "vanish_decay": 0.5, "noise_hold": 1.5}},  # gate, hold
    {"rule": "normalized", "hypergrad_lr": 0.05},
    {"rule": "additive", "hypergrad_lr": 1e-4},
    {"rule": "normalized", "weight_decay": 0.1, "maximize": True},
    {"rule": "seek", "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"rule": "normalized", "lr_bounds": (5e-3, 2e-2)},
]


@pytest.fixture
def element_calls(monkeypatch):
    """Counts the element kernel's steps (so a comparison cannot pass on the fallback)."""
    calls = []
    step = _cpu_kernels.adam_hd_element_step

    def counted(*args, **kwargs):
        calls.append(kwargs["rule"])
        return step(*args, **kwargs)

    monkeypatch.setattr(_cpu_kernels, "adam_hd_element_step", counted)
    return calls


def _element(**kw):
    return lambda ps: metalr.AdamHD(ps, lr=1e-2, fused=True, granularity="element", **kw)


def _element_eager(**kw):
    return lambda ps: metalr.AdamHD(ps, lr=1e-2, foreach=True, granularity="element", **kw)


@pytest.mark.parametrize("kw", ELEMENT, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_adam_element_kernel_equals_eager_float64(kw, element_calls):
    opt = _compare(_element(**kw), _element_eager(**kw), rtol=1e-9, atol=1e-12, nan_at=3)
    # every step through the kernel (the NaN step skips in it); with lr_bounds the eager step,
    # whose rules move the rates in use and keep the stored ones
    assert len(element_calls) == (0 if "lr_bounds" in kw else 6)
    moved = kw.get("hypergrad_lr") != 0.0
    start = metalr.functional.SEEK_DEFAULTS["init_scale"] if kw["rule"] == "seek" and moved else 1
    rates = torch.cat(
        [opt.state[p]["lr_multiplier"].flatten() for p in opt.param_groups[0]["params"]]
    )
    assert bool((rates != start).any()) == moved


def test_adam_element_kernel_turns_and_settles(element_calls):
    """The ramp's turn (after a guessed continuation) and the settled per-element tracking."""
    opt = _compare(
        _element(seek={"turn_threshold": 0.9}), _element_eager(seek={"turn_threshold": 0.9}),
        rtol=1e-9, atol=1e-12, steps=12,
    )  # fmt: skip
    for p in opt.param_groups[0]["params"]:
        ctrl = opt.state[p]["hd_controller"]
        assert ctrl[0] == 0 and torch.isfinite(ctrl[4])  # settled, with a ceiling
        if p.numel() > 1:
            assert opt.state[p]["lr_multiplier"].std() > 0  # per-element tracking moved them


@pytest.mark.parametrize("kw", [{"rule": "seek"}, {"rule": "normalized", "hypergrad_lr": 0.05}])
def test_adam_element_kernel_float32_close_to_eager(kw, element_calls):
    _compare(
        _element(**kw), _element_eager(**kw), rtol=1e-4, atol=1e-6, dtype=torch.float32, steps=8,
        nan_at=4,
    )  # fmt: skip
    assert element_calls


def test_adam_element_kernel_with_hypergrad_lr_zero_is_torch_adam(element_calls):
    ours, _ = _run(_element(hypergrad_lr=0.0, rule="normalized"))
    theirs, _ = _run(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adam_element_kernel_skips_a_non_finite_step_whole(element_calls):
    """A NaN in one tensor's gradient leaves every tensor's state as it was (step included)."""
    params, opt = _run(_element(), steps=3)
    before = copy.deepcopy(opt.state_dict()["state"])
    weights = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad[0] = float("inf")
    opt.step()
    for w, p in zip(weights, params):
        assert torch.equal(w, p)
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert same_state_value(value, before[key][name]), name


def test_adam_element_kernel_state_resumes_bit_exactly(element_calls):
    _assert_resumes_bit_exactly(_element())


def test_element_kernel_applies_to_the_exact_adam_step_only():
    p = [torch.zeros(3)]
    rates = [torch.ones(3)]
    adam = {"beta1": 0.9, "lr": 1e-2}
    assert _cpu_kernels.applies(p, rates, "element", **adam)
    assert not _cpu_kernels.applies(p, rates, "element", **adam, lagged=True)
    assert not _cpu_kernels.applies(p, rates, "element", momentum=0.9, lr=1e-2)  # SGD-HD
    assert not _cpu_kernels.applies(p, [torch.ones(3, dtype=torch.float64)], "element", **adam)


def test_without_a_compiler_element_fused_takes_the_eager_path(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "load", lambda: None)
    a, _ = _run(_element())
    b, _ = _run(_element_eager())
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_adam_element_kernel_with_two_param_groups(element_calls):
    """Two groups: the optimizer's all-finite flag (a NaN in the other group skips the step) and
    the kernel's scan that then only looks for non-zero moments."""

    def groups(make):
        def build(ps):
            return make([{"params": ps[:2]}, {"params": ps[2:], "hypergrad_lr": 0.03}])

        return build

    kw = {"lr": 1e-2, "granularity": "element"}
    _compare(
        groups(lambda g: metalr.AdamHD(g, fused=True, **kw)),
        groups(lambda g: metalr.AdamHD(g, foreach=True, **kw)),
        rtol=1e-9, atol=1e-12, nan_at=3,
    )  # fmt: skip
    assert len(element_calls) == 10  # 2 groups x 5 finite steps (the NaN step stops before)


def test_prefetch_distance_follows_the_cpu_vendor_and_the_override(monkeypatch):
    monkeypatch.delenv("METALR_CPU_PREFETCH", raising=False)
    monkeypatch.setattr(_cpu_kernels, "_cpu_vendor", lambda: "AuthenticAMD")
    assert _cpu_kernels.prefetch_distance() == 64
    monkeypatch.setattr(_cpu_kernels, "_cpu_vendor", lambda: "GenuineIntel")
    assert _cpu_kernels.prefetch_distance() == 256
    monkeypatch.setattr(_cpu_kernels, "_cpu_vendor", lambda: "")
    assert _cpu_kernels.prefetch_distance() == _cpu_kernels.DEFAULT_PREFETCH == 256
    monkeypatch.setenv("METALR_CPU_PREFETCH", "128")
    assert _cpu_kernels.prefetch_distance() == 128
    for bad in ("0", "-4", "far"):
        monkeypatch.setenv("METALR_CPU_PREFETCH", bad)
        with pytest.raises(ValueError, match="METALR_CPU_PREFETCH must be a positive integer"):
            _cpu_kernels.prefetch_distance()


@pytest.mark.parametrize("lagged", [True, False], ids=["lagged", "exact"])
def test_adam_kernel_with_step_counts_that_differ_between_tensors(lagged):
    """A parameter without a gradient on some steps falls behind in its step count: the kernel
    then takes one row of Adam constants per tensor (else one row for all) and must still
    equal the eager path."""

    def run(fused):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
                  for s in SHAPES]  # fmt: skip
        # (the moment restart, which zeroes the counts at the ramp's turn, is off: the counts
        # here differ by the steps a parameter had no gradient)
        opt = metalr.AdamHD(params, lr=1e-2, fused=fused, lagged=lagged and fused,
                            seek={"moment_restart": 0})  # fmt: skip
        for t in range(6):
            for i, p in enumerate(params):
                grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.grad = None if (i == 1 and t in (1, 2)) else grad
            opt.step()
        return params, opt

    (a, opt_a), (b, opt_b) = run(True), run(False)
    assert [int(opt_a.state[p]["step"]) for p in a] == [6, 4, 6, 6]
    if lagged:  # the lagged rate is a different update: only the counts are compared
        return
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt_a.state[p]["lr_multiplier"],
                                   opt_b.state[q]["lr_multiplier"], rtol=1e-12, atol=1e-14)  # fmt: skip


def test_adam_pass_checks_every_tensor_before_writing():
    """A malformed state tensor anywhere in the list is refused before any tensor is written
    (the write pass runs last to first: a late check would leave a half-applied step)."""
    ext = _cpu_kernels.load()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(3)]
    grads = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(3)]
    m = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(3)]
    v = [torch.rand(8, generator=gen, dtype=torch.float64) for _ in range(3)]
    constants = torch.tensor([[1.0, 1.0, 1e-2, 0.1, 1.0, 1.0]], dtype=torch.float64)
    rates = torch.ones(3, dtype=torch.float64)
    before = [p.clone() for p in params]
    for bad in (0, 2):
        broken = list(m)
        broken[bad] = torch.zeros(7, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="exp_avg"):
            ext.adam_hd_pass(params, grads, broken, v, constants, rates, 0.9, 0.999, 1e-8, 0.0,
                             False, False, True)  # fmt: skip
        assert all(torch.equal(p, q) for p, q in zip(params, before))
    # one row for all tensors equals the same row repeated per tensor
    one, per = [p.clone() for p in params], [p.clone() for p in params]
    for target, rows in ((one, constants), (per, constants.repeat(3, 1))):
        ext.adam_hd_pass(target, grads, [t.clone() for t in m], [t.clone() for t in v], rows,
                         rates, 0.9, 0.999, 1e-8, 0.0, False, False, True)  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(one, per))
    assert not torch.equal(one[0], before[0])
