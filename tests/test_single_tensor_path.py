"""The single-tensor path (``foreach=False``): its in-place face is the pure step, bit for bit.

On the CPU with autograd off, ``_single_tensor_adam_hd`` / ``_single_tensor_sgd_hd`` run the pure
step's per-tensor math in place; under autograd, ``torch.compile`` or on accelerators they run the
pure step plus a write-back. Both faces must give the same bits, skip non-finite steps alike, and
keep bfloat16 working (its bias corrections once rounded to zero: bf16(0.999) == 1.0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _configs import same_state_value

import metalr
from metalr.functional import adam_direction, adam_hd_step
from metalr.functional._common import tracks_grad
from metalr.functional._controller import SINCE

ADAM_CASES = {
    "tensor": {},
    "group": {"granularity": "group"},
    "element": {"granularity": "element"},
    "additive": {"rule": "additive", "hypergrad_lr": 1e-4},
    "coupled-decay": {"weight_decay": 0.1},
    "maximize-amsgrad-free": {"maximize": True},
    "bounds": {"lr_bounds": (1e-4, 2e-2)},
}
SGD_CASES = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening-decay": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "element": {"momentum": 0.9, "granularity": "element"},
    "maximize": {"maximize": True},
}


def _params(dtype: torch.dtype, complex_too: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((7, 5), (5,))]
    if complex_too:
        ps.append(torch.randn(4, 3, generator=gen, dtype=torch.complex128).to(torch.complex64))
    return ps


def _run(make, params, steps=6, nan_at=3):
    """Step ``make(params)`` on fixed gradients (``nan_at``: a NaN gradient, a skipped step)."""
    gen = torch.Generator().manual_seed(1)
    opt = make(params)
    for i in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if i == nan_at and p is params[0]:
                g[0, 0] = float("nan")
            p.grad = g
        opt.step()
    return opt


def _pure_faces(monkeypatch, module: str) -> None:
    """Make the single-tensor path take the pure step + write-back (as on an accelerator)."""
    monkeypatch.setattr(f"metalr.functional.{module}.host_readable", lambda t: False)


def _assert_same(params_a, opt_a, params_b, opt_b) -> None:
    for p, q in zip(params_a, params_b, strict=True):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert same_state_value(value, sb[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", ADAM_CASES.values(), ids=ADAM_CASES.keys())
@pytest.mark.parametrize("cls", [metalr.AdamHD, metalr.AdamWHD], ids=lambda c: c.__name__)
def test_adam_in_place_face_equals_pure_step(monkeypatch, cls, kwargs, dtype) -> None:
    def make(ps):
        return cls(ps, lr=1e-2, foreach=False, **kwargs)

    complex_too = dtype != torch.bfloat16
    fast_params = _params(dtype, complex_too)
    pure_params = copy.deepcopy(fast_params)
    fast = _run(make, fast_params)
    assert any(float(s["lr_multiplier"].min()) != 1.0 for s in fast.state.values())
    _pure_faces(monkeypatch, "adam_rule")
    pure = _run(make, pure_params)
    _assert_same(fast_params, fast, pure_params, pure)
    for s in fast.state.values():  # the NaN step was skipped (5 of 6 counted), and where
        # Adam's moments restarted at the ramp's turn the count restarted there: SINCE - 1 at
        # the turn, SINCE from the next step (which moves no controller: no direction yet)
        since = int(s["hd_controller"][SINCE]) if "hd_controller" in s else 0
        assert int(s["step"]) in ((since - 1, since) if since > 0 else (5,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", SGD_CASES.values(), ids=SGD_CASES.keys())
def test_sgd_in_place_face_equals_pure_step(monkeypatch, kwargs, dtype) -> None:
    def make(ps):
        return metalr.SGDHD(ps, lr=1e-2, foreach=False, **kwargs)

    complex_too = dtype != torch.bfloat16
    fast_params = _params(dtype, complex_too)
    pure_params = copy.deepcopy(fast_params)
    fast = _run(make, fast_params)
    assert any(float(s["lr_multiplier"].min()) != 1.0 for s in fast.state.values())
    _pure_faces(monkeypatch, "sgd_rule")
    pure = _run(make, pure_params)
    _assert_same(fast_params, fast, pure_params, pure)


def test_in_place_face_does_not_alias_the_gradient() -> None:
    """New buffers are copies: the next backward's gradient must not change the state."""
    p = torch.randn(5)
    opt = metalr.SGDHD([p], lr=0.1, momentum=0.9, foreach=False)
    p.grad = torch.ones(5)
    opt.step()
    p.grad.mul_(7)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.ones(5))
    q = torch.randn(5)
    opt = metalr.SGDHD([q], lr=0.1, foreach=False)
    q.grad = torch.ones(5)
    opt.step()
    q.grad.mul_(7)
    assert torch.equal(opt.state[q]["prev_direction"], torch.ones(5))


# ---------------------------------------------------------------------------------------------
# bfloat16 (issue 9, bug 1): bias corrections in float32, so Adam-HD moves like torch Adam.


def _bf16_adam_run(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    start = torch.randn(8).bfloat16()
    p, q = start.clone(), start.clone()
    opt = metalr.AdamHD([p], lr=0.1, hypergrad_lr=0, **kwargs)
    ref = torch.optim.Adam([q], lr=0.1)
    for _ in range(3):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
        ref.step()
    return p - start, q - start


@pytest.mark.parametrize(
    "kwargs", [{"foreach": False}, {"differentiable": True}, {"foreach": True}], ids=str
)
def test_bfloat16_adam_hd_moves_like_torch_adam(kwargs) -> None:
    moved, expected = _bf16_adam_run(**kwargs)
    assert expected.abs().min() > 0.25  # torch's Adam: about 0.30 after three steps of lr 0.1
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-2)


