r"""Adam with hypergradient learning-rate adaptation (Adam-HD, Baydin et al. 2018, Alg. 5).

With gradient :math:`g_t` (plus :math:`\lambda\theta` for coupled weight decay), scheduled rate
:math:`\eta_t` = ``group['lr']`` and learned multiplier :math:`m` (one per group, tensor or element)::

    d_{t-1} = m̂_{t-1} / (√v̂_{t-1} + ε)                 # recomputed from state: no extra buffer
    m       ← rule(m, ⟨g_t, d_{t-1}⟩)                     # see metalr.functional._hypergrad
    m_t     = β1 m_{t-1} + (1-β1) g_t
    v_t     = β2 v_{t-1} + (1-β2) g_t²
    θ_t     = θ_{t-1} (1 - η_t λ)  [decoupled only]  -  η_t · m · m̂_t / (√v̂_t + ε)

Bias corrections and the direction are computed in float32 at least (bf16(0.999) == 1.0 would
make ``1 - β2^t`` vanish for bfloat16 parameters).

Departure from torch's AdamW: decoupled weight decay follows the scheduled rate η_t (Loshchilov &
Hutter's schedule multiplier), not the learned multiplier, so the hypergradient stays exact and
adaptation cannot inflate the decay. With ``hypergrad_lr=0`` every path equals ``torch.optim.Adam``
/ ``AdamW``.

Three faces of one rule:

* :func:`adam_hd_step` — pure and differentiable (``torch.func``/``vmap``-able); the meta-learner
  calls it with grad. Its per-tensor math (:func:`_adam_tensor_step`, :func:`adam_direction`) is
  written once with ``out=`` arguments: the single-tensor path runs the same operations in place
  when autograd is off (bit for bit the pure step), else the pure step plus a write-back.
* :func:`adam_hd` — the in-place functional the optimizer calls; dispatches to the single-tensor
  path or the ``foreach`` twin (checked equal in float64 by the tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    default_foreach,
    from_real,
    host_readable,
    negate_if,
    safe_sqrt,
    select,
    sharded_context,
    torch_fused_kernel_applies,
    tracks_grad,
    write_back,
)
from metalr.functional._distributed import ShardReducer
from metalr.functional._fused import as_lr_tensor, check_fused_supported, compiled
from metalr.functional._hypergrad import RateUpdate, adapt_rates


class AdamHDState(NamedTuple):
    """Tensors an Adam-HD step reads and produces (one entry per parameter)."""

    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    rates: list[Tensor]
    steps: list[Tensor]


def _pow(base: float, exponent: Tensor) -> Tensor:
    """``base ** exponent`` with the base as a tensor: under torch.compile a Python float base
    becomes a symbolic float when schedulers change betas (OneCycleLR), and ``float ** tensor``
    with a symbolic base computed wrong results on torch 2.13."""
    if torch.compiler.is_compiling():  # as_tensor specializes the float: correct values
        base_t = torch.as_tensor(base, dtype=exponent.dtype, device=exponent.device)
    else:  # a fill kernel, no host-to-device copy: capturable in a CUDA graph
        base_t = torch.full((), base, dtype=exponent.dtype, device=exponent.device)
    return torch.pow(base_t, exponent)


def direction_dtype(t: Tensor) -> torch.dtype:
    """Dtype the Adam direction and its bias corrections are computed in: the tensor's real dtype,
    at least float32 (in bfloat16, 0.999 rounds to 1.0 and ``1 - β2^t`` vanishes)."""
    real = t.real.dtype if t.is_complex() else t.dtype
    return torch.promote_types(real, torch.float32)


def adam_direction(
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``m̂ / (√v̂ + ε)`` for moments after ``step`` updates (zero while ``step == 0``).

    Computed as ``m / ((1 - β1^t) (√v / √(1 - β2^t) + ε))`` in :func:`direction_dtype` (float32
    for half-precision moments). Without ``out`` it is differentiable, with a square root whose
    backward is safe at 0 so second derivatives stay finite (dead units give ``v = 0``). With
    ``out`` (real, of the direction dtype; autograd off) the same operations run into ``out``:
    the in-place face, equal bit for bit.
    """
    acc = direction_dtype(exp_avg)
    t = step.to(acc).clamp_min(1)
    bias1 = 1 - _pow(beta1, t)
    bias2_sqrt = (1 - _pow(beta2, t)).sqrt()
    if out is None:
        denom = safe_sqrt(exp_avg_sq.to(acc))
    else:
        denom = torch.sqrt(
            exp_avg_sq if exp_avg_sq.dtype == acc else out.copy_(exp_avg_sq), out=out
        )
    denom = torch.div(denom, bias2_sqrt, out=out)
    denom = torch.add(denom, eps, out=out)
    denom = torch.mul(denom, bias1, out=out)
    return torch.div(exp_avg, denom, out=out)


def _complex_if(d: Tensor, like: Tensor) -> Tensor:
    """A direction computed on ``like``'s real view, as ``like``'s complex view if it is complex."""
    return torch.view_as_complex(d.contiguous()) if like.is_complex() else d


