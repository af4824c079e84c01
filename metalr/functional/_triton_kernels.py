r"""``fused=True`` on CUDA: Triton kernels that step many tensors in one launch.

The equations are those of :mod:`metalr.functional.adam_rule` and
:mod:`metalr.functional.sgd_rule`. Like torch's multi-tensor apply, a launch runs one program per
chunk of ``BLOCK`` elements over a *chunk table* (tensor index, start offset) and a *pointer
table* (each tensor's address), so every parameter of a group is stepped by one launch. Each
program accumulates, over its chunk, ``(Σ g·d_{t-1}, Σ g², Σ d_{t-1}²)`` (``g`` after
``maximize``, before weight decay; Adam's ``d_{t-1} = m̂/(√v̂+ε)`` at step t-1 is recomputed in
registers from the moments it reads) and writes them to its own slot of a ``[tensors, chunks, 3]``
buffer; a ``sum`` over the chunk axis finishes the reduction (two stages, no atomics: the sums do
not depend on scheduling). The rate update from those sums is the rule's own math
(:func:`metalr.functional._from_sums.adapt_rates_from_sums`), a few small tensor ops:

* lagged: **one launch** reads g, m, v, θ once and writes m, v, θ once with the multipliers from
  before the step (an element whose gradient is not finite keeps its values), then the
  multipliers move for step t+1;
* exact: **two launches**: sums only, the rate update, then the update with the new multipliers,
  gated on the device by the step's all-finite flag (a skipped step changes nothing).

Nothing is read back to the host (step counters, rates, ``lr`` and the flags are read by the
kernels from device memory) and every launch has a fixed shape, so a step can be captured in a
CUDA graph. The tables are cached per list of tensor addresses (built once; under capture the
addresses are those of the warm-up step).

Triton's interpreter runs the same kernels on CPU tensors (``TRITON_INTERPRET=1``; CPU tensors
always go through it here): the tests check them against the eager path without a GPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from metalr.functional._common import commit_update
from metalr.functional._from_sums import adapt_rates_from_sums

#: Whether :func:`sgd_hd_step` takes exact steps (two launches, like the Adam step).
SGD_EXACT = True

BLOCK = 2048
#: Parameter dtypes the kernels take (they compute in float32; float64 goes to inductor).
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adam_kernel(
    p_tab, g_tab, m_tab, v_tab, numels, chunk_tensor, chunk_start, chunk_slot, steps, rates,
    lr_ptr, keep_ptr, partials, max_chunks, beta1, beta2, eps, weight_decay, sign,
    DECOUPLED: tl.constexpr, ACCUMULATE: tl.constexpr, WRITE: tl.constexpr,
    DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    inside = offs < tl.load(numels + t)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(DTYPE))
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32) * sign
    m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    step = tl.load(steps + t).to(tl.float32)  # updates so far (before this step)
    if ACCUMULATE:
        prev = tl.maximum(step, 1.0)
        pc1 = 1.0 / (1.0 - tl.exp2(prev * tl.log2(beta1)))
        pc2 = 1.0 / tl.sqrt(1.0 - tl.exp2(prev * tl.log2(beta2)))
        d = m * pc1 / (tl.sqrt(v) * pc2 + eps)
        slot = partials + (t * max_chunks + tl.load(chunk_slot + c)) * 3
        tl.store(slot, tl.sum(g * d, axis=0))
        tl.store(slot + 1, tl.sum(g * g, axis=0))
        tl.store(slot + 2, tl.sum(d * d, axis=0))
    if WRITE:
        lr = tl.load(lr_ptr).to(tl.float32)
        rate = tl.load(rates + t).to(tl.float32)
        now = step + 1.0
        c1 = 1.0 / (1.0 - tl.exp2(now * tl.log2(beta1)))
        c2 = 1.0 / tl.sqrt(1.0 - tl.exp2(now * tl.log2(beta2)))
        p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if DECOUPLED:
            ge = g
            decayed = p * (1.0 - lr * weight_decay)
        else:
            ge = g + weight_decay * p
            decayed = p
        m_new = m + (1.0 - beta1) * (ge - m)
        v_new = beta2 * v + (1.0 - beta2) * ge * ge
        p_new = decayed - lr * rate * c1 * m_new / (tl.sqrt(v_new) * c2 + eps)
        finite = (g - g) == 0.0  # false for NaN and ±inf
        keep = tl.load(keep_ptr + tl.zeros([BLOCK], dtype=tl.int32))  # the flag, per lane
        ok = inside & finite & (keep != 0)
        tl.store(m_ptr + offs, m_new.to(DTYPE), mask=ok)
        tl.store(v_ptr + offs, v_new.to(DTYPE), mask=ok)
        tl.store(p_ptr + offs, p_new.to(DTYPE), mask=ok)


@triton.jit
def _sgd_kernel(
    p_tab, g_tab, b_tab, d_tab, numels, chunk_tensor, chunk_start, chunk_slot, rates, lr_ptr,
    keep_ptr, partials, max_chunks, momentum, dampening, weight_decay, sign,
    HAS_BUF: tl.constexpr, HAS_DIR: tl.constexpr, NESTEROV: tl.constexpr,
    ACCUMULATE: tl.constexpr, WRITE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # d_{t-1}: the momentum buffer (momentum), else the stored direction (plain SGD, Nesterov)
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    inside = offs < tl.load(numels + t)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(DTYPE))
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32) * sign
    b = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_BUF:
        b_ptr = tl.load(b_tab + t).to(tl.pointer_type(DTYPE))
        b = tl.load(b_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_DIR:
        d_ptr = tl.load(d_tab + t).to(tl.pointer_type(DTYPE))
        d_prev = tl.load(d_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    else:
        d_prev = b
    if ACCUMULATE:
        slot = partials + (t * max_chunks + tl.load(chunk_slot + c)) * 3
        tl.store(slot, tl.sum(g * d_prev, axis=0))
        tl.store(slot + 1, tl.sum(g * g, axis=0))
        tl.store(slot + 2, tl.sum(d_prev * d_prev, axis=0))
    if WRITE:
        lr = tl.load(lr_ptr).to(tl.float32)
        rate = tl.load(rates + t).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        ge = g + weight_decay * p
        d = ge
        if HAS_BUF:
            b_new = momentum * b + (1.0 - dampening) * ge
            if NESTEROV:
                d = ge + momentum * b_new
            else:
                d = b_new
        finite = (g - g) == 0.0
        keep = tl.load(keep_ptr + tl.zeros([BLOCK], dtype=tl.int32))  # the flag, per lane
        ok = inside & finite & (keep != 0)
        if HAS_BUF:
            tl.store(b_ptr + offs, b_new.to(DTYPE), mask=ok)
        if HAS_DIR:
            tl.store(d_ptr + offs, d.to(DTYPE), mask=ok)
        tl.store(p_ptr + offs, (p - lr * rate * d).to(DTYPE), mask=ok)


@functools.cache
def _interpreted(kernel: Any) -> Any:
    """The interpreter's version of ``kernel`` (CPU tensors), whatever TRITON_INTERPRET says."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = getattr(kernel, "fn", kernel)
    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(fn)


