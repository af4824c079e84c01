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

Everything here is a pure, differentiable function of tensors; both the optimizers (without grad)
and the meta-learner (with grad, under ``vmap``) call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import full_value, safe_sqrt, select
from metalr.functional._controller import seek_update
from metalr.functional._distributed import ShardReducer
from metalr.functional._trail import extend_trails

GRANULARITIES = ("group", "tensor", "element")
RULES = ("seek", "normalized", "additive")

#: Default ``hypergrad_lr`` of the normalized rule, chosen by ``experiments/choose_hypergrad_lr.py``.
DEFAULT_NORMALIZED_HYPERGRAD_LR = 0.02


def as_real(t: Tensor) -> Tensor:
    """A real view of ``t`` (complex tensors gain a trailing dimension of 2)."""
    return torch.view_as_real(t) if t.is_complex() else t


def rate_dtype(param: Tensor) -> torch.dtype:
    """Dtype of a parameter's learning-rate multiplier.

    The parameter's own (real) dtype, except half precision: a multiplier stored in bfloat16
    cannot represent a change of 1% (its spacing near 1 is 2^-7), so fp16/bf16 parameters keep
    their rates in float32.
    """
    if param.is_complex():
        return param.real.dtype
    if param.dtype in (torch.float16, torch.bfloat16) or not param.is_floating_point():
        return torch.float32
    return param.dtype


def initial_rate(param: Tensor, granularity: str, value: float = 1.0) -> Tensor:
    """A fresh multiplier for ``param``: a 0-d tensor, or one per element for ``"element"``."""
    check_step_inputs(granularity)
    if granularity == "element":  # full_like keeps a sharded (DTensor) parameter's layout
        return torch.full_like(
            param, value, dtype=rate_dtype(param), memory_format=torch.preserve_format
        )
    return torch.full((), value, dtype=rate_dtype(param), device=param.device)


def inner_products(
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    granularity: str,
    with_norms: bool,
) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
    """Real inner products ``Re⟨g, d⟩`` per tensor (per element for ``"element"``).

    Returns ``(dots, grad_norms, direction_norms)``; the norms are ``None`` unless
    ``with_norms`` and the granularity reduces (group/tensor). Reductions run in the rate dtype.
    """
    check_step_inputs(granularity, grads=grads, directions=directions)
    dots: list[Tensor] = []
    g_norms: list[Tensor] | None = [] if with_norms and granularity != "element" else None
    d_norms: list[Tensor] | None = [] if g_norms is not None else None
    for g, d in zip(grads, directions):
        acc = rate_dtype(g)
        gr, dr = as_real(g), as_real(d)
        if granularity == "element":
            prod = (gr * dr).to(acc)
            dots.append(prod.sum(-1) if g.is_complex() else prod)
            continue
        if _compiling():
            # One fused reduction loop: plain sums of products (an extern BLAS dot or a
            # vector_norm would make inductor materialize d or split the loop in two).
            dots.append(torch.sum(gr * dr, dtype=acc))
            if g_norms is not None and d_norms is not None:
                g_norms.append(safe_sqrt(torch.sum(gr * gr, dtype=acc)))
                d_norms.append(safe_sqrt(torch.sum(dr * dr, dtype=acc)))
            continue
        if not g.is_complex() and g.dtype == acc and d.dtype == acc:
            dots.append(torch.dot(gr.reshape(-1), dr.reshape(-1)))  # BLAS dot, no temporary
        else:
            dots.append(torch.sum(gr * dr, dtype=acc))
        if g_norms is not None and d_norms is not None:
            g_norms.append(torch.linalg.vector_norm(gr, dtype=acc))
            d_norms.append(torch.linalg.vector_norm(dr, dtype=acc))
    if granularity != "element":  # sharded (FSDP2) tensors: the sums run over every rank
        dots = [full_value(d) for d in dots]
        g_norms = [full_value(n) for n in g_norms] if g_norms is not None else None
        d_norms = [full_value(n) for n in d_norms] if d_norms is not None else None
    return dots, g_norms, d_norms


