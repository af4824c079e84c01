"""Meta-tasks/s of Meta-SGD on MAML's sinusoid: metalr (vmap, loop) vs ``higher`` vs learn2learn.

Run: ``python -m metalr.meta.benchmark --output experiments/results/bench_meta`` (or
``python experiments/bench_meta.py``); ``--help`` lists the options.

Set-up (MAML's regression benchmark, Meta-SGD): a 1-40-40-1 ReLU MLP, K=10 support and 10 query
points per sinusoid task, meta-batch 25, 1 and 5 inner steps, second-order meta-gradients, one
learned rate per weight initialised to 0.01, one intra-op thread. Every backend does the whole
meta-step the same way: inner loops for all tasks, mean query loss, backward, a non-finite check,
clipping of the meta-gradient to norm 1.0 and one Adam step (lr 1e-3) on the initial weights and
the rates. Backends:

* ``metalr vmap`` / ``metalr loop``: :class:`metalr.meta.MetaLearner` with ``backend="vmap"``
  (``torch.func.vmap`` over the task batch) or ``"loop"`` (one task at a time).
* ``higher+SGD``: ``higher.innerloop_ctx`` with higher's differentiable SGD and the rates passed as
  per-element ``lr`` through ``override``; ``higher+SGDHD`` is the same with metalr's registered
  twin of :class:`metalr.SGDHD`. Only when ``higher`` is installed (``pip install "metalr[meta]"``).
* ``learn2learn MetaSGD``: ``learn2learn.algorithms.MetaSGD(model, lr=0.01)``, ``clone()`` and
  ``adapt()`` per task. learn2learn is imported lazily; without it the row is skipped with a note
  (it never is a dependency of metalr: see the benchmark environment in ``/work/shared/ENV.md``).

metalr stores ``log α`` and learn2learn ``α``: both start at α = 0.01 and do the same inner
updates; only the Adam steps on the rates differ (in ``log α`` vs in ``α``), which costs the same.

Timing is interleaved: after ``--warmup`` untimed meta-steps per configuration, each round runs
``--iterations`` meta-steps of every (backend, inner steps) configuration, in a shuffled order,
timing each configuration's block alone. Each row reports the median meta-tasks/s over rounds,
its IQR, and the *paired* speed ratio against the reference (median over rounds of
``rate / rate(reference)`` within the same round and inner-step count, so slow phases of a shared
machine cancel). The reference is learn2learn MetaSGD when it imports, else ``metalr loop``.
Before timing, every backend's meta-gradient (initial weights and ``∂/∂ log α``) on the first batch
is compared with the reference's at the same starting point.

Goal (issue 3): ``metalr vmap`` ≥ 3× the meta-tasks/s of learn2learn MetaSGD.

This module times the backends and runs the command line; the backends and their task are in
:mod:`metalr.meta.bench_backends`, the result records and their Markdown/CSV output in
:mod:`metalr.meta.bench_results` (every public name is re-exported here).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from metalr._benchtools import emit

# Re-exported: these names lived here before the split and stay importable from this module.
from metalr.meta.bench_backends import (  # noqa: F401
    BACKENDS,
    CLIP,
    GOAL_ROW,
    GOAL_SPEEDUP,
    HIGHER_SGD,
    HIGHER_SGDHD,
    INNER_LR,
    L2L,
    LOOP,
    META_LR,
    VMAP,
    Factory,
    HigherRunner,
    L2LRunner,
    MetalrRunner,
    available_backends,
    higher_status,
    learn2learn_status,
    make_model,
    sinusoid_tasks,
)
from metalr.meta.bench_results import (  # noqa: F401
    COLUMNS,
    MetaBenchResult,
    Row,
    format_markdown,
    header,
    summary,
    table_rows,
    write_csv,
)

# --------------------------------------------------------------------------------------------
# Measurement


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float]:
    """(max |a - b|, max |b|) over every tensor of two equally shaped lists."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} gradient tensors")
    diff = max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.detach().abs().max()) for y in b)
    return diff, scale


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on this platform
        return (math.nan, math.nan, math.nan)


