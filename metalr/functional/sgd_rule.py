r"""SGD (with momentum / Nesterov) and hypergradient learning-rate adaptation (SGD-HD, SGDN-HD).

Baydin et al. 2018, Alg. 1 and 3. With gradient :math:`g_t` (plus :math:`\lambda\theta` for weight
decay), scheduled rate :math:`\eta_t` = ``group['lr']`` and learned multiplier :math:`m`::

    m  ← rule(m, ⟨g_t, d_{t-1}⟩)                  # see metalr.functional._hypergrad
    b_t = μ b_{t-1} + (1 - τ) g_t                 # b_1 = g_1, as torch.optim.SGD
    d_t = g_t            (μ = 0)
          b_t            (momentum)
          g_t + μ b_t    (Nesterov)
    θ_t = θ_{t-1} - η_t · m · d_t

``d_{t-1}`` is the momentum buffer before its update for plain momentum (no extra state); plain SGD
and Nesterov keep it in one buffer, ``prev_direction``.

**Lagged mode** (``lagged=True``, see :mod:`metalr.functional.adam_rule`): ``θ_t = θ_{t-1} - η_t ·
m_{t-1} · d_t``, and ``m ← rule(m_{t-1}, ⟨g_t, d_{t-1}⟩)`` afterwards, for step t+1: one pass
over g, b (or the stored direction) and θ. A non-finite gradient element keeps its θ and buffers;
the multipliers move only when every gradient is finite. With ``hypergrad_lr=0`` every path equals
``torch.optim.SGD``.

Faces: :func:`sgd_hd_step` (pure, differentiable, ``vmap``-able) and :func:`sgd_hd` (in place,
dispatching between the single-tensor path and its ``foreach`` twin,
:mod:`metalr.functional._sgd_foreach`; the state and the last direction are
:mod:`metalr.functional._sgd_common`). The per-tensor math
(:func:`_sgd_tensor_step`) is written once; the single-tensor path runs it in place when autograd
is off (bit for bit the pure step), else the pure step plus a write-back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    default_foreach,
    element_keep,
    from_real,
    host_readable,
    negate_if,
    select,
    sharded_context,
    step_written_back,
    tracks_grad,
)
from metalr.functional._distributed import ShardReducer
from metalr.functional._fused import (
    as_lr_tensor,
    check_fused_supported,
    compiled,
    kernel_backend,
    run_default_kernels,
)
from metalr.functional._hypergrad import adapt_rates, rates_in_use
from metalr.functional._sgd_common import (
    SGDHDState,
    no_momentum,
    previous_directions,
    stores_prev_direction,
)
from metalr.functional._sgd_foreach import _multi_tensor_sgd_hd
from metalr.functional._signals import check_step_inputs


def sgd_hd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    prev_directions: Sequence[Tensor | None],
    rates: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
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
) -> SGDHDState | tuple[SGDHDState, list[Tensor]] | tuple[SGDHDState, list[Tensor], list[Tensor]]:
    """One SGD-HD step as a pure function: returns new tensors, mutates nothing.

    ``lagged=True``: the one-step-lagged rate (the module docstring; per-element skip).

    With ``rule="seek"`` pass the controller vectors (``controllers``, see
    :mod:`metalr.functional._controller`) and the constants ``seek``; the step then returns
    ``(state, new_controllers)``; with ``seek["horizon"] > 0`` pass the trails too (``trails``,
    see :mod:`metalr.functional._trail`) and it returns ``(state, new_controllers, new_trails)``.

    A ``None`` buffer means "not created yet" (first step). If any gradient is non-finite the
    step is skipped and every returned tensor equals its input.

    Example::

        state = SGDHDState([w], [None], [None], [torch.ones(())])
        g = torch.func.grad(loss_fn)(w)
        state = sgd_hd_step(state.params, [g], *state[1:], lr=0.1, momentum=0.0,
                            dampening=0.0, weight_decay=0.0, nesterov=False, hypergrad_lr=0.02,
                            rule="normalized", granularity="tensor", lr_bounds=(0.0, 1e3))
    """
    check_step_inputs(granularity, rule, params=params, grads=grads,
                      momentum_buffers=momentum_buffers, prev_directions=prev_directions,
                      rates=rates, controllers=controllers)  # fmt: skip
    grads = negate_if(grads, maximize)
    prev = previous_directions(params, momentum_buffers, prev_directions, momentum, nesterov)
    new_rates, finite, new_controllers, new_trails, _ = adapt_rates(
        rates, grads, prev, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite, shards=shards,
        controllers=controllers, seek=seek, trails=trails,
    )  # fmt: skip
    keep_direction = stores_prev_direction(momentum, nesterov)
    out = SGDHDState([], [], [], [])
    applied = rates_in_use(rates if lagged else new_rates, lr, lr_bounds)
    for p, g, buf, old_dir, rate, new_rate, rate_used in zip(
        params, grads, momentum_buffers, prev_directions, rates, new_rates, applied
    ):
        p_new, new_buf, d = _sgd_tensor_step(
            p, g, buf, rate_used, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        )  # fmt: skip
        p_r = as_real_list([p])[0]
        keep = element_keep(g, grads_finite) if lagged else finite
        out.params.append(from_real(select(keep, p_new, p_r), p))
        if new_buf is not None:
            old_buf = as_real_list([buf])[0] if buf is not None else torch.zeros_like(new_buf)
            out.momentum_buffers.append(from_real(select(keep, new_buf, old_buf), p))
        else:
            out.momentum_buffers.append(None)
        if keep_direction:
            old = as_real_list([old_dir])[0] if old_dir is not None else torch.zeros_like(d)
            out.prev_directions.append(from_real(select(keep, d, old), p))
        else:
            out.prev_directions.append(None)
        out.rates.append(select(finite, new_rate, rate))
    if trails is not None:
        return out, new_controllers, new_trails
    return out if controllers is None else (out, new_controllers)


def _sgd_tensor_step(
    p: Tensor,
    g: Tensor,
    buf: Tensor | None,
    rate: Tensor,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The SGD half of the step for one tensor with multiplier ``rate``: the math, written once.

    Returns real tensors ``(θ, b, d)`` (``b`` None without momentum; ``d`` may alias the gradient).
    Pure and differentiable by default; with ``inplace`` (autograd off) the same operations write
    into ``p`` and an existing buffer (a new buffer is a copy of ``d``, as in torch.optim.SGD).
    """
    p_r, g_r = as_real_list([p, g])
    d = torch.add(g_r, p_r, alpha=weight_decay) if weight_decay != 0 else g_r
    new_buf = None
    if not no_momentum(momentum):
        if buf is None:  # b_1 = g_1
            new_buf = torch.clone(d) if inplace else d
        else:
            b = as_real_list([buf])[0]
            new_buf = torch.mul(b, momentum, out=b if inplace else None)
            new_buf = torch.add(new_buf, d, alpha=1 - dampening, out=b if inplace else None)
        if nesterov:
            d = (d + momentum * new_buf if isinstance(momentum, Tensor)
                 else torch.add(d, new_buf, alpha=momentum))  # fmt: skip
        else:
            d = new_buf
    step_size = lr * broadcast_rate(rate, p)
    p_new = torch.addcmul(p_r, d, step_size, value=-1, out=p_r if inplace else None)
    return p_new, new_buf, d


