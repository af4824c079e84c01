r"""``fused=True`` on the CPU: the Adam-HD / SGD-HD step as one C++ pass over the state (lagged
mode) or two (exact mode), built from ``metalr/csrc/hd_step.cpp`` with
``torch.utils.cpp_extension`` on first use (cached on disk; tens of seconds once per machine).

Why C++ and not inductor: inductor does fuse the lagged step into one loop per tensor, but its
loop measured 1.39× torch's fused Adam without the per-element skip and 1.50× with it (5M
parameters, one thread); with the kernel here the lagged step measured 1.13–1.25× in
``experiments/bench_step.py``.
Its float32 AVX-512 (or AVX2+FMA) loop estimates ``d_{t-1}`` (which only feeds the sums) with
reciprocal-estimate instructions, prefetches ahead and flushes subnormals; float64 and other CPUs
get plain loops the compiler vectorises (``-O3 -march=native``). Fixed chunks under ``at::parallel_for`` whose
partial sums are added in chunk order: the sums do not depend on the thread count. Numbers in
``experiments/results/bench_step_cpu.md``.

Per tensor the pass accumulates ``(Σ g·d_{t-1}, Σ g², Σ d_{t-1}²)`` in float64, with ``g`` after
``maximize`` and before weight decay (what the rules read), and ``d_{t-1}`` recomputed from the
moments it is reading (Adam: ``m̂/(√v̂+ε)`` at step t-1, floored at 1) or read from the momentum
buffer / stored direction (SGD). The rate update from those sums is the rule's own math
(:func:`metalr.functional._from_sums.adapt_rates_from_sums`), run after the pass:

* lagged: one pass updates θ, m, v with the multipliers from before the step (per-element skip
  of non-finite gradients), then the multipliers move for step t+1;
* exact: pass 1 only sums (reads g, m, v), the multipliers move (a non-finite sum skips the whole
  step, read on the host as the CPU paths do), pass 2 updates with the new multipliers. Pass 2
  runs over the tensors last to first, so it starts on the g, m, v that pass 1 read last and
  that are still in the cache (same values; 0.95–0.99× the step's time in paired rounds on an
  AMD EPYC, ``experiments/results/bench_step_cpu_issue12/write_order.md``).

The kernel reads the multipliers from their buffer (no host copy) and one row of Adam constants
for all tensors (one per tensor only when their step counts differ).

Element granularity (exact Adam-HD step only) is :mod:`metalr.functional._cpu_element`: a scan
of the gradients, then one pass that also reads and writes the rates. Where the kernels cannot
run (no compiler, complex or half-precision tensors, lagged or SGD-HD steps at element
granularity, sharded state) the callers fall back to their other paths; a failed build warns
once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalr.functional._common import commit_update
from metalr.functional._cpu_element import adam_hd_element_step, bias_corrections
from metalr.functional._flat_state import add_to_rows, rows_or_stack
from metalr.functional._from_sums import (
    adapt_rates_from_sums,
    commit_rows,
    seek_rows,
    seek_vectors_from_sums,
)
from metalr.functional._hypergrad import bounded, clamp_rates, rates_in_use

_SOURCES = [Path(__file__).resolve().parent.parent / "csrc" / name
            for name in ("hd_step.cpp", "hd_element.cpp")]  # fmt: skip
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]

#: Elements the float32 loops prefetch ahead, per CPU vendor: measured best in paired runs
#: (``experiments/results/bench_step_cpu_issue12/prefetch_ab.md``): 256 (1 KiB) on a Xeon, 64
#: (256 B) on an AMD EPYC, where 256 made the exact passes ~1.2× slower. ``METALR_CPU_PREFETCH``
#: overrides it (a separate build per value).
PREFETCH_BY_VENDOR = {"GenuineIntel": 256, "AuthenticAMD": 64}
DEFAULT_PREFETCH = 256

#: Whether :func:`sgd_hd_step` takes exact steps (the exact SGD step is left to the compiled path).
SGD_EXACT = False


def build(sources: Sequence[Path], prefix: str = "metalr_hd_step") -> Any:
    """Build (or load from torch's extension cache) the kernels from ``sources`` with this
    machine's flags, as the module ``{prefix}_{tag}``; ``tag`` hashes the sources, the flags
    and the CPU, so that a changed source or another machine gets its own build. Raises where
    the build fails. (:func:`load` builds ``metalr/csrc``; ``experiments/ab_cpu_kernels.py``
    builds another revision's sources the same way.)"""
    from torch.utils import cpp_extension

    # -march=native: key the build by this machine's CPU so a shared cache stays correct
    flags = [*_FLAGS, f"-DMETALR_PREFETCH={prefetch_distance()}"]
    tag = hashlib.sha1(
        ("".join(s.read_text() for s in sources) + " ".join(flags) + _cpu_id()).encode()
    ).hexdigest()[:12]
    return cpp_extension.load(
        name=f"{prefix}_{tag}",
        sources=[str(s) for s in sources],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def load() -> Any | None:
    """The compiled extension, or None (with one warning) when it cannot be built."""
    try:
        return build(_SOURCES)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the other paths"
        warnings.warn(
            f"metalr: the fused CPU kernel could not be built ({type(exc).__name__}: {exc}); "
            "fused=True falls back to the eager path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def prefetch_distance() -> int:
    """Elements ahead that the float32 loops prefetch: ``METALR_CPU_PREFETCH`` if set (a positive
    integer), else :data:`PREFETCH_BY_VENDOR` for this CPU's vendor, else 256."""
    override = os.environ.get("METALR_CPU_PREFETCH")
    if override:
        if not override.isdigit() or int(override) <= 0:
            raise ValueError(f"METALR_CPU_PREFETCH must be a positive integer, got {override!r}")
        return int(override)
    return PREFETCH_BY_VENDOR.get(_cpu_vendor(), DEFAULT_PREFETCH)


def _cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo ('' where there is none)."""
    return (_cpuinfo_line("vendor_id") or "").partition(":")[2].strip()


def _cpu_id() -> str:
    flags = _cpuinfo_line("flags")
    return platform.machine() + (flags if flags is not None else platform.processor())


def _cpuinfo_line(prefix: str) -> str | None:
    """The first line of /proc/cpuinfo that starts with ``prefix`` ('' if none; None where the
    file cannot be read)."""
    info = _cpuinfo()
    if info is None:
        return None
    return next((line for line in info.splitlines() if line.startswith(prefix)), "")


@functools.cache
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def applies(params: Sequence[Tensor], rates: Sequence[Tensor], granularity: str, **hyper) -> bool:
    """Whether the kernel can take this step (it may still be unbuildable: see :func:`load`)."""
    lr = hyper.get("lr")
    element = granularity == "element"
    if element and ("beta1" not in hyper or hyper.get("lagged")):
        return False  # element granularity: the exact Adam-HD step only (_cpu_element)
    if element and bounded(hyper.get("lr_bounds", (0.0, float("inf")))):
        return False  # the rules move the rates in use, the stored ones stay: the eager step
    return (
        bool(params)
        and hyper.get("shards") is None
        and not torch.compiler.is_compiling()
        and not (isinstance(lr, Tensor) and lr.requires_grad)
        and not isinstance(hyper.get("hypergrad_lr"), (Tensor, list, tuple))
        and all(
            type(p) in (Tensor, torch.nn.Parameter)
            and p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.float64)
            and p.is_contiguous()
            for p in params
        )
        and all(
            (r.shape == p.shape and r.dtype == p.dtype and r.is_contiguous())
            if element
            else r.dim() == 0
            for r, p in zip(rates, params)
        )
        and all(r.device.type == "cpu" for r in rates)
    )


def _contiguous(ts: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() and t.dtype == p.dtype else t.contiguous().to(p.dtype)
            for t, p in zip(ts, like)]  # fmt: skip


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
    restart: Any = None,
) -> bool:
    """The Adam-HD step through the kernel; False (nothing done) when it is unavailable.
    ``restart`` (Adam's moment restart) is left to the caller: on the CPU it reads the turn on
    the host and touches only the turned tensors."""
    ext = load()
    if ext is None or shards is not None:
        return False
    if grads_finite is not None and not bool(grads_finite):
        return True  # another group's gradient is not finite: the whole step is skipped
    grads = _contiguous(grads, params)
    if granularity == "element":
        adam_hd_element_step(
            ext, params, grads, exp_avgs, exp_avg_sqs, rates, steps, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, hypergrad_lr=hypergrad_lr,
            decoupled_weight_decay=decoupled_weight_decay, rule=rule, maximize=maximize, controllers=controllers, seek=seek,
            grads_known_finite=grads_finite is not None,  # checked true above
        )  # fmt: skip
        return True
    lr_f = float(lr)
    coupled = weight_decay if not decoupled_weight_decay else 0.0
    decay = 1.0 - lr_f * weight_decay if decoupled_weight_decay else 1.0
    step_rows = rows_or_stack(steps)  # the counters as one buffer (no stack per step)
    ts = step_rows[0].tolist()
    # the kernel's rows (pc1, pc2, lr, 1-β1^t, c2, decay): one for all when the counts agree
    counts = ts if len(set(ts)) > 1 else ts[:1]
    constants = torch.tensor(
        [[pc1, pc2, lr_f, c1, c2, decay]
         for pc1, pc2, c1, c2 in (bias_corrections(t, beta1, beta2) for t in counts)],
        dtype=torch.float64,
    )  # fmt: skip

    sizes = [p.numel() for p in params]
    state = seek_rows(rates, controllers, rule, hypergrad_lr, params[0].device)

    def rate_update(sums: Tensor):
        if state is not None:  # the seek rule on its state's buffers
            return seek_vectors_from_sums(
                state[0], state[1], sums, None, sizes, lr=lr, hypergrad_lr=hypergrad_lr,
                granularity=granularity, lr_bounds=lr_bounds, seek=seek,
            )  # fmt: skip
        return adapt_rates_from_sums(
            rates, sums, sizes, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
            granularity=granularity, lr_bounds=lr_bounds, controllers=controllers, seek=seek,
        )  # fmt: skip

    def commit(update, known_finite: bool) -> None:
        if state is not None:
            commit_rows(state, update)
        else:
            commit_update(rates, controllers, update, known_finite=known_finite)

    def multipliers() -> Tensor:  # the rate buffer itself where the state has one, as applied
        vec = state[0] if state is not None else torch.stack(rates)
        return clamp_rates(vec, lr_f, lr_bounds)

    common = (beta1, beta2, eps, coupled, maximize)
    if lagged:
        sums = ext.adam_hd_pass(params, grads, exp_avgs, exp_avg_sqs, constants, multipliers(),
                                *common, True, True)  # fmt: skip
        add_to_rows(steps, step_rows, 1)
        commit(rate_update(sums), known_finite=False)
        return True
    sums = ext.adam_hd_pass(params, grads, exp_avgs, exp_avg_sqs, constants, multipliers(),
                            *common, True, False)  # fmt: skip
    update = rate_update(sums)
    finite = update.finite if state is None else update[2]  # (RateUpdate / seek vectors)
    if not bool(finite):
        return True  # a skipped step: nothing changes
    commit(update, known_finite=True)
    ext.adam_hd_pass(params, grads, exp_avgs, exp_avg_sqs, constants, multipliers(), *common,
                     False, True)  # fmt: skip
    add_to_rows(steps, step_rows, 1)
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
    """The lagged SGD-HD step through the kernel, in one pass; False (nothing done) when the
    kernel is unavailable, for the exact mode (left to the other paths), or on the first step
    (buffers not created yet: ``b_1 = g_1`` as torch.optim.SGD)."""
    uses_buf, uses_prev = momentum != 0, momentum == 0 or nesterov
    if not lagged or (uses_buf and any(b is None for b in momentum_buffers)):
        return False
    if uses_prev and any(d is None for d in prev_directions):
        return False
    ext = load()
    if ext is None or shards is not None:
        return False
    if grads_finite is not None and not bool(grads_finite):
        return True
    lr_f = float(lr)
    step = torch.tensor([lr_f * float(r) for r in rates_in_use(rates, lr_f, lr_bounds)],
                        dtype=torch.float64)  # fmt: skip
    bufs = list(momentum_buffers) if uses_buf else []
    prevs = list(prev_directions) if uses_prev else []
    if any(not t.is_contiguous() for t in bufs + prevs):
        return False
    sums = ext.sgd_hd_pass(
        params, _contiguous(grads, params), bufs, prevs, step, momentum, dampening,
        weight_decay, nesterov, maximize,
    )  # fmt: skip
    state = seek_rows(rates, controllers, rule, hypergrad_lr, params[0].device)
    sizes = [p.numel() for p in params]
    if state is not None:  # the seek rule on its state's buffers
        new = seek_vectors_from_sums(
            state[0], state[1], sums, None, sizes, lr=lr, hypergrad_lr=hypergrad_lr,
            granularity=granularity, lr_bounds=lr_bounds, seek=seek,
        )  # fmt: skip
        commit_rows(state, new)
        return True
    update = adapt_rates_from_sums(
        rates, sums, sizes, lr=lr, hypergrad_lr=hypergrad_lr, rule=rule,
        granularity=granularity, lr_bounds=lr_bounds, controllers=controllers, seek=seek,
    )  # fmt: skip
    commit_update(rates, controllers, update, known_finite=False)
    return True
