"""Step-time and state-memory benchmark of metalr's optimizers against ``torch.optim``.

Times ``optimizer.step()`` alone for a model-sized list of parameters (default ~5M on CPU, ~100M on
CUDA, in ~20 tensors of mixed shapes), every optimizer on its own copy of the parameters so its
state is realistic. All optimizers are interleaved in one run: after the warm-up (where compiled
variants compile), each round steps every optimizer once, in a shuffled order, timing each step
alone. The report gives per optimizer the median step time and its IQR, the *paired* ratio (median
over rounds of ``t / t_reference`` within the same round, so slow phases of a shared machine cancel)
against torch's fused Adam (Adam family) or torch's foreach SGD with momentum (SGD family), and the
optimizer's state bytes over the parameter bytes.

Run it with ``python experiments/bench_step.py`` (or ``python -m metalr.bench``); ``--help`` lists
the options. Gradients are fixed random tensors set once and reused by every step: timing does not
depend on their values, and they are far from zero so the hypergradient paths really run (the
report checks that every learned multiplier moved).

Goals (from the performance issue; "state" compares state bytes with torch Adam's/SGD's):

* AdamHD, group/tensor granularity: ≤ 1.30× fused Adam on CPU, ≤ 1.15× on CUDA; state = Adam's.
* AdamHD, element granularity: ≤ 1.60× fused Adam; state = Adam's + one parameter-sized buffer.
* SGDHD (momentum), tensor granularity: ≤ 1.30× torch SGD(momentum, foreach); state = SGD's.
* The single-tensor paths (``foreach=False``, which ``differentiable=True`` also takes): ≤ 2× the
  same optimizer's ``foreach`` path (their ratio is against that row, named in the "vs" column).
* Issue 12, the single-pass kernels (``fused=True, lagged=True``): AdamHD group/tensor ≤ 1.30×
  fused Adam on CPU, ≤ 1.10× on CUDA; SGDHD(momentum) ≤ 1.20× torch SGD(momentum) on CPU,
  ≤ 1.15× torch's fused SGD on CUDA; state = the torch optimizer's. Its exact two-pass kernels
  (``fused=True``): AdamHD group/tensor ≤ 1.60× on CPU, ≤ 1.50× on CUDA (two passes move at
  least 1.43× fused Adam's bytes); element ≤ 1.40× / 1.30×.

Rows with ``fused=True`` appear only when the installed metalr optimizers accept that keyword.

This module times the rows and runs the command line; the parameters and the optimizer rows are
in :mod:`metalr.bench_specs`, the result records and their Markdown/CSV output in
:mod:`metalr.bench_results` (every public name is re-exported here).
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import time
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from metalr._benchtools import emit

# Re-exported: these names lived here before the split and stay importable from this module
# (``_torch_fused_ok`` too: the tests use it).
from metalr.bench_results import (  # noqa: F401
    COLUMNS,
    PER_TENSOR_STATE_BYTES,
    BenchResult,
    Row,
    format_markdown,
    header,
    table_rows,
    write_csv,
)
from metalr.bench_specs import (  # noqa: F401
    ADAM_LR,
    ADAM_REF,
    DEFAULT_PARAMS,
    DEFAULT_TENSORS,
    GRAD_SCALE,
    MOMENTUM,
    SGD_LR,
    SGD_REF,
    Spec,
    _torch_fused_ok,
    clone_params,
    make_shapes,
    make_specs,
    make_tensors,
    multiplier_range,
    state_bytes,
    supports_fused,
    supports_lagged,
)

# --------------------------------------------------------------------------------------------
# Timing


class _Timer:
    """Times one call: wall clock on CPU, CUDA events on CUDA (read after the round)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def time(self, fn: Callable[[], object]) -> Callable[[], float]:
        """Run ``fn`` alone and return a callable giving its duration in ms."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            return lambda: start.elapsed_time(end)
        t0 = time.perf_counter_ns()
        fn()
        elapsed = (time.perf_counter_ns() - t0) / 1e6
        return lambda: elapsed

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def run_benchmark(
    params: int | None = None,
    *,
    tensors: int = DEFAULT_TENSORS,
    device: str | torch.device = "cpu",
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = 1,
    fused: bool | None = None,
    only: Sequence[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the interleaved benchmark and return its rows (see the module docstring).

    Args:
        params: total parameter count (None: 5M on CPU, 100M on CUDA).
        tensors: number of parameter tensors.
        device: where the parameters live.
        repeats: timed rounds; each steps every optimizer once, in a shuffled order.
        warmup: untimed rounds first (compiled variants compile here).
        threads: ``torch.set_num_threads`` for the run (None: leave as is).
        fused: include metalr's ``fused=True`` rows (None: when the keyword exists).
        only: keep only the rows whose name contains one of these strings (references are
            always kept).
        seed: seeds the weights, gradients and the shuffles.
        log: called with progress messages.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if threads is not None:
        torch.set_num_threads(threads)
    say = log or (lambda _msg: None)
    total = DEFAULT_PARAMS.get(device.type, DEFAULT_PARAMS["cpu"]) if params is None else params

    specs = make_specs(device, fused)
    if only:
        kept = {s.name for s in specs if s.reference or any(o in s.name for o in only)}
        kept |= {s.vs for s in specs if s.name in kept and s.vs is not None}
        specs = [s for s in specs if s.name in kept]
    shapes = make_shapes(total, tensors)
    weights, grads = make_tensors(shapes, device, seed)
    n_params = sum(w.numel() for w in weights)
    param_bytes = sum(w.numel() * w.element_size() for w in weights)
    say(f"{len(specs)} optimizers, {n_params:,} parameters in {len(shapes)} tensors on {device}")

    optimizers: dict[str, Optimizer] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        try:
            optimizers[spec.name] = spec.build(clone_params(weights, grads))
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
            if spec.reference:
                raise
            skipped[spec.name] = f"{type(exc).__name__}: {exc}"
    del weights, grads
    specs = [s for s in specs if s.name in optimizers and (s.vs is None or s.vs in optimizers)]
    refs = {s.family: s.name for s in specs if s.reference}

    timer = _Timer(device)
    rng = random.Random(seed)
    order = list(optimizers)
    for w in range(warmup):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            optimizers[name].step()
            timer.sync()
            if w == 0 and time.perf_counter() - t0 > 1.0:
                say(f"warm-up: {name} took {time.perf_counter() - t0:.1f} s")
    timer.sync()

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            pending = [(name, timer.time(optimizers[name].step)) for name in order]
            timer.sync()
            for name, elapsed in pending:
                times[name].append(elapsed())
    finally:
        if gc_was_enabled:
            gc.enable()

    sizes = {name: state_bytes(opt) for name, opt in optimizers.items()}
    rows = []
    for spec in specs:
        ref = spec.vs or refs[spec.family]
        lr = ADAM_LR if spec.family == "adam" else SGD_LR
        rows.append(
            Row(
                name=spec.name,
                family=spec.family,
                reference=ref,
                times_ms=times[spec.name],
                ratios=[t / r for t, r in zip(times[spec.name], times[ref])],
                state_bytes=sizes[spec.name],
                param_bytes=param_bytes,
                reference_state_bytes=sizes[ref],
                time_goal=spec.time_goal,
                state_goal=spec.state_goal,
                multiplier=multiplier_range(optimizers[spec.name], lr) if spec.adaptive else None,
                goal_vs=spec.vs,
                tensors=len(shapes),
            )
        )
    return BenchResult(
        rows=rows,
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        params=n_params,
        tensors=len(shapes),
        repeats=repeats,
        warmup=warmup,
        skipped=skipped,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="metalr bench-step",
        description="Time optimizer.step() of metalr's optimizers against torch.optim.",
    )
    parser.add_argument(
        "--params", type=int, default=None,
        help="total parameters (default: 5M on CPU, 100M on CUDA)",
    )  # fmt: skip
    parser.add_argument("--tensors", type=int, default=DEFAULT_TENSORS, help="parameter tensors")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    fused = parser.add_mutually_exclusive_group()
    fused.add_argument(
        "--fused", dest="fused", action="store_true", default=None,
        help="include metalr's fused rows (default: when the optimizers accept fused=)",
    )  # fmt: skip
    fused.add_argument("--no-fused", dest="fused", action="store_false", help="skip fused rows")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="SUBSTRING",
        help="keep only rows whose name contains one of these (references always kept)",
    )  # fmt: skip
    parser.add_argument(
        "--output", default=None, metavar="PATH",
        help="also write the table to PATH.md and PATH.csv",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print the markdown table, optionally write it out."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    result = run_benchmark(
        args.params,
        tensors=args.tensors,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        fused=args.fused,
        only=args.only,
        seed=args.seed,
        log=None if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    emit(format_markdown(result), args.output, lambda path: write_csv(result, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
