r"""Adam with hypergradient learning-rate adaptation (Adam-HD, Baydin et al. 2018, Alg. 5).

With gradient :math:`g_t` (plus :math:`\lambda\theta` for coupled weight decay), scheduled rate
:math:`\eta_t` = ``group['lr']`` and learned multiplier :math:`m` (one per group, tensor or element)::

    d_{t-1} = m̂_{t-1} / (√v̂_{t-1} + ε)                 # recomputed from state: no extra buffer
    m       ← rule(m, ⟨g_t, d_{t-1}⟩)                     # see metalr.functional._hypergrad
    m_t     = β1 m_{t-1} + (1-β1) g_t
    v_t     = β2 v_{t-1} + (1-β2) g_t²
    θ_t     = θ_{t-1} (1 - η_t λ)  [decoupled only]  -  η_t · m · m̂_t / (√v̂_t + ε)

**Lagged mode** (``lagged=True``): the multiplier computed from step t's hypergradient is applied
from step t+1, so the Adam half no longer waits for the reduction and a kernel does the whole step
in one pass (read g, m, v, θ once, write m, v, θ once, accumulating the sums on the way)::

    d_{t-1} = m̂_{t-1} / (√v̂_{t-1} + ε)                 # recomputed in registers, step t-1 (≥ 1)
    m_t, v_t as above;  θ_t = θ_{t-1} (1 - η_t λ)  -  η_t · m_{t-1} · m̂_t / (√v̂_t + ε)
    m       ← rule(m_{t-1}, ⟨g_t, d_{t-1}⟩)               # afterwards: used by step t+1

The hypergradient is the same ``-⟨g_t, d_{t-1}⟩`` (the direction applied at step t-1 is still
``d_{t-1}``); only the step that first uses the new rate moves. A one-pass step cannot know before
writing whether some gradient entry is NaN/inf, so the skip is per element: an element whose
gradient is not finite keeps its θ, m, v; the multipliers (and seek controllers) change only when
every gradient is finite. ``grads_finite`` (the flag of other param groups) is known beforehand
and skips the whole step, step counter included. The exact mode (default) is the reference.

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

from metalr.functional._adam_foreach import _multi_tensor_adam_hd
from metalr.functional._common import (
    as_real_list,
    broadcast_rate,
    commit_update,
    default_foreach,
    element_keep,
    from_real,
    host_readable,
    negate_if,
    pow_tensor,
    safe_sqrt,
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
from metalr.functional._moment_restart import (
    KernelRestart,
    first_turns,
    match_in_place,
    matched,
    matched_rates,
    requested,
    restart_in_place,
    restarted,
    turn_counts,
)
from metalr.functional._signals import check_step_inputs


class AdamHDState(NamedTuple):
    """Tensors an Adam-HD step reads and produces (one entry per parameter)."""

    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    rates: list[Tensor]
    steps: list[Tensor]


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
    bias1 = 1 - pow_tensor(beta1, t)
    bias2_sqrt = (1 - pow_tensor(beta2, t)).sqrt()
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
    if isinstance(beta1, Tensor):  # the compiled fused=True step's (a cycled beta1 recompiles)
        m_new = m_r + (g_r - m_r) * (1 - beta1)
    else:
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
    lagged: bool = False,
    trails: Sequence[Tensor] | None = None,
) -> (
    AdamHDState | tuple[AdamHDState, list[Tensor]] | tuple[AdamHDState, list[Tensor], list[Tensor]]
):
    """One Adam-HD step as a pure function: returns new tensors, mutates nothing.

    ``lagged=True``: the one-step-lagged rate of the module docstring (the Adam half uses the
    multipliers from before this step; the new ones are returned for the next).

    With ``rule="seek"`` pass the controller vectors (``controllers``, see
    :mod:`metalr.functional._controller`) and the constants ``seek``; the step then returns
    ``(state, new_controllers)``; with ``seek["horizon"] > 0`` pass the trails too (``trails``,
    see :mod:`metalr.functional._trail`) and it returns ``(state, new_controllers, new_trails)``.

    If any gradient is non-finite the step is skipped: every returned tensor equals its input
    (lagged: per element, see the module docstring).

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
    check_step_inputs(granularity, rule, params=params, grads=grads, exp_avgs=exp_avgs,
                      exp_avg_sqs=exp_avg_sqs, rates=rates, steps=steps, controllers=controllers)  # fmt: skip
    grads = negate_if(grads, maximize)
    prev_dirs = [
        _complex_if(adam_direction(m, v, s, beta1, beta2, eps), g)
        for m, v, s, g in zip(as_real_list(exp_avgs), as_real_list(exp_avg_sqs), steps, grads)
    ]
    new_rates, finite, new_controllers, new_trails, _ = adapt_rates(
        rates, grads, prev_dirs, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite, shards=shards,
        controllers=controllers, seek=seek, trails=trails,
    )  # fmt: skip
    out = AdamHDState([], [], [], [], [])
    applied = rates_in_use(rates if lagged else new_rates, lr, lr_bounds)
    for p, g, m, v, rate, new_rate, step, rate_used in zip(
        params, grads, exp_avgs, exp_avg_sqs, rates, new_rates, steps, applied
    ):
        p_new, m_new, v_new, step_new = _adam_tensor_step(
            p, g, m, v, step, rate_used, lr=lr, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        p_r, m_r, v_r = as_real_list([p, m, v])
        keep = element_keep(g, grads_finite) if lagged else finite
        out.params.append(from_real(select(keep, p_new, p_r), p))
        out.exp_avgs.append(from_real(select(keep, m_new, m_r), m))
        out.exp_avg_sqs.append(from_real(select(keep, v_new, v_r), v))
        out.rates.append(select(finite, new_rate, rate))
        step_keep = finite if not lagged else grads_finite
        out.steps.append(step_new if step_keep is None else select(step_keep, step_new, step))
    if requested(seek, controllers):  # a fresh Adam from the first turn on
        turned = first_turns(turn_counts(controllers), new_controllers)
        if matched(seek):  # whose first step keeps the size of the step the turn measured
            moments = zip(as_real_list(out.exp_avgs), as_real_list(out.exp_avg_sqs), out.steps)
            applied = [adam_direction(m, v, s, beta1, beta2, eps) for m, v, s in moments]
            out.rates[:] = matched_rates(out.rates, turned, applied, granularity, shards)
        for i, flag in enumerate(turned.unbind(0)):
            out.exp_avgs[i] = restarted(out.exp_avgs[i], flag)
            out.exp_avg_sqs[i] = restarted(out.exp_avg_sqs[i], flag)
            out.steps[i] = restarted(out.steps[i], flag)
    if trails is not None:
        return out, new_controllers, new_trails
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
        pure_step_in_place(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)
        return
    _in_place_adam_hd(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)


def pure_step_in_place(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    **hyper,
) -> None:
    """:func:`adam_hd_step`, its result copied into the state tensors
    (:func:`~metalr.functional._common.step_written_back`)."""
    state = AdamHDState(params, exp_avgs, exp_avg_sqs, rates, steps)
    step_written_back(adam_hd_step, state, grads, hyper)


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
    lagged: bool = False,
    **adapt,
) -> None:
    """:func:`adam_hd_step` in place on the CPU with autograd off (see the caller)."""
    original_grads = grads
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
    if not bool(update.finite):  # a skipped step: nothing changes (lagged: per element)
        if lagged:  # rare: the pure step's per-element skip, state untouched so far
            pure_step_in_place(
                params, original_grads, exp_avgs, exp_avg_sqs, rates, steps, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, lagged=True,
                decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, **adapt,
            )  # fmt: skip
        return
    if not lagged:
        commit_update(rates, adapt.get("controllers"), update, known_finite=True)
    applied = rates_in_use(rates, lr, adapt["lr_bounds"])
    for p, g, m, v, step, rate, buf in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, applied, scratch
    ):
        _adam_tensor_step(
            p, g, m, v, step, rate, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, out=buf,
        )  # fmt: skip
    if lagged:  # the new multipliers take effect from the next step
        commit_update(rates, adapt.get("controllers"), update, known_finite=True)


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
        hyper["shards"].participate(
            hyper["granularity"], hyper["rule"], hyper["hypergrad_lr"],
            restart_match=matched(hyper.get("seek")),
        )  # fmt: skip
        return
    # Adam's moments restart at a tensor's first turn (seek["moment_restart"]); a step autograd
    # records is the pure step, which restarts them itself. Otherwise the restart runs here,
    # once, after whichever path took the step (a path built on the pure step is told not to)
    controllers, seek = hyper.get("controllers"), hyper.get("seek")
    restart = requested(seek, controllers) and not tracks_grad(
        params, grads, exp_avgs, exp_avg_sqs, rates, steps, hyper
    )
    before = turn_counts(controllers) if restart else None
    request = KernelRestart(matched(seek)) if restart else None
    if restart:
        hyper["seek"] = {**seek, "moment_restart": 0.0}
    _dispatch_adam_hd(
        params, grads, exp_avgs, exp_avg_sqs, rates, steps, foreach=foreach, fused=fused,
        differentiable=differentiable, restart=request, **hyper,
    )  # fmt: skip
    if restart and not request.done:  # (the Triton step restarts in its writing launch)
        with sharded_context(params):
            turned = first_turns(before, controllers)
            if matched(seek):
                beta1, beta2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
                match_in_place(
                    rates, turned,
                    lambda i: adam_direction(*as_real_list([exp_avgs[i], exp_avg_sqs[i]]),
                                             steps[i], beta1, beta2, eps),
                    hyper["granularity"], hyper.get("shards"),
                )  # fmt: skip
            restart_in_place(turned, exp_avgs, exp_avg_sqs, steps)


