"""The ``foreach`` (multi-tensor) face of the Adam-HD step: :func:`metalr.functional.adam_hd`'s
default path, the same math as :func:`metalr.functional.adam_hd_step` in fewer kernel launches
(checked equal in float64 by the tests)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    from_real,
    host_readable,
    pow_tensor,
    torch_fused_kernel_applies,
)
from metalr.functional._distributed import ShardReducer
from metalr.functional._hypergrad import RateUpdate, adapt_rates, rates_in_use


def _multi_tensor_adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    maximize: bool = False,
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    lagged: bool = False,
    trails: Sequence[Tensor] | None = None,
) -> bool:
    """In-place ``foreach`` twin of :func:`adam_hd_step` (same math, fewer kernel launches).

    On the CPU in eager mode the all-finite flag and step counters are read on the host (that
    costs nothing there), so the common finite step runs with plain scalars; on accelerators and
    under ``torch.compile`` nothing is read back and a skipped step is folded in as ``keep = 0``.

    Returns False, having changed nothing, for a lagged step it leaves to the pure step: off the
    host, or with a non-finite gradient (the per-element skip).
    """
    if not params:
        return True
    host = host_readable(rates[0])
    if lagged and not host:
        return False
    grads = torch._foreach_neg(grads) if maximize else list(grads)
    p_r, g_r, m_r, v_r = (as_real_list(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs))
    # 1. previous direction d_{t-1} = m / (bc1 · (√v / √bc2 + ε)), from state before the update.
    prev_bc1, prev_bc2_sqrt = _bias_corrections(_step_values(steps, host), beta1, beta2, floor=1)
    scratch = torch._foreach_sqrt(v_r)
    torch._foreach_div_(scratch, _scalars(prev_bc2_sqrt, v_r, host))
    torch._foreach_add_(scratch, eps)
    torch._foreach_mul_(scratch, _scalars(prev_bc1, v_r, host))
    if host:  # CPU: write d_{t-1} over the denominator (large allocations cost page faults)
        for m, buf in zip(m_r, scratch):
            torch.div(m, buf, out=buf)
    else:  # accelerators: one multi-tensor kernel beats a loop of launches
        scratch = torch._foreach_div(m_r, scratch)
    prev_dirs = [from_real(d, g) for d, g in zip(scratch, grads)]
    # 2. hypergradient → new multipliers (shared math), and the all-finite flag.
    update = adapt_rates(
        rates, grads, prev_dirs, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite, shards=shards,
        controllers=controllers, seek=seek, trails=trails,
    )  # fmt: skip
    finite = update.finite
    del prev_dirs
    # 3. Adam moments; a non-finite step leaves everything as it was.
    if host and not bool(finite):
        return not lagged
    if torch_fused_kernel_applies("_fused_adam_", params, rates):
        _fused_kernel_update(
            params, grads, exp_avgs, exp_avg_sqs, rates, controllers, update, steps, host,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, lagged=lagged, lr_bounds=lr_bounds,
        )  # fmt: skip
        return True
    if host:
        if not lagged:
            commit_update(rates, controllers, update, known_finite=True)
        keep: float | Tensor = 1.0
        g_work = list(g_r)
        if weight_decay != 0 and not decoupled_weight_decay:
            g_work = torch._foreach_add(g_r, p_r, alpha=weight_decay)
        torch._foreach_lerp_(m_r, g_work, 1 - beta1)
        torch._foreach_mul_(v_r, beta2)
        torch._foreach_addcmul_(v_r, g_work, g_work, value=1 - beta2)
        del g_work
        torch._foreach_add_(steps, 1)
    else:
        commit_update(rates, controllers, update, known_finite=False)
        keep = finite.to(torch.float64)
        g_safe = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in g_r]
        if weight_decay != 0 and not decoupled_weight_decay:
            torch._foreach_add_(g_safe, p_r, alpha=weight_decay)
        torch._foreach_lerp_(m_r, g_safe, _scalars((1 - beta1) * keep, m_r, host))
        torch._foreach_mul_(v_r, _scalars(1 - (1 - beta2) * keep, v_r, host))
        g_scaled = torch._foreach_mul(g_safe, _scalars((1 - beta2) * keep, g_safe, host))
        torch._foreach_addcmul_(v_r, g_scaled, g_safe)
        del g_scaled, g_safe
        torch._foreach_add_(steps, _scalars(keep, steps, host))
    # 4. θ ← θ(1 - η λ) - η m (m̂ / (√v̂ + ε)), folding the step size into the denominator.
    bc1, bc2_sqrt = _bias_corrections(_step_values(steps, host), beta1, beta2)
    if decoupled_weight_decay and weight_decay != 0:
        torch._foreach_mul_(p_r, _scalars(1 - lr * weight_decay * keep, p_r, host))
    if host:
        for v, buf in zip(v_r, scratch):
            torch.sqrt(v, out=buf)
        denom = scratch
    else:
        del scratch
        denom = torch._foreach_sqrt(v_r)
    torch._foreach_div_(denom, _scalars(bc2_sqrt, v_r, host))
    torch._foreach_add_(denom, eps)
    applied = rates_in_use(rates, lr, lr_bounds)
    if applied[0].dim() > 0 and all(r.dtype == d.dtype for r, d in zip(applied, denom)):
        # Element rates: divide by the scalar part, then by the rates, in place (no temporaries).
        torch._foreach_div_(denom, _scalars(_scale(-(lr * keep), bc1), denom, host))
        torch._foreach_div_(denom, [broadcast_rate(r, p) for r, p in zip(applied, params)])
    else:
        torch._foreach_div_(denom, _negative_step_sizes(applied, params, denom, lr * keep, bc1))
    torch._foreach_addcdiv_(p_r, m_r, denom)
    if lagged:  # the new multipliers take effect from the next step (finite: host checked)
        commit_update(rates, controllers, update, known_finite=True)
    return True


def _step_values(steps: list[Tensor], host: bool) -> list[float] | Tensor:
    if host:
        return [float(s) for s in steps]
    return torch.stack([s.to(torch.float64) for s in steps])


def _bias_corrections(
    steps: list[float] | Tensor, beta1: float, beta2: float, floor: float = 0
) -> tuple[list[float] | Tensor, list[float] | Tensor]:
    """``1 - β1^t`` and ``√(1 - β2^t)`` per tensor (``t`` floored, e.g. at 1 for d_{t-1})."""
    if isinstance(steps, Tensor):
        t = steps.clamp_min(floor)
        return 1 - pow_tensor(beta1, t), (1 - pow_tensor(beta2, t)).sqrt()
    ts = [max(t, floor) for t in steps]
    return [1 - beta1**t for t in ts], [(1 - beta2**t) ** 0.5 for t in ts]


def _fused_kernel_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    controllers: Sequence[Tensor] | None,
    update: RateUpdate,
    steps: list[Tensor],
    host: bool,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    lagged: bool = False,
    lr_bounds: tuple[float, float] = (0.0, math.inf),
) -> None:
    """The Adam half of the step through ``torch._fused_adam_``, one call per tensor with its
    effective rate ``lr · m`` as a tensor and ``found_inf`` doing the skip on the device.

    Same update as :func:`adam_hd_step` (torch's kernel computes it in one pass); decoupled decay
    stays on the scheduled ``lr`` and is applied here, outside the kernel.
    """
    finite = update.finite
    if host:  # finite for sure (the caller returned otherwise)
        if not lagged:
            commit_update(rates, controllers, update, known_finite=True)
        found_inf = None
        keep: float | Tensor = 1.0
    else:
        commit_update(rates, controllers, update, known_finite=False)
        found_inf = (~finite).to(torch.float32)
        keep = finite.to(torch.float64)
    if decoupled_weight_decay and weight_decay != 0:
        torch._foreach_mul_(params, _scalars(1 - lr * weight_decay * keep, params, host))
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    torch._foreach_add_(steps, 1)  # the kernel reads the incremented count
    applied = rates_in_use(rates, lr, lr_bounds)
    for p, g, m, v, rate, step in zip(params, grads, exp_avgs, exp_avg_sqs, applied, steps):
        rate_lr = (rate * lr).to(device=p.device, dtype=p.dtype)
        torch._fused_adam_(
            [p], [g], [m], [v], [], [step], amsgrad=False, lr=rate_lr, beta1=beta1, beta2=beta2,
            weight_decay=coupled, eps=eps, maximize=False, grad_scale=None,
            found_inf=found_inf.to(p.device) if found_inf is not None else None,
        )  # fmt: skip
    if found_inf is not None:  # a skipped step does not count
        torch._foreach_sub_(steps, [found_inf.to(s.device) for s in steps])
    if lagged:  # host only: finite
        commit_update(rates, controllers, update, known_finite=True)


def _negative_step_sizes(
    rates: list[Tensor],
    params: list[Tensor],
    like: list[Tensor],
    lr: float | Tensor,
    bc1: list[float] | Tensor,
) -> list[Tensor]:
    """``-lr · m / (1 - β1^t)`` per tensor (one vectorised op when every rate is a scalar)."""
    same = all(r.dim() == 0 and r.dtype == rates[0].dtype and r.device == rates[0].device
               for r in rates)  # fmt: skip
    if same and all(t.dtype == like[0].dtype for t in like):
        bc1_vec = torch.as_tensor(bc1, dtype=rates[0].dtype).to(rates[0].device)
        steps = (torch.stack(rates) * (-lr / bc1_vec)).to(like[0].dtype)
        return list(steps.unbind())
    return [
        (broadcast_rate(r, p) * _as_rate_scalar(-lr / b, r)).to(d.dtype)
        for r, p, b, d in zip(rates, params, _unbind(bc1), like)
    ]


def _scale(value: float | Tensor, bc1: list[float] | Tensor) -> list[float] | Tensor:
    """``value / bc1`` per tensor: Python floats on the host path, a tensor otherwise."""
    if isinstance(bc1, Tensor) or isinstance(value, Tensor):
        return torch.as_tensor(value, dtype=torch.float64) / torch.as_tensor(
            bc1, dtype=torch.float64
        ).to(value.device if isinstance(value, Tensor) else "cpu")
    return [value / b for b in bc1]


def _unbind(values: list[float] | Tensor) -> list[float] | tuple[Tensor, ...]:
    return values.unbind() if isinstance(values, Tensor) else values


def _as_rate_scalar(value: float | Tensor, rate: Tensor) -> float | Tensor:
    return value.to(rate.dtype) if isinstance(value, Tensor) else value


def _scalars(values: float | list[float] | Tensor, like: list[Tensor], host: bool) -> list:
    """One scalar per entry of ``like``: Python floats on the host path, else 0-d tensors."""
    if host and not isinstance(values, Tensor):
        return list(values) if isinstance(values, list) else [values] * len(like)
    values = torch.as_tensor(values, dtype=torch.float64)
    values = values.expand(len(like)) if values.dim() == 0 else values
    if all(t.dtype == like[0].dtype and t.device == like[0].device for t in like):
        return list(values.to(device=like[0].device, dtype=like[0].dtype).unbind())
    return [v.to(device=t.device, dtype=t.dtype) for v, t in zip(values.unbind(), like)]
