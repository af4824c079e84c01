"""Mixed precision on the CPU: ``torch.autocast`` + ``torch.amp.GradScaler``, and bf16 parameters.

On torch 2.13's CPU build, autocast supports both float16 and bfloat16, and ``GradScaler("cpu")``
works (inf/NaN check, unscale, skip, backoff). The tests use float16 autocast with a float32 model
and an initial scale large enough that the float16 backward overflows: GradScaler skips those
steps (it does not call ``optimizer.step()``), so the rates must not move on exactly the steps
where ``scaler.get_scale()`` decreased, and move on the others.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.optim._base import RATE_KEY

# ``eps`` of the Adam variants: 1e-8 underflows to 0 in float16, and torch.optim.Adam itself
# turns float16 parameters to NaN in two steps with it (measured), so float16 runs use 1e-4.
OPTIMIZERS = {
    "SGDHD": lambda p, g, eps: metalr.SGDHD(
        p, lr=0.05, momentum=0.9, hypergrad_lr=0.05, granularity=g
    ),
    "AdamHD": lambda p, g, eps: metalr.AdamHD(
        p, lr=1e-2, eps=eps, hypergrad_lr=0.05, granularity=g
    ),
    "AdamWHD": lambda p, g, eps: metalr.AdamWHD(
        p, lr=1e-2, eps=eps, hypergrad_lr=0.05, granularity=g
    ),
    "HyperLR(Adam)": lambda p, g, eps: metalr.HyperLR(
        torch.optim.Adam(p, lr=1e-2, eps=eps), hypergrad_lr=0.05, granularity=g
    ),
}


def _problem(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x[:, :1]) - 0.5 * x[:, 1:2]
    return model, x.to(dtype), y.to(dtype)


def _controllers(opt: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    """The seek rule's controller vectors (empty for the other rules)."""
    return [opt.state[p]["hd_controller"].clone() for p in model.parameters()
            if "hd_controller" in opt.state[p]]  # fmt: skip


def _rates(opt: torch.optim.Optimizer, model: nn.Module) -> list[torch.Tensor]:
    return [
        opt.state[p][RATE_KEY].clone() if RATE_KEY in opt.state[p] else torch.ones(())
        for p in model.parameters()
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.expand_as(y), y) for x, y in zip(a, b, strict=True))


def test_cpu_autocast_supports_float16_and_bfloat16() -> None:
    """What the tests below rely on (and what a user on CPU can pick)."""
    assert torch.amp.is_autocast_available("cpu")
    lin = nn.Linear(4, 4)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            assert lin(torch.randn(2, 4)).dtype == dtype
    torch.amp.GradScaler("cpu")  # constructs without warnings about a missing device


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_skipped_steps_skip_adaptation(name: str, granularity: str) -> None:
    model, x, y = _problem()
    opt = OPTIMIZERS[name](list(model.parameters()), granularity, 1e-8)
    # 2^20 overflows the float16 backward for the first few steps; growth every 3 steps then
    # overflows again now and then, so skipped and taken steps interleave.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
    skipped, taken, losses = [], [], []
    for step in range(40):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(model(x).float(), y)
        losses.append(loss.item())
        before_scale = scaler.get_scale()
        before_rates, before_ctrl = _rates(opt, model), _controllers(opt, model)
        before_params = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        after, after_ctrl = _rates(opt, model), _controllers(opt, model)
        assert all(torch.isfinite(r).all() for r in after)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if scaler.get_scale() < before_scale:  # GradScaler found inf/NaN: the step was skipped
            skipped.append(step)
            assert _same(before_rates, after) and _same(before_ctrl, after_ctrl)
            assert all(torch.equal(a, p) for a, p in zip(before_params, model.parameters()))
        else:
            taken.append(step)
            if len(taken) > 1:  # the first real step has no previous direction to adapt on
                # the rates move, or (seek, e.g. at its ceiling) at least its controller does
                moved = not _same(before_rates, after) or not _same(before_ctrl, after_ctrl)
                assert moved, f"rates did not move at step {step}"
    assert len(skipped) >= 6 and skipped[:4] == [0, 1, 2, 3]
    assert any(s > taken[0] for s in skipped)  # skips after training started, too
    assert len(taken) >= 20
    assert losses[-1] < 0.5 * losses[0]
    assert any((r != 1).any() for r in _rates(opt, model))


def test_bf16_autocast_with_grad_scaler() -> None:
    """bfloat16 autocast on a float32 model (GradScaler is a no-op in practice: bf16 has fp32's
    range); the rates are float32 and adapt."""
    model, x, y = _problem()
    opt = metalr.AdamHD(model.parameters(), lr=1e-2, hypergrad_lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    first = None
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        first = loss.item() if first is None else first
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert loss.item() < 0.5 * first
    rates = _rates(opt, model)
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in rates)
    assert all((r != 1).all() for r in rates)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "element"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_half_parameters_keep_float32_rates(name: str, granularity: str, dtype) -> None:
    eps = 1e-4 if dtype == torch.float16 else 1e-8
    model, x, y = _problem(dtype)
    opt = OPTIMIZERS[name](list(model.parameters()), granularity, eps)
    with torch.no_grad():
        first = F.mse_loss(model(x).float(), y.float()).item()
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
    with torch.no_grad():
        last = F.mse_loss(model(x).float(), y.float()).item()
    assert last < 0.7 * first
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    rates = _rates(opt, model)
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in rates)
    assert any((r != 1).any() for r in rates)
    eff = opt.effective_lrs()
    assert all(eff[p].dtype == torch.float32 for p in model.parameters())

    # The rates stay float32 through a checkpoint round trip (torch would cast them to bf16).
    model2, _, _ = _problem(dtype)
    opt2 = OPTIMIZERS[name](list(model2.parameters()), granularity, eps)
    opt2.load_state_dict(opt.state_dict())
    assert all(
        opt2.state[p2][RATE_KEY].dtype == torch.float32
        and torch.equal(opt2.state[p2][RATE_KEY], opt.state[p][RATE_KEY])
        for p, p2 in zip(model.parameters(), model2.parameters(), strict=True)
    )