@pytest.mark.compile
def test_bfloat16_adam_hd_fused_moves_like_torch_adam() -> None:
    moved, expected = _bf16_adam_run(fused=True)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-2)


def test_bfloat16_pure_step_and_direction() -> None:
    """The pure step (differentiable, the meta-learner's) with bf16 moments after one step."""
    m = torch.full((4,), 0.1, dtype=torch.bfloat16)  # (1 - β1) · g for g = 1
    v = torch.full((4,), 0.001, dtype=torch.bfloat16)  # (1 - β2) · g²
    d = adam_direction(m, v, torch.ones(()), 0.9, 0.999, 1e-8)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.ones(4), rtol=1e-2, atol=0)

    log_rate = torch.zeros((), requires_grad=True)
    p = torch.randn(4).bfloat16()
    zeros = torch.zeros_like(p)
    state = adam_hd_step(
        [p], [torch.ones_like(p)], [zeros], [zeros], [log_rate.exp()], [torch.zeros(())],
        lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
        hypergrad_lr=0.0, rule="normalized", granularity="tensor", lr_bounds=(0.0, float("inf")),
    )  # fmt: skip
    assert state.params[0].dtype == torch.bfloat16
    torch.testing.assert_close(state.params[0] - p, torch.full((4,), -0.1, dtype=torch.bfloat16),
                               rtol=0, atol=1e-2)  # fmt: skip
    state.params[0].float().sum().backward()
    assert log_rate.grad is not None and log_rate.grad.item() < 0


# ---------------------------------------------------------------------------------------------
# Differentiability: with a tensor in the graph the single-tensor path stays the pure step.


@pytest.mark.parametrize("cls", [metalr.AdamHD, metalr.SGDHD], ids=lambda c: c.__name__)
def test_differentiable_step_keeps_the_graph(cls) -> None:
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    p = w.clone()  # non-leaf, as torch's differentiable optimizer tests do
    opt = cls([p], lr=lr, differentiable=True)
    for scale in (1.0, -0.5):
        p.grad = (scale * p).detach() + 0.1
        opt.step()
    assert p.grad_fn is not None
    (p * p).sum().backward()
    assert w.grad is not None and lr.grad is not None and lr.grad.item() != 0

    # Same numbers as the in-place face with autograd off.
    q = w.detach().clone()
    ref = cls([q], lr=0.05, differentiable=False, foreach=False)
    for scale in (1.0, -0.5):
        q.grad = scale * q + 0.1
        ref.step()
    torch.testing.assert_close(p.detach(), q, rtol=1e-14, atol=1e-14)


def _unrolled(cls, w0: torch.Tensor, lr: torch.Tensor, options: dict) -> torch.Tensor:
    """Three differentiable steps whose gradients are in the graph too (functions of ``w0``, as
    in torch's own gradchecks of differentiable optimizers): the graph then saves the moments
    and buffers the steps overwrite."""
    p = w0.clone()
    opt = cls([p], lr=lr, differentiable=True, **options)
    for t in range(3):
        p.grad = torch.sin((t + 1) * w0) + 0.1 * t
        opt.step()
    return p


@pytest.mark.parametrize("cls", [metalr.AdamHD, metalr.SGDHD], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "options",
    [
        {"hypergrad_lr": 0.0},
        {},
        {"rule": "normalized"},
        {"granularity": "element"},
        {"seek": {"horizon": 0.9, "turn_threshold": 1.0}},
    ],
    ids=["beta0", "seek", "normalized", "element", "horizon"],
)  # horizon: settled after the first step, so the later steps read the trail
def test_differentiable_steps_match_finite_differences(cls, options) -> None:
    """Several steps under autograd with weight decay and gradients in the graph: d p_3 / d w_0
    and d p_3 / d lr equal central finite differences (the step reads clones of the state it
    overwrites; it raised "modified by an inplace operation" before). torch's SGD differs here:
    it detaches the first momentum buffer."""
    options = {"weight_decay": 0.1, **options}
    if cls is metalr.SGDHD:
        options["momentum"] = 0.9
    w0 = torch.tensor([0.3, -1.2, 0.7, 0.1], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    grad_w, grad_lr = torch.autograd.grad(_unrolled(cls, w0, lr, options).sum(), (w0, lr))

    def total(w: torch.Tensor, rate: torch.Tensor) -> float:
        return float(_unrolled(cls, w.requires_grad_(), rate, options).sum().detach())

    h = 1e-6
    for i in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = h
        fd = (total(w0.detach() + e, lr.detach()) - total(w0.detach() - e, lr.detach())) / (2 * h)
        assert abs(grad_w[i].item() - fd) < 1e-6, (i, grad_w[i].item(), fd)
    fd_lr = (total(w0.detach(), lr.detach() + h) - total(w0.detach(), lr.detach() - h)) / (2 * h)
    assert abs(grad_lr.item() - fd_lr) < 1e-6 * max(1.0, abs(fd_lr))


def test_tracks_grad() -> None:
    leaf = torch.zeros((), requires_grad=True)
    assert tracks_grad([torch.zeros(2)], {"lr": leaf})
    assert tracks_grad([[torch.zeros(2), leaf]])
    assert not tracks_grad([torch.zeros(2)], {"lr": 0.1, "shards": None})
    with torch.no_grad():
        assert not tracks_grad(leaf)