def _launcher(kernel: Any, device: torch.device) -> Any:
    return _interpreted(kernel) if device.type == "cpu" else kernel


class _Tables:
    """Pointer and chunk tables of one list of tensors (device int64 tensors), built once."""

    def __init__(self, tensors: Sequence[Sequence[Tensor]], device: torch.device) -> None:
        numels = [t.numel() for t in tensors[0]]
        chunks = [(i, s, j) for i, n in enumerate(numels) for j, s in enumerate(range(0, n, BLOCK))]
        self._host: list[Tensor] = []  # pinned sources of the copies (a CUDA graph re-reads them)

        def as_dev(values: list[int]) -> Tensor:
            host = torch.tensor(values, dtype=torch.int64)
            if device.type != "cuda":
                return host.to(device)
            host = host.pin_memory()  # asynchronous and capturable, unlike a pageable copy
            self._host.append(host)
            return host.to(device, non_blocking=True)

        self.pointers = [as_dev([t.data_ptr() for t in ts]) for ts in tensors]
        self.numels = as_dev(numels)
        self.chunk_tensor = as_dev([c[0] for c in chunks])
        self.chunk_start = as_dev([c[1] for c in chunks])
        self.chunk_slot = as_dev([c[2] for c in chunks])
        self.n_chunks = len(chunks)
        self.max_chunks = max(math.ceil(n / BLOCK) for n in numels)


