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
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalr._benchtools import markdown_table, output_paths, quantile, verdict
from metalr._benchtools import write_csv as write_rows_csv
from metalr.meta.config import MetaConfig
from metalr.meta.learner import MetaLearner
from metalr.tasks.base import TaskBatch

VMAP = "metalr vmap"
LOOP = "metalr loop"
HIGHER_SGD = "higher+SGD"
HIGHER_SGDHD = "higher+SGDHD"
L2L = "learn2learn MetaSGD"
BACKENDS = (VMAP, LOOP, HIGHER_SGD, HIGHER_SGDHD, L2L)
#: The issue's goal: metalr vmap's meta-tasks/s over learn2learn MetaSGD's.
GOAL_ROW, GOAL_SPEEDUP = VMAP, 3.0

INNER_LR = 0.01
META_LR = 1e-3
CLIP = 1.0


def sinusoid_tasks(
    n: int, shots: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> TaskBatch:
    """MAML's sinusoid: A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [-5, 5]; ``shots`` support and query."""
    amp = torch.rand(n, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1, generator=generator) * torch.pi
    x = torch.rand(n, 2 * shots, 1, generator=generator) * 10 - 5
    y = amp * torch.sin(x - phase)
    x, y = x.to(dtype), y.to(dtype)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def make_model(hidden: int = 40, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The 1-``hidden``-``hidden``-1 ReLU MLP, with the same weights for every backend."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )
    return model.to(dtype)


# --------------------------------------------------------------------------------------------
# Backends. Each runner owns its own copy of the model and meta-optimizer and offers
#   step(batch)            one full meta-step (what is timed)
#   meta_gradients(batch)  [∂L/∂θ_0 ..., ∂L/∂log α ...] in the model's parameter order, at the
#                          current point, without updating anything (the agreement check)


def _guarded_update(
    loss: Tensor, params: Sequence[Tensor], optimizer: torch.optim.Optimizer, clip: float
) -> None:
    """What :meth:`MetaLearner.meta_step` does after the meta-loss: skip a non-finite loss or
    gradient, clip the gradient norm, one optimizer step."""
    if bool(torch.isfinite(loss)):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if math.isfinite(float(norm)):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class MetalrRunner:
    """:class:`MetaLearner` with element rates (Meta-SGD) and ``backend`` ``"vmap"``/``"loop"``."""

    def __init__(self, backend: str, steps: int, model: nn.Module) -> None:
        config = MetaConfig(
            rates="element", inner_steps=steps, inner_lr=INNER_LR, backend=backend,
            meta_lr=META_LR, meta_grad_clip=CLIP,
        )  # fmt: skip
        self.learner = MetaLearner(model, config)

    def step(self, batch: TaskBatch) -> None:
        self.learner.meta_step(batch)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        meta = self.learner.meta
        inputs = list(meta.init_params().values()) + list(meta.log_rates.values())
        return list(torch.autograd.grad(self.learner.meta_loss(batch), inputs))


class HigherRunner:
    """``higher.innerloop_ctx`` per task, rates as per-element ``lr`` through ``override``."""

    def __init__(self, optimizer_name: str, steps: int, model: nn.Module) -> None:
        import metalr
        from metalr.meta.higher_backend import meta_gradient_via_higher

        self._meta_gradient = meta_gradient_via_higher
        self.model, self.steps = model, steps
        self.params = list(model.parameters())
        self.log_rates = [
            torch.full_like(p, math.log(INNER_LR)).requires_grad_() for p in self.params
        ]
        groups = [{"params": [p]} for p in self.params]
        if optimizer_name == "SGD":
            self.inner: torch.optim.Optimizer = torch.optim.SGD(groups, lr=INNER_LR)
        else:
            self.inner = metalr.SGDHD(groups, lr=INNER_LR, hypergrad_lr=0.0, granularity="element")
        self.meta_opt = torch.optim.Adam(self.params + self.log_rates, lr=META_LR)

    def _grads(self, batch: TaskBatch) -> tuple[Tensor, list[Tensor]]:
        rates = [r.exp() for r in self.log_rates]
        loss, grads = self._meta_gradient(
            self.model, self.inner, batch, inner_steps=self.steps, override={"lr": rates}
        )
        n = len(self.params)
        # ∂/∂α → ∂/∂log α through the exp.
        rate_grads = torch.autograd.grad(rates, self.log_rates, grads[n:])
        return loss, list(grads[:n]) + list(rate_grads)

    def step(self, batch: TaskBatch) -> None:
        loss, grads = self._grads(batch)
        everything = self.params + self.log_rates
        if bool(torch.isfinite(loss)):
            for p, g in zip(everything, grads):
                p.grad = g
            norm = torch.nn.utils.clip_grad_norm_(everything, CLIP)
            if math.isfinite(float(norm)):
                self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        return self._grads(batch)[1]


class L2LRunner:
    """``learn2learn.algorithms.MetaSGD``: ``clone()`` + ``adapt()`` per task, as its examples."""

    def __init__(self, steps: int, model: nn.Module) -> None:
        import learn2learn as l2l

        self.steps = steps
        self.meta = l2l.algorithms.MetaSGD(model, lr=INNER_LR, first_order=False)
        self.params = list(self.meta.parameters())  # module's weights, then the rates (lrs)
        self.meta_opt = torch.optim.Adam(self.params, lr=META_LR)

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        total: Tensor | None = None
        for i in range(batch.num_tasks):
            sx, sy, qx, qy = (t[i] for t in batch)
            learner = self.meta.clone()
            for _ in range(self.steps):
                learner.adapt(F.mse_loss(learner(sx), sy))
            query = F.mse_loss(learner(qx), qy)
            total = query if total is None else total + query
        assert total is not None
        return total / batch.num_tasks

    def step(self, batch: TaskBatch) -> None:
        _guarded_update(self.meta_loss(batch), self.params, self.meta_opt, CLIP)

    def meta_gradients(self, batch: TaskBatch) -> list[Tensor]:
        weights = list(self.meta.module.parameters())
        lrs = list(self.meta.lrs)
        grads = torch.autograd.grad(self.meta_loss(batch), weights + lrs)
        n = len(weights)
        # learn2learn learns α itself: ∂L/∂log α = α ⊙ ∂L/∂α.
        return list(grads[:n]) + [a.detach() * g for a, g in zip(lrs, grads[n:])]


def _import_status(module: str) -> tuple[bool, str]:
    """(importable, installed version or the reason it does not import)."""
    try:
        importlib.import_module(module)
    # ImportError, or anything a broken torchvision/gym raises while learn2learn imports.
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    try:
        return True, importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return True, "?"


def learn2learn_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not); imports learn2learn (slow: torchvision)."""
    return _import_status("learn2learn")


def higher_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    return _import_status("higher")


Factory = Callable[[int, nn.Module], Any]


def available_backends(
    names: Sequence[str] | None = None,
) -> tuple[dict[str, Factory], dict[str, str], dict[str, str]]:
    """``({name: factory(steps, model)}, {skipped name: why}, {library: version})``."""
    wanted = list(BACKENDS if names is None else names)
    unknown = [n for n in wanted if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; expected some of {list(BACKENDS)}")
    factories: dict[str, Factory] = {}
    skipped: dict[str, str] = {}
    versions = {"torch": torch.__version__}
    if VMAP in wanted:
        factories[VMAP] = lambda s, m: MetalrRunner("vmap", s, m)
    if LOOP in wanted:
        factories[LOOP] = lambda s, m: MetalrRunner("loop", s, m)
    if HIGHER_SGD in wanted or HIGHER_SGDHD in wanted:
        ok, info = higher_status()
        for name, opt in ((HIGHER_SGD, "SGD"), (HIGHER_SGDHD, "SGDHD")):
            if name not in wanted:
                continue
            if ok:
                factories[name] = lambda s, m, opt=opt: HigherRunner(opt, s, m)
            else:
                skipped[name] = f"higher not importable ({info}); pip install 'metalr[meta]'"
        if ok:
            versions["higher"] = info
    if L2L in wanted:
        ok, info = learn2learn_status()
        if ok:
            factories[L2L] = L2LRunner
            versions["learn2learn"] = info
        else:
            skipped[L2L] = (
                f"learn2learn not importable ({info}); see the learn2learn section of "
                "/work/shared/ENV.md for a benchmark-only environment"
            )
    return factories, skipped, versions


# --------------------------------------------------------------------------------------------
# Measurement


def max_abs_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float]:
    """(max |a - b|, max |b|) over every tensor of two equally shaped lists."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} gradient tensors")
    diff = max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.detach().abs().max()) for y in b)
    return diff, scale


