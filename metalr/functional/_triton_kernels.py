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
CUDA graph. The chunk table is cached by the tensors' sizes and each address table by its list's
addresses (gradients re-allocated every step only add a small address table; under capture the
addresses are those of the warm-up step). The seek rule's rates, controllers and step counts are
read and written as rows of one buffer each (:mod:`metalr.functional._flat_state`), so the
bookkeeping around the launches is a handful of ops, not several per tensor.

Triton's interpreter runs the same kernels on CPU tensors (``TRITON_INTERPRET=1``; CPU tensors
always go through it here): the tests check them against the eager path without a GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from metalr.functional._common import commit_update
from metalr.functional._controller import SINCE
from metalr.functional._flat_state import add_to_rows, rows_or_stack, zero_rows
from metalr.functional._from_sums import (
    adapt_rates_from_sums,
    commit_rows,
    seek_rows,
    seek_vectors_from_sums,
)
from metalr.functional._hypergrad import clamp_rates
from metalr.functional._moment_restart import KernelRestart, match_rows

#: Whether :func:`sgd_hd_step` takes exact steps (two launches, like the Adam step).
SGD_EXACT = True

#: Elements per program and warps per program: 1024 × 8 warps is 4 float32 per thread (one
#: 16-byte load per stream). At 2048 × 4 warps (before 2026-12-04) the lagged Adam kernel used
#: 211 registers per thread (ptxas, sm_90): 12% occupancy, and on an H200 it ran 2.5× slower than
#: torch's fused AdamW over the same bytes (1.75 vs 0.69 ms for 85M parameters); at 1024 × 8 every
#: variant needs ≤ 48 (tests/test_triton_kernels.py checks ≤ 64 and no spills). The environment
#: variables are for measuring other shapes on a GPU (experiments/gpu_check.sh), not for users.
BLOCK = int(os.environ.get("METALR_TRITON_BLOCK", "1024"))
NUM_WARPS = int(os.environ.get("METALR_TRITON_WARPS", "8"))
#: Parameter dtypes the kernels take (they compute in float32; float64 goes to inductor).
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adam_kernel(
    p_tab, g_tab, m_tab, v_tab, numels, chunk_tensor, chunk_start, chunk_slot, steps, rates,
    lr_ptr, keep_ptr, partials, max_chunks, beta1, beta2, eps, weight_decay, sign,
    restart_ptr, sizes,
    DECOUPLED: tl.constexpr, ACCUMULATE: tl.constexpr, WRITE: tl.constexpr,
    RESTART: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
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
        if RESTART:  # Adam's moments restart at the first turn (after this step's update)
            d_new = c1 * m_new / (tl.sqrt(v_new) * c2 + eps)
            size = tl.sum(tl.where(ok, tl.abs(d_new), 0.0), axis=0)
            tl.store(sizes + t * max_chunks + tl.load(chunk_slot + c), size)
            fresh = tl.load(restart_ptr + t) != 0
            m_new = tl.where(fresh, 0.0, m_new)
            v_new = tl.where(fresh, 0.0, v_new)
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


def _device_ints(values: Tensor | list[int], device: torch.device, keep: list[Tensor]) -> Tensor:
    """A host int64 table on ``device``. On CUDA the copy is from pinned memory (asynchronous and
    capturable, unlike a pageable copy); the pinned source goes into ``keep`` (a CUDA graph
    re-reads it on every replay)."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    keep.append(host)
    return host.to(device, non_blocking=True)


class _Chunks:
    """The chunk table of a list of tensor sizes: for each chunk of ``BLOCK`` elements its
    tensor, start offset and slot (index within its tensor), built with vector ops, once."""

    def __init__(self, numels: tuple[int, ...], device: torch.device) -> None:
        self._host: list[Tensor] = []
        sizes = torch.tensor(numels, dtype=torch.int64)
        per_tensor = (sizes + BLOCK - 1) // BLOCK
        chunk_tensor = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
        first = torch.cumsum(per_tensor, 0) - per_tensor
        chunk_slot = torch.arange(int(per_tensor.sum())) - first[chunk_tensor]
        self.numels = _device_ints(sizes, device, self._host)
        self.chunk_tensor = _device_ints(chunk_tensor, device, self._host)
        self.chunk_start = _device_ints(chunk_slot * BLOCK, device, self._host)
        self.chunk_slot = _device_ints(chunk_slot, device, self._host)
        self.n_chunks = int(chunk_tensor.numel())
        self.max_chunks = int(per_tensor.max())
        self.sizes = numels


class _Pointers:
    """The address table of one list of tensors."""

    def __init__(self, tensors: Sequence[Tensor], device: torch.device) -> None:
        self._host: list[Tensor] = []
        self.table = _device_ints([t.data_ptr() for t in tensors], device, self._host)


#: Tables by key: (device, sizes) for chunk tables, (device, addresses) for address tables.
#: Bounded (gradients may be re-allocated at new addresses every step); tables built while a
#: CUDA graph was being captured go to ``_CAPTURED`` and stay (the graph reads them).
_TABLE_CACHE: dict[tuple, Any] = {}
_CAPTURED: dict[tuple, Any] = {}


def _cached(key: tuple, build: Any) -> Any:
    found = _TABLE_CACHE.get(key) or _CAPTURED.get(key)
    if found is not None:
        return found
    made = build()
    device = key[0]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED[key] = made
    else:
        if len(_TABLE_CACHE) >= 256:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = made
    return made


def _tables(tensors: Sequence[Sequence[Tensor]]) -> tuple[_Chunks, list[Tensor]]:
    """The chunk table of ``tensors[0]``'s sizes and an address table per list (each cached)."""
    device = tensors[0][0].device
    numels = tuple(t.numel() for t in tensors[0])
    chunks = _cached((device, "chunks", numels), lambda: _Chunks(numels, device))
    pointers = []
    for ts in tensors:
        key = (device, "pointers", *(t.data_ptr() for t in ts))
        pointers.append(_cached(key, lambda ts=ts: _Pointers(ts, device)).table)
    return chunks, pointers


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


def _passes(
    launch: Any,
    rates: list[Tensor],
    controllers: Sequence[Tensor] | None,
    partials: Tensor,
    sizes: Sequence[int],
    keep: Tensor,
    lagged: bool,
    on_turn: Callable[[Tensor, Tensor], None] | None = None,
    **rule_args: Any,
) -> tuple[Tensor, Tensor | None]:
    """Run a step's launches and its rate update; returns the step's flag (0/1, for the step
    counters) and, with ``on_turn`` (the moment restart), the tensors that took their first
    turn: the writing launch zeroed their moments and ``on_turn(rates_buffer, turned)`` ran
    after the rates were committed; the caller zeroes their counters (None where the restart
    is left to the caller). ``launch(rates, flag, accumulate, write, turned)`` runs the
    kernel. Lagged: one launch with the old rates, then the update. Exact: a sums-only launch,
    the update, then the writing launch with the new rates, gated by the new flag. The seek
    rule works on its state's buffers (:func:`~metalr.functional._from_sums.seek_rows`); other
    rules (and state that cannot share a buffer) on stacked copies of the lists. The moment
    restart is taken over on the seek rule's exact path (the turn is known before the writing
    launch); elsewhere it is left to the caller."""
    rows = seek_rows(
        rates, controllers, rule_args["rule"], rule_args["hypergrad_lr"], partials.device
    )

    def in_use(rate_vec: Tensor) -> Tensor:  # the multipliers a writing launch applies
        return clamp_rates(rate_vec, rule_args["lr"], rule_args["lr_bounds"]).to(rate_vec.dtype)

    if rows is not None:

        def update() -> tuple[Tensor, Tensor, Tensor]:
            return seek_vectors_from_sums(
                rows[0], rows[1], partials.sum(1), rule_args["grads_finite"], sizes,
                lr=rule_args["lr"], hypergrad_lr=rule_args["hypergrad_lr"],
                granularity=rule_args["granularity"], lr_bounds=rule_args["lr_bounds"],
                seek=rule_args["seek"],
            )  # fmt: skip

        launch(in_use(rows[0]), keep, True, lagged, None)
        if lagged:
            commit_rows(rows, update())
            return keep, None
        new = update()
        flag = new[2].to(torch.int32)
        turned = None
        if on_turn is not None:
            turned = (rows[1][:, SINCE] == 0) & (new[1][:, SINCE] > 0)
        launch(in_use(new[0]), flag, False, True, turned)
        commit_rows(rows, new)
        if turned is not None:
            on_turn(rows[0], turned)
        return flag, turned

    def rate_update() -> Any:
        return adapt_rates_from_sums(
            rates, partials.sum(1), sizes, controllers=controllers, **rule_args
        )

    device = partials.device
    launch(in_use(torch.stack([r.to(device=device, dtype=torch.float32) for r in rates])), keep,
           True, lagged, None)  # fmt: skip
    if lagged:
        flag, result = keep, rate_update()
    else:
        result = rate_update()
        flag = result.finite.to(torch.int32)
        new_rates = torch.stack([r.to(device=device, dtype=torch.float32) for r in result.rates])
        launch(in_use(new_rates), flag, False, True, None)
    commit_update(rates, controllers, result, known_finite=False)
    return flag, None


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
    restart: KernelRestart | None = None,
) -> bool:
    """The Adam-HD step in one launch (lagged) or two (exact); see the module docstring. With
    ``restart`` (Adam's moments restart at the first turn) the exact step on the seek rule's
    buffers restarts them in its writing launch and sets ``restart.done``."""
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    chunks, pointers = _tables([params, grads, exp_avgs, exp_avg_sqs])
    partials = torch.zeros(len(params), chunks.max_chunks, 3, dtype=torch.float32, device=device)
    step_rows = rows_or_stack(steps, device, torch.float32)
    step_vec = step_rows[0]
    lr_t = _device_scalar(lr, device)
    keep = _keep(grads_finite, device)
    kernel = _launcher(_adam_kernel, device)
    sizes = on_turn = None
    if restart is not None:  # each chunk's Σ|d| of the step the restart follows
        sizes = torch.zeros(len(params), chunks.max_chunks, dtype=torch.float32, device=device)

        def on_turn(rate_buf: Tensor, turned: Tensor) -> None:
            if restart.match:  # the chunk table's device sizes: no host-to-device copy
                match_rows(rate_buf, turned, sizes.sum(1), chunks.numels, granularity)
            restart.done = True

    def launch(
        rate_vec: Tensor, keep_flag: Tensor, accumulate: bool, write: bool, turned: Tensor | None
    ) -> None:
        fresh = turned.to(torch.int32) if turned is not None else keep_flag
        kernel[(chunks.n_chunks,)](
            *pointers, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.chunk_slot,
            step_vec, rate_vec, lr_t, keep_flag, partials, chunks.max_chunks, beta1, beta2, eps,
            weight_decay, -1.0 if maximize else 1.0, fresh,
            sizes if turned is not None else partials,
            DECOUPLED=decoupled_weight_decay, ACCUMULATE=accumulate, WRITE=write,
            RESTART=turned is not None, DTYPE=_DTYPES[params[0].dtype], BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip

    count, turned = _passes(
        launch, rates, controllers, partials, chunks.sizes, keep, lagged, on_turn, lr=lr,
        hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
        grads_finite=grads_finite, seek=seek,
    )  # fmt: skip
    add_to_rows(steps, step_rows, count.to(steps[0].dtype))
    if turned is not None:  # a fresh Adam from the turn on: its counters restart too
        zero_rows(steps, step_rows, turned)
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
    chunks, pointers = _tables([params, grads, bufs, dirs])
    partials = torch.zeros(len(params), chunks.max_chunks, 3, dtype=torch.float32, device=device)
    lr_t = _device_scalar(lr, device)
    keep = _keep(grads_finite, device)
    kernel = _launcher(_sgd_kernel, device)

    def launch(
        rate_vec: Tensor, keep_flag: Tensor, accumulate: bool, write: bool, _turned: None
    ) -> None:
        kernel[(chunks.n_chunks,)](
            *pointers, chunks.numels, chunks.chunk_tensor, chunks.chunk_start, chunks.chunk_slot,
            rate_vec, lr_t, keep_flag, partials, chunks.max_chunks, momentum, dampening,
            weight_decay, -1.0 if maximize else 1.0, HAS_BUF=has_buf, HAS_DIR=has_dir,
            NESTEROV=nesterov, ACCUMULATE=accumulate, WRITE=write,
            DTYPE=_DTYPES[params[0].dtype], BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip

    _passes(
        launch, rates, controllers, partials, chunks.sizes, keep, lagged, lr=lr,
        hypergrad_lr=hypergrad_lr, rule=rule, granularity=granularity, lr_bounds=lr_bounds,
        grads_finite=grads_finite, seek=seek,
    )  # fmt: skip
    return True