_TABLE_CACHE: dict[tuple, _Tables] = {}
#: Tables built while a CUDA graph was being captured: the graph reads them, so they stay.
_CAPTURED: dict[tuple, _Tables] = {}


def _tables(tensors: Sequence[Sequence[Tensor]]) -> _Tables:
    key = tuple((t.data_ptr(), t.numel()) for ts in tensors for t in ts)
    found = _TABLE_CACHE.get(key) or _CAPTURED.get(key)
    if found is not None:
        return found
    device = tensors[0][0].device
    tables = _Tables(tensors, device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED[key] = tables
    else:
        if len(_TABLE_CACHE) >= 64:  # gradients re-allocated every step: bounded
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = tables
    return tables


def applies(params: Sequence[Tensor], rates: Sequence[Tensor], granularity: str, **hyper) -> bool:
    """Whether the kernels can take this step: one device, one real dtype, dense tensors."""
    lr = hyper.get("lr")
    if not params:
        return False
    p0 = params[0]
    return (
        granularity != "element"
        and hyper.get("shards") is None
        and not torch.compiler.is_compiling()
        and not (isinstance(lr, Tensor) and lr.requires_grad)
        and not isinstance(hyper.get("hypergrad_lr"), (Tensor, list, tuple))
        and p0.dtype in _DTYPES
        and all(
            type(p) in (Tensor, torch.nn.Parameter)
            and p.device == p0.device
            and p.dtype == p0.dtype
            and p.is_contiguous()
            for p in params
        )
        and all(r.dim() == 0 for r in rates)
    )


def _device_scalar(x: float | Tensor, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), x, dtype=torch.float32, device=device)


def _keep(grads_finite: Tensor | None, device: torch.device) -> Tensor:
    if grads_finite is None:
        return torch.ones((), dtype=torch.int32, device=device)
    return grads_finite.to(device=device, dtype=torch.int32)


def _finish(rates, controllers, update, steps, count: Tensor | None) -> None:
    commit_update(rates, controllers, update, known_finite=False)
    if steps is not None:
        torch._foreach_add_(steps, count.to(torch.float32) if count is not None else 1.0)