@dataclass
class Row:
    backend: str
    steps: int
    reference: str
    rates: list[float]  # meta-tasks/s, one per round
    ratios: list[float]  # rate / reference's rate, same round and inner-step count
    grad_diff: float = math.nan  # max |meta-grad - reference's| on the first batch
    grad_scale: float = math.nan  # max |reference's meta-grad|

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def iqr(self) -> float:
        return quantile(self.rates, 0.75) - quantile(self.rates, 0.25)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def goal(self) -> str:
        if self.backend == GOAL_ROW and self.reference == L2L:
            return f">= {GOAL_SPEEDUP:g}x {L2L}"
        return ""

    @property
    def passed(self) -> bool | None:
        return self.ratio >= GOAL_SPEEDUP if self.goal else None


@dataclass
class MetaBenchResult:
    rows: list[Row]
    reference: str
    skipped: dict[str, str]
    versions: dict[str, str]
    cpu: str
    threads: int
    batch_size: int
    shots: int
    hidden: int
    rounds: int
    iterations: int
    warmup: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    def row(self, backend: str, steps: int) -> Row:
        return next(r for r in self.rows if r.backend == backend and r.steps == steps)


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


# --------------------------------------------------------------------------------------------
# Reporting


def header(result: MetaBenchResult) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())

    def load(t: tuple[float, ...]) -> str:
        return "/".join(f"{x:.2f}" for x in t)

    return (
        f"Meta-SGD on sinusoid (1-{result.hidden}-{result.hidden}-1 ReLU MLP, K={result.shots} "
        f"support + {result.shots} query, meta-batch {result.batch_size}, second order, Adam "
        f"meta-step incl. backward, clip 1.0) | {versions} | CPU: {result.cpu} | "
        f"threads: {result.threads} | rounds: {result.rounds} x {result.iterations} meta-steps "
        f"(+{result.warmup} warm-up) | load average (1/5/15 min) before {load(result.load_before)}, "
        f"after {load(result.load_after)} | {result.seconds:.0f} s"
    )