def _adam_tensor_step(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    step: Tensor,
    rate: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Adam half of the step for one tensor with multiplier ``rate``: the math, written once.

    Without ``out`` it returns new real tensors ``(θ, m, v, step)`` (pure, differentiable). With
    ``out`` (a scratch buffer for the direction, autograd off) the same operations write into
    ``p``, ``m``, ``v`` and ``step`` themselves: the single-tensor path's in-place face.
    """
    into = out is not None
    p_r, g_r, m_r, v_r = as_real_list([p, g, m, v])
    if weight_decay != 0 and not decoupled_weight_decay:
        g_r = torch.add(g_r, p_r, alpha=weight_decay)
    m_new = torch.lerp(m_r, g_r, 1 - beta1, out=m_r if into else None)
    v_new = torch.mul(v_r, beta2, out=v_r if into else None)
    v_new = torch.addcmul(v_new, g_r, g_r, value=1 - beta2, out=v_r if into else None)
    step_new = torch.add(step, 1, out=step if into else None)
    direction = adam_direction(m_new, v_new, step_new, beta1, beta2, eps, out=out)
    p_new = p_r
    if decoupled_weight_decay and weight_decay != 0:
        p_new = torch.mul(p_r, 1 - lr * weight_decay, out=p_r if into else None)
    step_size = lr * broadcast_rate(rate, p)
    p_new = torch.addcmul(p_new, direction, step_size, value=-1, out=p_r if into else None)
    return p_new, m_new, v_new, step_new


def adam_hd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    rates: Sequence[Tensor],
    steps: Sequence[Tensor],
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
) -> AdamHDState | tuple[AdamHDState, list[Tensor]]:
    """One Adam-HD step as a pure function: returns new tensors, mutates nothing.

    With ``rule="seek"`` pass the controller vectors (``controllers``, see
    :mod:`metalr.functional._controller`) and the constants ``seek``; the step then returns
    ``(state, new_controllers)``.

    If any gradient is non-finite the step is skipped: every returned tensor equals its input.

    Example (meta-learning the initial rate through two steps)::

        log_rate = torch.zeros((), requires_grad=True)
        state = AdamHDState([w], [torch.zeros_like(w)], [torch.zeros_like(w)],
                            [log_rate.exp()], [torch.zeros(())])
        for _ in range(2):
            g = torch.func.grad(loss_fn)(state.params[0])
            state = adam_hd_step(*state[:1], [g], *state[1:], lr=1e-2, beta1=0.9, beta2=0.999,
                                 eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                                 hypergrad_lr=0.02, rule="normalized", granularity="tensor",
                                 lr_bounds=(0.0, float("inf")))
        loss_fn(state.params[0]).backward()   # reaches log_rate
    """
    grads = negate_if(grads, maximize)
    prev_dirs = [
        _complex_if(adam_direction(m, v, s, beta1, beta2, eps), g)
        for m, v, s, g in zip(as_real_list(exp_avgs), as_real_list(exp_avg_sqs), steps, grads)
    ]
    new_rates, finite, new_controllers = adapt_rates(
        rates, grads, prev_dirs, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite, shards=shards,
        controllers=controllers, seek=seek,
    )  # fmt: skip
    out = AdamHDState([], [], [], [], [])
    for p, g, m, v, rate, new_rate, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, rates, new_rates, steps
    ):
        p_new, m_new, v_new, step_new = _adam_tensor_step(
            p, g, m, v, step, new_rate, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        p_r, m_r, v_r = as_real_list([p, m, v])
        out.params.append(from_real(select(finite, p_new, p_r), p))
        out.exp_avgs.append(from_real(select(finite, m_new, m_r), m))
        out.exp_avg_sqs.append(from_real(select(finite, v_new, v_r), v))
        out.rates.append(select(finite, new_rate, rate))
        out.steps.append(select(finite, step_new, step))
    return out if controllers is None else (out, new_controllers)


def _single_tensor_adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    **hyper,
) -> None:
    """The pure step applied in place, tensor by tensor.

    Under autograd (a tensor in the step requires grad), under ``torch.compile`` (``fused=True``)
    and where the all-finite flag is not free to read (accelerators), it is literally
    :func:`adam_hd_step` plus a write-back. Otherwise (the CPU, autograd off) the same per-tensor
    math runs in place (:func:`_adam_tensor_step` with ``out=``): same operations, same bits,
    without the pure step's temporaries, selects and copies.
    """
    if (
        not params
        or torch.compiler.is_compiling()
        or not host_readable(rates[0])
        or tracks_grad(params, grads, exp_avgs, exp_avg_sqs, rates, steps, hyper)
    ):
        new = adam_hd_step(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)
        if hyper.get("controllers") is not None:
            new, new_controllers = new
            write_back((hyper["controllers"],), (new_controllers,))
        write_back(AdamHDState(params, exp_avgs, exp_avg_sqs, rates, steps), new)
        return
    _in_place_adam_hd(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)


def _in_place_adam_hd(
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
    maximize: bool = False,
    **adapt,
) -> None:
    """:func:`adam_hd_step` in place on the CPU with autograd off (see the caller)."""
    grads = negate_if(grads, maximize)
    m_r, v_r = as_real_list(exp_avgs), as_real_list(exp_avg_sqs)
    # d_{t-1} into scratch buffers, which then take d_t: the direction is computed once a step.
    scratch = [torch.empty_like(m, dtype=direction_dtype(m)) for m in m_r]
    prev_dirs = [
        _complex_if(adam_direction(m, v, s, beta1, beta2, eps, out=buf), g)
        for m, v, s, buf, g in zip(m_r, v_r, steps, scratch, grads)
    ]
    update = adapt_rates(rates, grads, prev_dirs, lr=lr, **adapt)
    del prev_dirs
    if not bool(update.finite):  # a skipped step: nothing changes
        return
    commit_update(rates, adapt.get("controllers"), update, known_finite=True)
    for p, g, m, v, step, rate, buf in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, rates, scratch
    ):
        _adam_tensor_step(
            p, g, m, v, step, rate, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, out=buf,
        )  # fmt: skip


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
) -> None:
    """In-place ``foreach`` twin of :func:`adam_hd_step` (same math, fewer kernel launches).

    On the CPU in eager mode the all-finite flag and step counters are read on the host (that
    costs nothing there), so the common finite step runs with plain scalars; on accelerators and
    under ``torch.compile`` nothing is read back and a skipped step is folded in as ``keep = 0``.
    """
    if not params:
        return
    grads = torch._foreach_neg(grads) if maximize else list(grads)
    p_r, g_r, m_r, v_r = (as_real_list(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs))
    host = host_readable(rates[0])
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
        controllers=controllers, seek=seek,
    )  # fmt: skip
    finite = update.finite
    del prev_dirs
    # 3. Adam moments; a non-finite step leaves everything as it was.
    if host and not bool(finite):
        return
    if torch_fused_kernel_applies("_fused_adam_", params, rates):
        _fused_kernel_update(
            params, grads, exp_avgs, exp_avg_sqs, rates, controllers, update, steps, host,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        return
    if host:
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
    if rates[0].dim() > 0 and all(r.dtype == d.dtype for r, d in zip(rates, denom)):
        # Element rates: divide by the scalar part, then by the rates, in place (no temporaries).
        torch._foreach_div_(denom, _scalars(_scale(-(lr * keep), bc1), denom, host))
        torch._foreach_div_(denom, [broadcast_rate(r, p) for r, p in zip(rates, params)])
    else:
        torch._foreach_div_(denom, _negative_step_sizes(rates, params, denom, lr * keep, bc1))
    torch._foreach_addcdiv_(p_r, m_r, denom)


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
        return 1 - _pow(beta1, t), (1 - _pow(beta2, t)).sqrt()
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
) -> None:
    """The Adam half of the step through ``torch._fused_adam_``, one call per tensor with its
    effective rate ``lr · m`` as a tensor and ``found_inf`` doing the skip on the device.

    Same update as :func:`adam_hd_step` (torch's kernel computes it in one pass); decoupled decay
    stays on the scheduled ``lr`` and is applied here, outside the kernel.
    """
    finite = update.finite
    if host:  # finite for sure (the caller returned otherwise)
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
    for p, g, m, v, rate, step in zip(params, grads, exp_avgs, exp_avg_sqs, rates, steps):
        rate_lr = (rate * lr).to(device=p.device, dtype=p.dtype)
        torch._fused_adam_(
            [p], [g], [m], [v], [], [step], amsgrad=False, lr=rate_lr, beta1=beta1, beta2=beta2,
            weight_decay=coupled, eps=eps, maximize=False, grad_scale=None,
            found_inf=found_inf.to(p.device) if found_inf is not None else None,
        )  # fmt: skip
    if found_inf is not None:  # a skipped step does not count
        torch._foreach_sub_(steps, [found_inf.to(s.device) for s in steps])


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


def adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
    **hyper,
) -> None:
    """In-place Adam-HD step over lists of tensors; see :class:`metalr.AdamHD` for the arguments.

    Dispatches like ``torch.optim.adam.adam``: ``foreach=None`` picks the multi-tensor path when
    every tensor is a plain tensor on a supported device; ``differentiable=True`` always takes
    the single-tensor path so rates and weights stay in the autograd graph.
    """
    if not params and hyper.get("shards") is not None:
        hyper["shards"].participate(hyper["granularity"], hyper["rule"])
        return None
    if fused:
        if differentiable or foreach:
            raise RuntimeError("fused=True does not support differentiable=True or foreach=True")
        hyper["lr"] = as_lr_tensor(hyper["lr"], rates)  # a changing float would recompile
        check_fused_supported(params, "AdamHD")
        return compiled(_single_tensor_adam_hd)(
            params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper
        )
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    if foreach and differentiable:
        raise RuntimeError("foreach=True does not support differentiable=True")
    fn = _multi_tensor_adam_hd if foreach else _single_tensor_adam_hd
    with sharded_context(params):
        fn(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)