def _single_tensor_sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    rates: list[Tensor],
    **hyper,
) -> SGDHDState:
    """The pure step applied in place, tensor by tensor.

    Under autograd, under ``torch.compile`` (``fused=True``) and where the all-finite flag is not
    free to read (accelerators), it is :func:`sgd_hd_step` plus a write-back; otherwise (the CPU,
    autograd off) the same per-tensor math runs in place (:func:`_sgd_tensor_step`).
    """
    if (
        params
        and not torch.compiler.is_compiling()
        and host_readable(rates[0])
        and not tracks_grad(params, grads, momentum_buffers, prev_directions, rates, hyper)
    ):
        return _in_place_sgd_hd(params, grads, momentum_buffers, prev_directions, rates, **hyper)
    return pure_step_in_place(params, grads, momentum_buffers, prev_directions, rates, **hyper)


def pure_step_in_place(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    rates: list[Tensor],
    **hyper,
) -> SGDHDState:
    """:func:`sgd_hd_step`, its result copied into the state tensors (new buffers returned;
    :func:`~metalr.functional._common.step_written_back`)."""
    state = SGDHDState(params, momentum_buffers, prev_directions, rates)
    new = step_written_back(sgd_hd_step, state, grads, hyper)
    # Buffers created by this step may alias a gradient in the pure result: store copies.
    bufs = [b if b is not None else (n.clone() if n is not None else None)
            for b, n in zip(momentum_buffers, new.momentum_buffers)]  # fmt: skip
    dirs = [d if d is not None else (n.clone() if n is not None else None)
            for d, n in zip(prev_directions, new.prev_directions)]  # fmt: skip
    return SGDHDState(list(params), bufs, dirs, list(rates))


