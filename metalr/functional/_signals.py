"""Inner products of gradients and directions, and the signals the rules read from them.

Every rule compares the gradient at the new point ``g_t`` with the direction of the step that
led there ``d_{t-1}`` (or, with the seek rule's horizon, with a trail of the steps taken):

* the inner products ``Re⟨g, d⟩`` per tensor (per element at ``"element"`` granularity) and,
  where the rule normalises, the norms ``‖g‖``, ``‖d‖`` (:func:`inner_products`; complex
  tensors are read through their real views);
* the seek rule's signals (:func:`seek_signals`): the group cosine
  ``Σ⟨g, d⟩ / (‖g‖ ‖d‖)`` (over every tensor of the group, and every rank of a sharded group),
  each tensor's cosine, or the sign of ``g·d`` per element; the gradient norm (the gate's input)
  and whether to act (a finite gradient and a non-zero direction);
* the hypergradient itself, ``∂L(θ_t)/∂α_{t-1} = -Re⟨g_t, d_{t-1}⟩`` (:func:`hypergradient`).

Also the argument checks every pure step shares (:func:`check_step_inputs`) and the rate dtype
(:func:`rate_dtype`). Pure, differentiable functions of tensors; the update rules that use them
are in :mod:`metalr.functional._hypergrad`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalr.functional._common import full_value, safe_sqrt
from metalr.functional._distributed import ShardReducer

GRANULARITIES = ("group", "tensor", "element")
RULES = ("seek", "normalized", "additive")


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
        if compiling():
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


def compiling() -> bool:
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


def stack_as(ts: Sequence[Tensor], like: Tensor) -> Tensor:
    return torch.stack([t.to(device=like.device, dtype=like.dtype) for t in ts])


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
    sum_vec, g_vec, d_vec = (stack_as(v, ref) for v in (sums, g_norms, d_norms))
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
    sum_vec, g_vec, d_vec = (stack_as(v, ref) for v in (sums, g_norms, d_norms))
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
        total = stack_as(dots, dots[0]).sum()
        return [-total for _ in dots]
    return [-d for d in dots]
