"""The hypergradient and the learning-rate update shared by every metalr rule.

Every metalr optimizer moves a parameter by ``θ_t = θ_{t-1} - lr · m_{t-1} · d_{t-1}``, where
``d_{t-1}`` is the optimizer's update direction (SGD: the (momentum) gradient, Adam:
``m̂/(√v̂+ε)``), ``lr`` the scheduled rate in the param group and ``m`` the learned multiplier.
The hypergradient of the loss at the new point with respect to the rate used to get there is
(Baydin et al., ICLR 2018, eq. 2)::

    ∂L(θ_t) / ∂α_{t-1} = -⟨g_t, d_{t-1}⟩,     α = lr · m,   g_t = ∇L(θ_t)

Three rules turn it into a new multiplier. ``"seek"`` (the default of the optimizers) finds the
rate's scale with a ramp that the hypergradient stops, then tracks it with a normalised signal;
its equations and state are in :mod:`metalr.functional._controller`. The two one-line rules:

``"additive"`` (the paper's update, so its ``hypergrad_lr`` β means what it means in the paper)::

    α_t = α_{t-1} + β ⟨g_t, d_{t-1}⟩          i.e.  m_t = m_{t-1} + β ⟨g_t, d_{t-1}⟩ / lr_t

``"normalized"`` (scale-free: updates the log-rate by the cosine between the gradient and the last
direction, so it stays positive and a β means the same for any model size)::

    log m_t = log m_{t-1} + β cos(g_t, d_{t-1})

At ``"element"`` granularity the cosine of two scalars is the sign of their product, which makes
the normalized rule Jacobs' (1988) delta-bar-delta / Rprop-style multiplicative adaptation.

``lr_bounds = (lo, hi)`` bound the effective rate at use: a step applies ``clamp(lr · m, lo, hi)``
(:func:`rates_in_use`); a rule moves the rate in use, and a multiplier it moved is clamped into
``[lo/lr, hi/lr]``, one it did not move keeps its value (:func:`clamp_rates` with ``previous``
and ``start``), so a scheduled ``lr`` that crosses a bound does not by itself rescale the
multiplier (with ``hypergrad_lr=0`` the step is the base optimizer's at ``clamp(lr, lo, hi)``).
A non-finite hypergradient (any NaN/inf in the gradient) leaves the multiplier unchanged.

The inner products and the signals the rules read (cosines, signs, the group's gradient norm)
are in :mod:`metalr.functional._signals`. Everything here is a pure, differentiable function of
tensors; both the optimizers (without grad) and the meta-learner (with grad, under ``vmap``)
call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import safe_sqrt, select
from metalr.functional._controller import seek_update
from metalr.functional._distributed import ShardReducer
from metalr.functional._signals import (
    all_finite,
    check_step_inputs,
    compiling,
    inner_products,
    rate_dtype,
    rate_signals,
    seek_signals,
    stack_as,
)
from metalr.functional._trail import extend_trails

#: Default ``hypergrad_lr`` of the normalized rule, chosen by ``experiments/choose_hypergrad_lr.py``.
DEFAULT_NORMALIZED_HYPERGRAD_LR = 0.02


def initial_rate(param: Tensor, granularity: str, value: float = 1.0) -> Tensor:
    """A fresh multiplier for ``param``: a 0-d tensor, or one per element for ``"element"``."""
    check_step_inputs(granularity)
    if granularity == "element":  # full_like keeps a sharded (DTensor) parameter's layout
        return torch.full_like(
            param, value, dtype=rate_dtype(param), memory_format=torch.preserve_format
        )
    return torch.full((), value, dtype=rate_dtype(param), device=param.device)


def _inverse_lr(lr: float | Tensor) -> float | Tensor:
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, 1.0 / lr.clamp_min(torch.finfo(lr.dtype).tiny), 0.0)
    return 1.0 / lr if lr > 0 else 0.0


def bounded(lr_bounds: tuple[float, float]) -> bool:
    """Whether ``lr_bounds`` bound anything: a positive minimum or a finite maximum."""
    return lr_bounds[0] > 0 or lr_bounds[1] < math.inf


def clamp_rates(
    rate: Tensor,
    lr: float | Tensor,
    lr_bounds: tuple[float, float],
    previous: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """Clamp multipliers so that ``lr · m`` lies in ``lr_bounds`` (rates are already ``>= 0``).

    Positive lower and finite upper bounds are divided by ``lr`` (skipped while ``lr == 0``).
    An infinite bound is not applied at all, so a tensor ``lr`` in an autograd graph never
    meets ``inf / lr`` (backward 0·inf = NaN).

    With ``previous`` (the stored multipliers before a rule's update) and ``start`` (what the
    rule moved from: the multipliers in use, ``clamp_rates(previous, lr, lr_bounds)``; default
    ``previous``) this is the update's clamp: a multiplier the update moved lands inside the
    bounds (the controller lives where the rate is used: no move is lost in a dead zone beyond
    a bound), one it did not move (``rate == start``: ``hypergrad_lr=0``, an inactive or
    skipped step) keeps its stored value, so a schedule that takes ``lr`` across a bound never
    rescales a multiplier by itself. The step applies :func:`rates_in_use`.
    """
    lo, hi = lr_bounds
    has_lo, has_hi = lo > 0, hi < math.inf
    if not (has_lo or has_hi):
        return rate
    if isinstance(lr, Tensor):
        safe_lr = lr.clamp_min(torch.finfo(lr.dtype).tiny)
        clamped = torch.maximum(rate, lo / safe_lr) if has_lo else rate
        clamped = torch.minimum(clamped, hi / safe_lr) if has_hi else clamped
        clamped = torch.where(lr > 0, clamped, rate)
    elif lr <= 0:
        return rate
    elif torch.compiler.is_compiling():
        # the bounds stay constants and lr only multiplies and divides: inductor can reuse a
        # stale value of a changing Python float used as a clamp bound (pytorch/pytorch#194976,
        # #197889: silently wrong rates after a scheduler moved lr, with a warm graph cache)
        lo_c, hi_c = (lo if has_lo else None), (hi if has_hi else None)
        clamped = (rate * lr).clamp(min=lo_c, max=hi_c) / lr
    else:
        clamped = rate.clamp(min=lo / lr if has_lo else None, max=hi / lr if has_hi else None)
    if previous is None:
        return clamped
    return torch.where(rate == (previous if start is None else start), previous, clamped)


def rates_in_use(
    rates: Sequence[Tensor], lr: float | Tensor, lr_bounds: tuple[float, float]
) -> Sequence[Tensor]:
    """The multipliers a step applies: each clamped so that ``lr · m`` lies in ``lr_bounds``.

    A multiplier the rule did not move keeps its value (:func:`clamp_rates` with ``previous``),
    so a scheduled ``lr`` outside the bounds is clamped here, at use. Unbounded (the default):
    ``rates`` itself, at no cost.
    """
    if not bounded(lr_bounds):
        return rates
    return [clamp_rates(r, lr, lr_bounds) for r in rates]


def _rate_signal(
    dot: Tensor,
    g_norm: Tensor | None,
    d_norm: Tensor | None,
    rule: str,
    granularity: str,
    lr: float | Tensor,
) -> Tensor:
    """The quantity a rule multiplies by β: cosine (normalized) or ⟨g, d⟩ / lr (additive)."""
    if rule == "additive":
        return dot * _inverse_lr(lr)
    if granularity == "element":
        return torch.sign(dot)
    assert g_norm is not None and d_norm is not None
    tiny = torch.finfo(dot.dtype).tiny
    return dot / (g_norm * d_norm).clamp_min(tiny)


def update_rates(
    rates: Sequence[Tensor],
    dots: Sequence[Tensor],
    grad_norms: Sequence[Tensor] | None,
    direction_norms: Sequence[Tensor] | None,
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    shards: ShardReducer | None = None,
) -> list[Tensor]:
    """New multipliers from the inner products (pure; see the module docstring for the math).

    With ``shards`` (optimizer-state sharding), group-granularity sums run over every rank.

    ``hypergrad_lr`` is a number, a tensor, or one tensor per parameter (the meta-learner learns
    it per tensor). Non-finite signals leave a multiplier unchanged; results are clamped to
    ``lr_bounds`` relative to ``lr``.
    """
    check_step_inputs(granularity, rule, rates=rates, dots=dots, grad_norms=grad_norms,
                      direction_norms=direction_norms)  # fmt: skip
    if not rates:
        return []
    per_tensor_beta = isinstance(hypergrad_lr, (list, tuple))
    if granularity == "element":
        new_rates = []
        for i, (rate, dot) in enumerate(zip(rates, dots)):
            beta = hypergrad_lr[i] if per_tensor_beta else hypergrad_lr
            start = clamp_rates(rate, lr, lr_bounds)  # the rate in use: what the rule moves
            if rule == "normalized":
                new = _sign_rule(start, dot, beta)
            else:
                signal = _rate_signal(dot, None, None, rule, granularity, lr)
                moved = (start + beta * signal).clamp_min(0)
                new = torch.where(torch.isfinite(signal), moved, start)
            new_rates.append(clamp_rates(new, lr, lr_bounds, previous=rate, start=start))
        return new_rates

    ref = rates[0]
    rate_vec = stack_as(rates, ref)
    dot_vec = stack_as(dots, ref)
    g_vec = stack_as(grad_norms, ref) if grad_norms is not None else None
    d_vec = stack_as(direction_norms, ref) if direction_norms is not None else None
    if granularity == "group":
        totals = [dot_vec.sum()]
        if g_vec is not None and d_vec is not None:
            totals += [(g_vec * g_vec).sum(), (d_vec * d_vec).sum()]
        total = torch.stack(totals)
        total = shards.sum(total) if shards is not None else total
        dot_vec = total[0].expand_as(rate_vec)
        if g_vec is not None and d_vec is not None:
            g_vec = safe_sqrt(total[1]).expand_as(rate_vec)
            d_vec = safe_sqrt(total[2]).expand_as(rate_vec)
    beta = stack_as(hypergrad_lr, ref) if per_tensor_beta else hypergrad_lr
    signal = _rate_signal(dot_vec, g_vec, d_vec, rule, granularity, lr)
    start = clamp_rates(rate_vec, lr, lr_bounds)  # the rates in use: what the rule moves
    if rule == "normalized":
        new_vec = start * torch.exp(beta * signal)
    else:  # the additive step can cross zero: a rate is never negative
        new_vec = (start + beta * signal).clamp_min(0)
    new_vec = torch.where(torch.isfinite(signal), new_vec, start)
    new_vec = clamp_rates(new_vec, lr, lr_bounds, previous=rate_vec, start=start)
    return [v.to(device=r.device, dtype=r.dtype) for v, r in zip(new_vec.unbind(0), rates)]


def _sign_rule(rate: Tensor, dot: Tensor, beta: float | Tensor) -> Tensor:
    """``m · exp(β · sign(g·d))`` per element.

    The sign is finite unless ``g·d`` is NaN, and a NaN gradient skips the whole step upstream,
    so no per-element finiteness mask is needed. Without autograd the product buffer (a
    temporary owned by the caller) is reused in place: three passes and no new allocation.
    Under a ``torch.func`` transform (``vmap`` over the rates but not the gradients cannot
    write a batched product into an unbatched buffer) it is computed out of place.
    """
    tracked = torch.is_grad_enabled() and (
        dot.requires_grad or rate.requires_grad or (isinstance(beta, Tensor) and beta.requires_grad)
    )
    if tracked or compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return rate * torch.exp(beta * torch.sign(dot))
    return dot.sign_().mul_(beta).exp_().mul_(rate)


class RateUpdate(NamedTuple):
    """What :func:`adapt_rates` returns: new multipliers, the step's all-finite flag, the new
    controller vectors (``"seek"``; an empty list for the other rules) and, with a long-horizon
    signal (``seek["horizon"] > 0``), the new trails (already gated by the flag) and the trail
    tensors they replace (:func:`~metalr.functional._common.commit_update` copies them over)."""

    rates: list[Tensor]
    finite: Tensor
    controllers: list[Tensor]
    trails: list[Tensor] | None = None
    trail_state: Sequence[Tensor] | None = None


def adapt_rates(
    rates: Sequence[Tensor],
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    trails: Sequence[Tensor] | None = None,
) -> RateUpdate:
    """The hypergradient half of every rule: new multipliers and the step's all-finite flag.

    ``directions`` are the previous update directions d_{t-1}. The flag comes for free from the
    inner products at group/tensor granularity and from the gradients at element granularity;
    ``grads_finite`` (the whole step's flag, across param groups) is and-ed in. The new rates are
    returned as computed: callers keep the old ones where the flag is false. With ``shards``
    the flag and the group sums are reduced over every rank that shards the param group.

    ``rule="seek"`` needs ``controllers`` (one vector per parameter, see
    :mod:`metalr.functional._controller`) and the constants ``seek``; its new controllers are
    already gated by the flag. ``hypergrad_lr == 0`` (a number) switches it off: nothing moves.
    With ``seek["horizon"] > 0`` it also needs ``trails`` (one per parameter, see
    :mod:`metalr.functional._trail`): its tracking phase then reads them, and the update carries
    their new values.
    """
    if trails is not None and rule != "seek":  # seek_adapt_rates checks them against horizon
        raise ValueError("trails are read by rule='seek' with seek['horizon'] > 0 only")
    if rule == "seek":
        if controllers is None or seek is None:
            raise ValueError("rule='seek' needs controllers and seek constants")
        if not isinstance(hypergrad_lr, (Tensor, list, tuple)) and hypergrad_lr == 0:
            same, finite, *_ = adapt_rates(
                rates, grads, directions, lr=lr, hypergrad_lr=0.0, rule="normalized",
                granularity=granularity, lr_bounds=lr_bounds, grads_finite=grads_finite,
                shards=shards,
            )  # fmt: skip
            kept = list(trails) if trails is not None else None  # nothing moves, trails too
            return RateUpdate(same, finite, list(controllers), kept, trails)
        result = seek_adapt_rates(
            rates, controllers, grads, directions, lr=lr, hypergrad_lr=hypergrad_lr,
            granularity=granularity, lr_bounds=lr_bounds, seek=seek, grads_finite=grads_finite,
            shards=shards, trails=trails,
        )  # fmt: skip
        return (
            RateUpdate(*result, trail_state=trails) if trails is not None else RateUpdate(*result)
        )
    dots, g_norms, d_norms = inner_products(grads, directions, granularity, rule == "normalized")
    finite = all_finite(dots if granularity != "element" else grads)
    if grads_finite is not None:
        finite = finite & grads_finite.to(finite.device)
    if shards is not None:
        finite = shards.all(finite)
    new_rates = update_rates(
        rates, dots, g_norms, d_norms, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, shards=shards,
    )  # fmt: skip
    return RateUpdate(new_rates, finite, [])


def seek_adapt_rates(
    rates: Sequence[Tensor],
    controllers: Sequence[Tensor],
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    *,
    lr: float | Tensor,
    hypergrad_lr: float | Tensor | Sequence[Tensor],
    granularity: str,
    lr_bounds: tuple[float, float],
    seek: Mapping[str, Any],
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
    trails: Sequence[Tensor] | None = None,
) -> (
    tuple[list[Tensor], Tensor, list[Tensor]]
    | tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]
):
    """:func:`adapt_rates` for the ``"seek"`` rule: ``(rates, finite, controllers)``, the new
    controller vectors included (and, with ``trails``, the new trails as a fourth entry).

    The signals come from the same inner products: the group cosine (summed over the group's
    tensors, and over ranks with ``shards``) drives the ramp, each rate's own cosine (sign per
    element) the tracking phase (:func:`metalr.functional._controller.seek_update`). With
    ``seek["horizon"] = μ > 0`` the tracking phase compares the gradient with the trail
    ``Z_{t-1} = μ Z_{t-2} + η m d_{t-1}`` instead of ``d_{t-1}`` (:mod:`metalr.functional._trail`);
    the ramp and the turn still read the last step's group cosine.
    """
    signals, group_signal, finite, active, grad_norm = seek_signals(
        grads, directions, granularity, grads_finite=grads_finite, shards=shards
    )
    sizes = [g.numel() for g in grads]
    starts = rates_in_use(rates, lr, lr_bounds)  # the rates in use: what the rule moves
    new_trails = None
    if (trails is None) != (seek.get("horizon", 0.0) <= 0):
        raise ValueError("seek['horizon'] > 0 needs trails (one per parameter) and only it does")
    if trails is not None:
        staged = extend_trails(trails, directions, starts, lr, seek["horizon"])
        signals = rate_signals(grads, staged, granularity, shards)
        new_trails = [select(finite, z_new, z) for z_new, z in zip(staged, trails)]
    new_rates, new_ctrls = seek_update(
        starts, controllers, signals, group_signal, active, sizes,
        hypergrad_lr=hypergrad_lr, seek=seek, granularity=granularity, grad_norm=grad_norm,
    )  # fmt: skip
    new_rates = [
        clamp_rates(r, lr, lr_bounds, previous=old, start=s)
        for r, old, s in zip(new_rates, rates, starts)
    ]
    if new_trails is not None:
        return new_rates, finite, new_ctrls, new_trails
    return new_rates, finite, new_ctrls