def _in_place_sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    rates: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool = False,
    lagged: bool = False,
    **adapt,
) -> SGDHDState:
    """:func:`sgd_hd_step` in place on the CPU with autograd off (see the caller)."""
    original_grads = grads
    grads = negate_if(grads, maximize)
    prev = previous_directions(params, momentum_buffers, prev_directions, momentum, nesterov)
    update = adapt_rates(rates, grads, prev, lr=lr, **adapt)
    del prev
    bufs, dirs = list(momentum_buffers), list(prev_directions)
    if not bool(update.finite):  # a skipped step: nothing changes (lagged: per element)
        if lagged:  # rare: the pure step's per-element skip, state untouched so far
            return pure_step_in_place(
                params, original_grads, momentum_buffers, prev_directions, rates, lr=lr,
                momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                nesterov=nesterov, maximize=maximize, lagged=True, **adapt,
            )  # fmt: skip
        return SGDHDState(list(params), bufs, dirs, list(rates))
    if not lagged:
        commit_update(rates, adapt.get("controllers"), update, known_finite=True)
    keep_direction = stores_prev_direction(momentum, nesterov)
    applied = rates_in_use(rates, lr, adapt["lr_bounds"])
    for i, (p, g, rate) in enumerate(zip(params, grads, applied)):
        _, new_buf, d = _sgd_tensor_step(
            p, g, bufs[i], rate, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, inplace=True,
        )  # fmt: skip
        if bufs[i] is None and new_buf is not None:
            bufs[i] = from_real(new_buf, p)
        if keep_direction:
            if dirs[i] is None:
                dirs[i] = torch.empty_like(p)
            as_real_list([dirs[i]])[0].copy_(d)
    if lagged:  # the new multipliers take effect from the next step
        commit_update(rates, adapt.get("controllers"), update, known_finite=True)
    return SGDHDState(list(params), bufs, dirs, list(rates))


def sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    rates: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
    **hyper,
) -> SGDHDState:
    """In-place SGD-HD step over lists of tensors; see :class:`metalr.SGDHD` for the arguments.

    Returns the state after the step; buffers created on the first step are new tensors there,
    so the caller stores them (as ``torch.optim.sgd.sgd`` does with ``momentum_buffer_list``).
    """
    if not params and hyper.get("shards") is not None:
        hyper["shards"].participate(hyper["granularity"], hyper["rule"], hyper["hypergrad_lr"])
        return SGDHDState([], [], [], [])
    if fused:
        if differentiable or foreach:
            raise RuntimeError("fused=True does not support differentiable=True or foreach=True")
        check_fused_supported(params, "SGDHD")
        backend = kernel_backend(params, rates, hyper)  # Triton (CUDA) or C++ (CPU, lagged)
        if backend is not None and (hyper.get("lagged") or backend.SGD_EXACT):
            if backend.sgd_hd_step(
                params, grads, momentum_buffers, prev_directions, rates, **hyper
            ):
                return SGDHDState(
                    list(params), list(momentum_buffers), list(prev_directions), rates
                )
            # declined (the first step: no buffers yet; no C++ compiler): the eager path below
        else:  # changing floats would recompile: lr and a non-zero momentum go as tensors
            hyper["lr"] = as_lr_tensor(hyper["lr"], rates)
            if not no_momentum(hyper["momentum"]):
                hyper["momentum"] = as_lr_tensor(hyper["momentum"], rates)
            return compiled(_single_tensor_sgd_hd)(
                params, grads, momentum_buffers, prev_directions, rates, **hyper
            )
    if fused is None and run_default_kernels(
        params, rates, hyper, foreach, differentiable,
        lambda backend: (hyper.get("lagged") or backend.SGD_EXACT) and backend.sgd_hd_step(
            params, grads, momentum_buffers, prev_directions, rates, **hyper
        ),
    ):  # fmt: skip
        return SGDHDState(list(params), list(momentum_buffers), list(prev_directions), rates)
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    if foreach and differentiable:
        raise RuntimeError("foreach=True does not support differentiable=True")
    with sharded_context(params):
        if not foreach:
            return _single_tensor_sgd_hd(
                params, grads, momentum_buffers, prev_directions, rates, **hyper
            )
        out = _multi_tensor_sgd_hd(params, grads, momentum_buffers, prev_directions, rates, **hyper)
        if out is None:  # a lagged step for the pure step (see _multi_tensor_sgd_hd)
            out = pure_step_in_place(
                params, grads, momentum_buffers, prev_directions, rates, **hyper
            )
        return out