def _dispatch_adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    rates: list[Tensor],
    steps: list[Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
    differentiable: bool,
    restart: KernelRestart | None = None,
    **hyper,
) -> None:
    """:func:`adam_hd`'s choice of path: a kernel, the compiled step, ``foreach`` or single
    tensors (``restart``: the moment restart, handed to the kernels, which may take it over)."""
    if fused:
        if differentiable or foreach:
            raise RuntimeError("fused=True does not support differentiable=True or foreach=True")
        check_fused_supported(params, "AdamHD")
        backend = kernel_backend(params, rates, hyper)  # Triton (CUDA) or C++ (CPU)
        if backend is not None:
            if backend.adam_hd_step(
                params, grads, exp_avgs, exp_avg_sqs, rates, steps, restart=restart, **hyper
            ):
                return None  # (declined: no C++ compiler; the eager path below)
        else:  # changing floats would recompile: lr and beta1 (cycled by OneCycleLR) as tensors
            hyper["lr"] = as_lr_tensor(hyper["lr"], rates)
            hyper["beta1"] = as_lr_tensor(hyper["beta1"], rates)
            return compiled(_single_tensor_adam_hd)(
                params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper
            )
    if fused is None and run_default_kernels(
        params, rates, hyper, foreach, differentiable,
        lambda backend: backend.adam_hd_step(
            params, grads, exp_avgs, exp_avg_sqs, rates, steps, restart=restart, **hyper
        ),
    ):  # fmt: skip
        return None
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    if foreach and differentiable:
        raise RuntimeError("foreach=True does not support differentiable=True")
    with sharded_context(params):
        if not foreach:
            _single_tensor_adam_hd(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)
        elif not _multi_tensor_adam_hd(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper):
            # a lagged step for the pure step (see _multi_tensor_adam_hd)
            pure_step_in_place(params, grads, exp_avgs, exp_avg_sqs, rates, steps, **hyper)