def run_benchmark(
    *,
    steps: Sequence[int] = (1, 5),
    rounds: int = 10,
    iterations: int = 5,
    warmup: int = 2,
    batch_size: int = 25,
    shots: int = 10,
    hidden: int = 40,
    threads: int | None = 1,
    backends: Sequence[str] | None = None,
    check_gradients: bool = True,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> MetaBenchResult:
    """Run the interleaved benchmark (see the module docstring) and return its rows.

    Args:
        steps: inner-step counts; every backend runs each.
        rounds: timed rounds; each runs every configuration once, in a shuffled order.
        iterations: meta-steps per configuration per round (one timed block).
        warmup: untimed meta-steps per configuration before the first round.
        batch_size: tasks per meta-step (meta-batch).
        shots: support points, and query points, per task.
        hidden: width of the two hidden layers.
        threads: ``torch.set_num_threads`` for the run (None: leave as is).
        backends: names from :data:`BACKENDS` (None: all; unavailable ones are skipped).
        check_gradients: compare meta-gradients with the reference's before timing.
        seed: seeds the tasks and the shuffles (the model is always seed 0).
        log: called with progress messages.
    """
    if rounds < 1 or iterations < 1 or warmup < 0 or not steps:
        raise ValueError("need rounds >= 1, iterations >= 1, warmup >= 0 and some inner steps")
    say = log or (lambda _msg: None)
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = _loadavg()
    started = time.perf_counter()
    factories, skipped, versions = available_backends(backends)
    for name, why in skipped.items():
        say(f"skipping {name}: {why}")
    if not factories:
        raise RuntimeError(f"no backend available: {skipped}")
    reference = L2L if L2L in factories else (LOOP if LOOP in factories else next(iter(factories)))

    g = torch.Generator().manual_seed(seed)
    pool = [sinusoid_tasks(batch_size, shots, g) for _ in range(max(4, iterations))]
    configs = [(name, s) for s in steps for name in factories]
    runners = {(name, s): factories[name](s, make_model(hidden)) for name, s in configs}
    say(
        f"{len(configs)} configurations; reference {reference}; {torch.get_num_threads()} thread(s)"
    )

    grad_check: dict[tuple[str, int], tuple[float, float]] = {}
    if check_gradients:  # every runner is still at the same starting point
        for s in steps:
            ref = runners[(reference, s)].meta_gradients(pool[0])
            for name in factories:
                grad_check[(name, s)] = max_abs_diff(
                    runners[(name, s)].meta_gradients(pool[0]), ref
                )

    for key, runner in runners.items():
        t0 = time.perf_counter()
        for i in range(warmup):
            runner.step(pool[i % len(pool)])
        say(f"warm-up {key[0]} ({key[1]} step(s)): {time.perf_counter() - t0:.2f} s")

    rates: dict[tuple[str, int], list[float]] = {key: [] for key in runners}
    rng = random.Random(seed)
    order = list(runners)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            rng.shuffle(order)
            for key in order:
                step = runners[key].step
                batches = [pool[(r * iterations + i) % len(pool)] for i in range(iterations)]
                t0 = time.perf_counter()
                for b in batches:
                    step(b)
                rates[key].append(iterations * batch_size / (time.perf_counter() - t0))
            say(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {s}: {rates[(n, s)][-1]:.0f}" for n, s in configs
            ))  # fmt: skip
    finally:
        if gc_was_enabled:
            gc.enable()

    rows = []
    for name, s in configs:
        ref_rates = rates[(reference, s)]
        diff, scale = grad_check.get((name, s), (math.nan, math.nan))
        rows.append(
            Row(
                backend=name,
                steps=s,
                reference=reference,
                rates=rates[(name, s)],
                ratios=[a / b for a, b in zip(rates[(name, s)], ref_rates)],
                grad_diff=diff,
                grad_scale=scale,
            )
        )
    notes = []
    if reference != L2L:
        notes.append(f"ratios are against {reference}: learn2learn MetaSGD was not measured")
    return MetaBenchResult(
        rows=rows, reference=reference, skipped=skipped, versions=versions, cpu=cpu_name(),
        threads=torch.get_num_threads(), batch_size=batch_size, shots=shots, hidden=hidden,
        rounds=rounds, iterations=iterations, warmup=warmup, load_before=load_before,
        load_after=_loadavg(), seconds=time.perf_counter() - started, notes=notes,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_meta",
        description="Meta-tasks/s of Meta-SGD on sinusoid: metalr vmap/loop, higher, learn2learn.",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps (1 5)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument(
        "--iterations", type=int, default=5, help="meta-steps per configuration per round (5)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="warm-up meta-steps (default: 2)")
    parser.add_argument("--batch-size", type=int, default=25, help="meta-batch (default: 25)")
    parser.add_argument("--shots", type=int, default=10, help="support = query points (10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backends", nargs="+", default=None, metavar="NAME", choices=BACKENDS,
        help=f"subset of {list(BACKENDS)} (default: all available)",
    )  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the meta-gradient check")
    parser.add_argument(
        "--output", default=None, metavar="PATH", help="also write PATH.md and PATH.csv"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print the markdown table, optionally write it out."""
    args = parse_args(argv)
    result = run_benchmark(
        steps=args.steps, rounds=args.rounds, iterations=args.iterations, warmup=args.warmup,
        batch_size=args.batch_size, shots=args.shots, threads=args.threads,
        backends=args.backends, check_gradients=not args.no_check, seed=args.seed,
        log=None if args.quiet else (lambda msg: print(msg, flush=True)),
    )  # fmt: skip
    emit(format_markdown(result), args.output, lambda path: write_csv(result, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