def _compiling() -> bool:
    return not torch.jit.is_scripting() and torch.compiler.is_compiling()


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool: every entry of every tensor is finite (checked through its sum).

    Applied to the per-tensor inner products it costs nothing extra (a NaN/inf anywhere in a
    gradient makes its inner product NaN); at element granularity the rules apply it to the
    gradients themselves, so a compiled step can fuse the rest into one elementwise loop.
    """
    if not tensors:
        return torch.tensor(True)
    device = tensors[0].device
    flags = [torch.isfinite(_total(t)).to(device) for t in tensors]
    return torch.stack(flags).all()


def _total(t: Tensor) -> Tensor:
    """Sum of ``t`` (one read, no boolean temporary): NaN/inf if any entry is.

    A sum that overflows the accumulator (|sum| > 3e38 for float32 and half types, which are
    summed in float32) also counts as non-finite: such a step is skipped too.
    """
    if t.dim() == 0:
        return t
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return full_value(torch.sum(t, dtype=acc))


def _stack(ts: Sequence[Tensor], like: Tensor) -> Tensor:
    return torch.stack([t.to(device=like.device, dtype=like.dtype) for t in ts])


def _inverse_lr(lr: float | Tensor) -> float | Tensor:
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, 1.0 / lr.clamp_min(torch.finfo(lr.dtype).tiny), 0.0)
    return 1.0 / lr if lr > 0 else 0.0


def check_step_inputs(granularity: str, rule: str | None = None, **per_param: Any) -> None:
    """The pure steps' own argument check (the optimizers check theirs at construction):
    ``granularity`` and ``rule`` among the known ones, and every per-parameter sequence as long
    as the first (``zip`` would silently drop the extra entries). ``None`` entries are absent
    sequences (no controllers). With ``params`` and ``rates``, each rate must be a floating
    tensor of its granularity's shape: 0-d for "group" and "tensor", the parameter's shape (or
    0-d, broadcast) for "element"."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"Invalid granularity: {granularity!r}; expected one of {', '.join(map(repr, GRANULARITIES))}"
        )
    if rule is not None and rule not in RULES:
        raise ValueError(f"Invalid rule: {rule!r}; expected one of {', '.join(map(repr, RULES))}")
    lengths = {name: len(seq) for name, seq in per_param.items() if seq is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Invalid inputs: per-parameter sequences of different lengths {lengths}")
    params, rates = per_param.get("params"), per_param.get("rates")
    if params is not None and rates is not None:
        _check_rate_shapes(granularity, params, rates)


def _check_rate_shapes(granularity: str, params: Sequence[Tensor], rates: Sequence[Tensor]) -> None:
    for i, (param, rate) in enumerate(zip(params, rates)):
        if not rate.is_floating_point():
            raise ValueError(f"Invalid rates[{i}]: dtype {rate.dtype}; expected a floating dtype")
        if rate.dim() == 0 or (granularity == "element" and rate.shape == param.shape):
            continue
        expected = (
            f"0-d or the parameter's shape {tuple(param.shape)}"
            if granularity == "element"
            else "a 0-d tensor (one rate per tensor; per element: granularity='element')"
        )
        raise ValueError(
            f"Invalid rates[{i}]: shape {tuple(rate.shape)} at granularity {granularity!r}; "
            f"expected {expected}"
        )


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
    rate_vec = _stack(rates, ref)
    dot_vec = _stack(dots, ref)
    g_vec = _stack(grad_norms, ref) if grad_norms is not None else None
    d_vec = _stack(direction_norms, ref) if direction_norms is not None else None
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
    beta = _stack(hypergrad_lr, ref) if per_tensor_beta else hypergrad_lr
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
    if tracked or _compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
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


class SeekSignals(NamedTuple):
    """What the seek rule reads from one gradient (training or validation) and the last
    directions: each rate's signal, the group cosine, the all-finite flag, whether to act, and
    the group's gradient norm ``‖g‖`` (the gradient gate's input)."""

    signals: list[Tensor]
    group_signal: Tensor
    finite: Tensor
    active: Tensor
    grad_norm: Tensor


def seek_signals(
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    granularity: str,
    *,
    grads_finite: Tensor | None = None,
    shards: ShardReducer | None = None,
) -> SeekSignals:
    """The seek rule's signals from ``grads`` and the directions ``d`` they are compared with.

    ``group_signal`` is the group cosine ``Σ⟨g, d⟩ / (‖g‖ ‖d‖)`` (over ranks with ``shards``);
    ``signals[i]`` is rate ``i``'s: the group cosine (group granularity), the tensor's cosine
    (tensor), or the sign of ``g·d`` per element (element). ``active`` is false when a gradient
    is not finite or every direction is zero (nothing to compare with yet).
    """
    if granularity == "element":
        dots, _, _ = inner_products(grads, directions, "element", with_norms=False)
        sums, g_norms, d_norms = inner_products(grads, directions, "tensor", with_norms=True)
        finite = all_finite(grads)
    else:
        dots, g_norms, d_norms = inner_products(grads, directions, granularity, with_norms=True)
        sums = dots
        finite = all_finite(dots)
    assert g_norms is not None and d_norms is not None
    if grads_finite is not None:
        finite = finite & grads_finite.to(finite.device)
    if shards is not None:
        finite = shards.all(finite)
    return seek_signals_from_products(sums, g_norms, d_norms, dots, finite, granularity, shards)


def rate_signals(
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    granularity: str,
    shards: ShardReducer | None = None,
) -> list[Tensor]:
    """Each rate's signal from ``grads`` and ``directions`` (the ``signals`` of
    :func:`seek_signals`, without the flag, the group signal and the norm the ramp reads): the
    group cosine, each tensor's cosine, or the sign of ``g·d`` per element."""
    if granularity == "element":
        dots, _, _ = inner_products(grads, directions, "element", with_norms=False)
        return [torch.nan_to_num(torch.sign(d), nan=0.0) for d in dots]
    sums, g_norms, d_norms = inner_products(grads, directions, granularity, with_norms=True)
    assert g_norms is not None and d_norms is not None
    ref = sums[0]
    sum_vec, g_vec, d_vec = (_stack(v, ref) for v in (sums, g_norms, d_norms))
    if granularity == "group":
        no_flag = torch.ones((), dtype=torch.bool, device=ref.device)
        group_signal = group_signal_from_norms(sum_vec, g_vec, d_vec, no_flag, shards)[0]
        return [group_signal for _ in sums]
    return list(tensor_cosines(sum_vec, g_vec, d_vec).unbind(0))


def seek_signals_from_products(
    sums: Sequence[Tensor],
    g_norms: Sequence[Tensor],
    d_norms: Sequence[Tensor],
    dots: Sequence[Tensor],
    finite: Tensor,
    granularity: str,
    shards: ShardReducer | None = None,
) -> SeekSignals:
    """:func:`seek_signals` from per-tensor ``Σ⟨g,d⟩``, ``‖g‖``, ``‖d‖`` (and, per element,
    ``g·d`` in ``dots``) and the all-finite flag: what a fused kernel's pass accumulates."""
    ref = sums[0]
    sum_vec, g_vec, d_vec = (_stack(v, ref) for v in (sums, g_norms, d_norms))
    group_signal, active, grad_norm = group_signal_from_norms(sum_vec, g_vec, d_vec, finite, shards)
    if granularity == "element":
        signals = [torch.nan_to_num(torch.sign(d), nan=0.0) for d in dots]
    elif granularity == "group":
        signals = [group_signal for _ in sums]
    else:
        signals = list(tensor_cosines(sum_vec, g_vec, d_vec).unbind(0))
    return SeekSignals(signals, group_signal, finite, active, grad_norm)


def group_signal_from_norms(
    sum_vec: Tensor, g_vec: Tensor, d_vec: Tensor, finite: Tensor, shards: ShardReducer | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The group cosine ``Σ⟨g, d⟩ / (‖g‖ ‖d‖)`` from per-tensor ``Σ⟨g,d⟩``, ``‖g‖``, ``‖d‖``
    (``[n]`` each; summed over ranks with ``shards``), the flag to act on it, and the group's
    gradient norm ``‖g‖`` (0-d)."""
    total = torch.stack([sum_vec.sum(), (g_vec * g_vec).sum(), (d_vec * d_vec).sum()])
    total = shards.sum(total) if shards is not None else total
    tiny = torch.finfo(total.dtype).tiny
    group_signal = total[0] / (safe_sqrt(total[1]) * safe_sqrt(total[2])).clamp_min(tiny)
    group_signal = torch.nan_to_num(group_signal, nan=0.0, posinf=0.0, neginf=0.0)
    return group_signal, finite & (total[2] > 0), safe_sqrt(total[1])


def tensor_cosines(sum_vec: Tensor, g_vec: Tensor, d_vec: Tensor) -> Tensor:
    """Each tensor's cosine ``Σ⟨g,d⟩ / (‖g‖ ‖d‖)`` (``[n]``; 0 where undefined)."""
    cos = sum_vec / (g_vec * d_vec).clamp_min(torch.finfo(sum_vec.dtype).tiny)
    return torch.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0)


def hypergradient(
    grads: Sequence[Tensor], directions: Sequence[Tensor], granularity: str
) -> list[Tensor]:
    """``∂L(θ_t)/∂α_{t-1} = -Re⟨g_t, d_{t-1}⟩`` for each rate (summed over a group for "group")."""
    dots, _, _ = inner_products(grads, directions, granularity, with_norms=False)
    if granularity == "group":
        total = _stack(dots, dots[0]).sum()
        return [-total for _ in dots]
    return [-d for d in dots]