COLUMNS = [
    "backend", "inner steps", "meta-tasks/s", "IQR", "speed ratio", "vs",
    "max abs Δ meta-grad", "goal", "pass",
]  # fmt: skip


def table_rows(result: MetaBenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        grad = "—" if math.isnan(r.grad_diff) else f"{r.grad_diff:.1e} (of {r.grad_scale:.2g})"
        out.append(
            [
                r.backend,
                str(r.steps),
                f"{r.median:.0f}",
                f"{r.iqr:.0f}",
                f"{r.ratio:.2f}x",
                "(reference)" if r.backend == r.reference else r.reference,
                grad,
                r.goal or "—",
                verdict(r.passed),
            ]
        )
    return out


def summary(result: MetaBenchResult) -> list[str]:
    """One line per inner-step count: the vmap row's ratios to every other backend."""
    lines = []
    steps = sorted({r.steps for r in result.rows})
    for s in steps:
        rows = {r.backend: r for r in result.rows if r.steps == s}
        if VMAP not in rows:
            continue
        vmap = rows[VMAP]
        parts = []
        for name, row in rows.items():
            if name == VMAP:
                continue
            paired = statistics.median(a / b for a, b in zip(vmap.rates, row.rates))
            parts.append(f"{paired:.2f}x {name}")
        lines.append(f"{s} inner step(s): {VMAP} = " + ", ".join(parts))
    goal_rows = [r for r in result.rows if r.goal]
    if goal_rows:
        ok = all(r.passed for r in goal_rows)
        lines.append(
            f"goal {VMAP} >= {GOAL_SPEEDUP:g}x {L2L}: "
            + ("met" if ok else "NOT met")
            + " ("
            + ", ".join(f"{r.steps} step(s) {r.ratio:.2f}x" for r in goal_rows)
            + ")"
        )
    else:
        lines.append(f"goal {VMAP} >= {GOAL_SPEEDUP:g}x {L2L}: not evaluated ({L2L} not measured)")
    return lines


def format_markdown(result: MetaBenchResult) -> str:
    """The header, the markdown table, the ratio summary, notes and skipped rows."""
    lines = [header(result), "", *markdown_table(COLUMNS, "lrrrrlrll", table_rows(result))]
    lines.append("")
    lines.append(
        "meta-tasks/s: median over rounds; speed ratio: median over rounds of "
        "rate/rate(reference) in the same round (higher is faster); max abs Δ meta-grad: over "
        "initial weights and ∂/∂log α, on the first batch, before any meta-step, against the "
        "reference (in parentheses: the reference's largest entry)."
    )
    lines.append("")
    lines += [f"- {line}" for line in summary(result)]
    for note in result.notes:
        lines.append(f"- note: {note}")
    for name, why in result.skipped.items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


def write_csv(result: MetaBenchResult, path: str | os.PathLike[str]) -> None:
    """One line per (backend, inner steps), unrounded, with the run's conditions on every line."""
    fields = [
        "backend", "inner_steps", "meta_tasks_per_s", "iqr", "ratio", "reference", "grad_diff",
        "grad_scale", "goal", "pass", "rates_per_round", "torch", "learn2learn", "higher", "cpu",
        "threads", "batch_size", "shots", "hidden", "rounds", "iterations", "warmup",
        "load_before", "load_after",
    ]  # fmt: skip
    rows = [
        [
            r.backend,
            r.steps,
            r.median,
            r.iqr,
            r.ratio,
            r.reference,
            r.grad_diff,
            r.grad_scale,
            r.goal,
            verdict(r.passed),
            " ".join(f"{x:.1f}" for x in r.rates),
            result.versions.get("torch", ""),
            result.versions.get("learn2learn", ""),
            result.versions.get("higher", ""),
            result.cpu,
            result.threads,
            result.batch_size,
            result.shots,
            result.hidden,
            result.rounds,
            result.iterations,
            result.warmup,
            " ".join(f"{x:.2f}" for x in result.load_before),
            " ".join(f"{x:.2f}" for x in result.load_after),
        ]
        for r in result.rows
    ]
    write_rows_csv(path, fields, rows)


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
    text = format_markdown(result)
    print(text, end="")
    if args.output:
        md, csv_path = output_paths(args.output)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        write_csv(result, csv_path)
        print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