def adam_hd_step(
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
    hypergrad_lr: float,
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    maximize: bool = False,
    grads_finite: Tensor | None = None,
    shards: Any = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    lagged: bool = False,
) -> bool:
    """The Adam-HD step in one launch (lagged) or two (exact); see the module docstring."""
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    tabs = _tables([params, grads, exp_avgs, exp_avg_sqs])
    n = len(params)
    partials = torch.zeros(n, tabs.max_chunks, 3, dtype=torch.float32, device=device)
    step_vec = torch.stack([s.to(device=device, dtype=torch.float32) for s in steps])
    lr_t = _device_scalar(lr, device)
    keep = _keep(grads_finite, device)
    kernel = _launcher(_adam_kernel, device)

    def launch(rate_vec: Tensor, keep_flag: Tensor, accumulate: bool, write: bool) -> None:
        kernel[(tabs.n_chunks,)](
            *tabs.pointers, tabs.numels, tabs.chunk_tensor, tabs.chunk_start, tabs.chunk_slot,
            step_vec, rate_vec, lr_t, keep_flag, partials, tabs.max_chunks, beta1, beta2, eps,
            weight_decay, -1.0 if maximize else 1.0, DECOUPLED=decoupled_weight_decay,
            ACCUMULATE=accumulate, WRITE=write, DTYPE=_DTYPES[params[0].dtype], BLOCK=BLOCK,
        )  # fmt: skip

    def rate_update():
        return adapt_rates_from_sums(
            rates, partials.sum(1), [p.numel() for p in params], lr=lr,
            hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
            grads_finite=grads_finite, controllers=controllers, seek=seek,
        )  # fmt: skip

    old_rates = torch.stack([r.to(device=device, dtype=torch.float32) for r in rates])
    if lagged:
        launch(old_rates, keep, accumulate=True, write=True)
        _finish(rates, controllers, rate_update(), steps, keep)
        return True
    launch(old_rates, keep, accumulate=True, write=False)
    update = rate_update()
    finite = update.finite.to(torch.int32)
    new_rates = torch.stack([r.to(device=device, dtype=torch.float32) for r in update.rates])
    launch(new_rates, finite, accumulate=False, write=True)
    _finish(rates, controllers, update, steps, finite)
    return True


def sgd_hd_step(
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
    hypergrad_lr: float,
    rule: str,
    granularity: str,
    lr_bounds: tuple[float, float],
    maximize: bool = False,
    grads_finite: Tensor | None = None,
    shards: Any = None,
    controllers: Sequence[Tensor] | None = None,
    seek: Mapping[str, Any] | None = None,
    lagged: bool = False,
) -> bool:
    """The SGD-HD step in one launch (lagged) or two (exact); False (nothing done) on the first
    step, whose buffers do not exist yet (``b_1 = g_1``: the eager path creates them)."""
    has_buf, has_dir = momentum != 0, momentum == 0 or nesterov
    if (has_buf and any(b is None for b in momentum_buffers)) or (
        has_dir and any(d is None for d in prev_directions)
    ):
        return False
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    bufs = list(momentum_buffers) if has_buf else list(params)  # placeholders, never read
    dirs = list(prev_directions) if has_dir else list(params)
    tabs = _tables([params, grads, bufs, dirs])
    partials = torch.zeros(len(params), tabs.max_chunks, 3, dtype=torch.float32, device=device)
    lr_t = _device_scalar(lr, device)
    keep = _keep(grads_finite, device)
    kernel = _launcher(_sgd_kernel, device)

    def launch(rate_vec: Tensor, keep_flag: Tensor, accumulate: bool, write: bool) -> None:
        kernel[(tabs.n_chunks,)](
            *tabs.pointers, tabs.numels, tabs.chunk_tensor, tabs.chunk_start, tabs.chunk_slot,
            rate_vec, lr_t, keep_flag, partials, tabs.max_chunks, momentum, dampening,
            weight_decay, -1.0 if maximize else 1.0, HAS_BUF=has_buf, HAS_DIR=has_dir,
            NESTEROV=nesterov, ACCUMULATE=accumulate, WRITE=write,
            DTYPE=_DTYPES[params[0].dtype], BLOCK=BLOCK,
        )  # fmt: skip

    def rate_update():
        return adapt_rates_from_sums(
            rates, partials.sum(1), [p.numel() for p in params], lr=lr,
            hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
            grads_finite=grads_finite, controllers=controllers, seek=seek,
        )  # fmt: skip

    old_rates = torch.stack([r.to(device=device, dtype=torch.float32) for r in rates])
    if lagged:
        launch(old_rates, keep, accumulate=True, write=True)
        _finish(rates, controllers, rate_update(), None, None)
        return True
    launch(old_rates, keep, accumulate=True, write=False)
    update = rate_update()
    new_rates = torch.stack([r.to(device=device, dtype=torch.float32) for r in update.rates])
    launch(new_rates, update.finite.to(torch.int32), accumulate=False, write=True)
    _finish(rates, controllers, update, None, None)
    return True
