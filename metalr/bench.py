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
  ≤ 1.15× torch's fused SGD on CUDA; state = the torch optimizer's.

Rows with ``fused=True`` appear only when the installed metalr optimizers accept that keyword.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalr._benchtools import markdown_table, output_paths, quantile, verdict
from metalr._benchtools import write_csv as write_rows_csv
from metalr.optim.adam_hd import AdamHD
from metalr.optim.hyper_lr import HyperLR
from metalr.optim.sgd_hd import SGDHD

#: Parameter count when ``--params`` is not given, per device type.
DEFAULT_PARAMS = {"cpu": 5_000_000, "cuda": 100_000_000}
DEFAULT_TENSORS = 20
ADAM_LR = 1e-3
SGD_LR = 1e-2
MOMENTUM = 0.9
#: Scale of the fixed random gradients (keeps the additive rule's rate steps moderate).
GRAD_SCALE = 1e-3
#: Relative tolerance of the "state equals the reference's" goal (the per-tensor rate scalars).
STATE_RTOL = 0.01

ADAM_REF = "torch Adam (fused)"
SGD_REF = "torch SGD(momentum, foreach)"

#: (rows, cols) of the matrices, in units of the base width; one bias-like vector follows each.
_MATRIX_SHAPES = [(8, 1), (3, 1), (1, 1), (4, 1), (1, 4), (3, 1), (1, 1), (4, 1), (1, 4), (2, 1)]
_VECTOR_SIZES = [1, 3, 1, 4, 1, 3, 1, 4, 1, 2]


# --------------------------------------------------------------------------------------------
# Parameters


def make_shapes(total: int, n_tensors: int = DEFAULT_TENSORS) -> list[tuple[int, ...]]:
    """About ``n_tensors`` shapes (alternating matrices and vectors) totalling about ``total``.

    A transformer-like mix: an embedding-sized matrix, square and 4:1 projections, and a bias
    vector after each. The base width ``d`` solves ``d²·Σ(a·b) + d·Σc = total``.
    """
    n_mats = max(1, (n_tensors + 1) // 2)
    n_vecs = max(0, n_tensors - n_mats)
    mats = [_MATRIX_SHAPES[i % len(_MATRIX_SHAPES)] for i in range(n_mats)]
    vecs = [_VECTOR_SIZES[i % len(_VECTOR_SIZES)] for i in range(n_vecs)]
    quad = sum(a * b for a, b in mats)
    lin = sum(vecs)
    d = max(1, round((-lin + math.sqrt(lin * lin + 4 * quad * total)) / (2 * quad)))
    shapes: list[tuple[int, ...]] = []
    for i in range(max(n_mats, n_vecs)):
        if i < n_mats:
            shapes.append((mats[i][0] * d, mats[i][1] * d))
        if i < n_vecs:
            shapes.append((vecs[i] * d,))
    return shapes


def make_tensors(
    shapes: Sequence[tuple[int, ...]], device: torch.device, seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Initial weights and fixed gradients (float32, on ``device``), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    weights = [(0.02 * torch.randn(s, generator=gen)).to(device) for s in shapes]
    grads = [(GRAD_SCALE * torch.randn(s, generator=gen)).to(device) for s in shapes]
    return weights, grads


def clone_params(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    """An independent copy of the parameters, each with its own copy of the gradient."""
    params = []
    for w, g in zip(weights, grads):
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        params.append(p)
    return params


# --------------------------------------------------------------------------------------------
# Optimizers


@dataclass
class Spec:
    """One benchmark row: how to build the optimizer and what it is compared with."""

    name: str
    family: str  # "adam" or "sgd"
    build: Callable[[list[torch.nn.Parameter]], Optimizer]
    time_goal: float | None = None
    #: Expected state bytes minus the reference's, in parameter bytes (None: no state goal).
    state_goal: float | None = None
    reference: bool = False
    adaptive: bool = False  # learns rate multipliers (checked to have moved)
    #: Name of the row the ratio and time goal compare with (None: the family's reference).
    vs: str | None = None


def supports_fused(cls: type) -> bool:
    """Whether ``cls`` takes a ``fused`` keyword (metalr's compiled path)."""
    try:
        return "fused" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _torch_fused_ok(cls: type[Optimizer], device: torch.device, **kwargs: object) -> bool:
    """Whether torch's ``fused=True`` kernels of ``cls`` run on ``device``."""
    try:
        p = torch.nn.Parameter(torch.ones(4, device=device))
        p.grad = torch.ones(4, device=device)
        cls([p], fused=True, **kwargs).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def make_specs(device: torch.device, fused: bool | None = None) -> list[Spec]:
    """The rows for ``device``. ``fused``: include metalr's fused rows (None: when supported)."""
    cuda = device.type == "cuda"
    tensor_goal = 1.15 if cuda else 1.30
    adam_fused = _torch_fused_ok(torch.optim.Adam, device)
    sgd_fused = _torch_fused_ok(torch.optim.SGD, device, lr=SGD_LR, momentum=MOMENTUM)

    def torch_adam(**kw: object) -> Callable[[list], Optimizer]:
        return lambda ps: torch.optim.Adam(ps, lr=ADAM_LR, **kw)

    def torch_sgd(**kw: object) -> Callable[[list], Optimizer]:
        return lambda ps: torch.optim.SGD(ps, lr=SGD_LR, momentum=MOMENTUM, **kw)

    def adam_hd(**kw: object) -> Callable[[list], Optimizer]:
        return lambda ps: AdamHD(ps, lr=ADAM_LR, **kw)

    def sgd_hd(**kw: object) -> Callable[[list], Optimizer]:
        return lambda ps: SGDHD(ps, lr=SGD_LR, momentum=MOMENTUM, **kw)

    specs = [
        Spec(SGD_REF, "sgd", torch_sgd(foreach=True), reference=True),
    ]
    if sgd_fused:
        specs.append(Spec("torch SGD(momentum, fused)", "sgd", torch_sgd(fused=True)))
    specs.append(Spec("torch Adam (foreach)", "adam", torch_adam(foreach=True)))
    if adam_fused:
        specs.append(Spec(ADAM_REF, "adam", torch_adam(fused=True), reference=True))
    else:  # old torch / exotic device: the foreach Adam is the reference
        specs[-1].reference = True
    specs += [
        Spec("SGDHD tensor", "sgd", sgd_hd(granularity="tensor"), 1.30, 0.0, adaptive=True),
        Spec("AdamHD group", "adam", adam_hd(granularity="group"), tensor_goal, 0.0, adaptive=True),
        Spec(
            "AdamHD tensor", "adam", adam_hd(granularity="tensor"), tensor_goal, 0.0, adaptive=True
        ),
        Spec("AdamHD element", "adam", adam_hd(granularity="element"), 1.60, 1.0, adaptive=True),
        Spec(
            "AdamHD tensor foreach=False",
            "adam",
            adam_hd(granularity="tensor", foreach=False),
            2.0,
            0.0,
            adaptive=True,
            vs="AdamHD tensor",
        ),
        Spec(
            "SGDHD tensor foreach=False",
            "sgd",
            sgd_hd(granularity="tensor", foreach=False),
            2.0,
            0.0,
            adaptive=True,
            vs="SGDHD tensor",
        ),
        Spec(
            "AdamHD tensor normalized",
            "adam",
            adam_hd(granularity="tensor", rule="normalized"),
            tensor_goal,
            0.0,
            adaptive=True,
        ),
        Spec(  # the seek rule (default) against the previous default: goal ≤ 1.10 (issue 10)
            "AdamHD tensor (seek ÷ normalized)",
            "adam",
            adam_hd(granularity="tensor"),
            1.10,
            0.0,
            adaptive=True,
            vs="AdamHD tensor normalized",
        ),
        Spec(
            "SGDHD tensor normalized",
            "sgd",
            sgd_hd(granularity="tensor", rule="normalized"),
            1.30,
            0.0,
            adaptive=True,
        ),
        Spec(
            "SGDHD tensor (seek ÷ normalized)",
            "sgd",
            sgd_hd(granularity="tensor"),
            1.10,
            0.0,
            adaptive=True,
            vs="SGDHD tensor normalized",
        ),
        Spec(
            "AdamHD tensor additive",
            "adam",
            adam_hd(granularity="tensor", rule="additive"),
            tensor_goal,
            0.0,
            adaptive=True,
        ),
        Spec(
            "HyperLR(torch Adam fused) tensor"
            if adam_fused
            else "HyperLR(torch Adam foreach) tensor",
            "adam",
            lambda ps: HyperLR(
                torch.optim.Adam(ps, lr=ADAM_LR, **({"fused": True} if adam_fused else {}))
            ),
            adaptive=True,
        ),
        Spec(
            "HyperLR(torch SGD momentum) tensor",
            "sgd",
            lambda ps: HyperLR(torch.optim.SGD(ps, lr=SGD_LR, momentum=MOMENTUM, foreach=True)),
            adaptive=True,
        ),
    ]
    if fused is not False and supports_fused(SGDHD):
        specs.append(
            Spec(
                "SGDHD tensor fused",
                "sgd",
                sgd_hd(granularity="tensor", fused=True),
                1.30,
                0.0,
                adaptive=True,
            )
        )
    if fused is not False and supports_fused(AdamHD):
        for gran, goal, state in (
            ("group", tensor_goal, 0.0),
            ("tensor", tensor_goal, 0.0),
            ("element", 1.60, 1.0),
        ):
            specs.append(
                Spec(
                    f"AdamHD {gran} fused",
                    "adam",
                    adam_hd(granularity=gran, fused=True),
                    goal,
                    state,
                    adaptive=True,
                )
            )
    if fused is not False and supports_fused(AdamHD) and supports_lagged(AdamHD):
        specs += _lagged_specs(cuda, adam_hd, sgd_hd, sgd_fused)
    return specs


def supports_lagged(cls: type) -> bool:
    """Whether ``cls`` takes a ``lagged`` keyword (the one-step-lagged rate, issue 12)."""
    try:
        return "lagged" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _lagged_specs(
    cuda: bool, adam_hd: Callable[..., Callable], sgd_hd: Callable[..., Callable], sgd_fused: bool
) -> list[Spec]:
    """Rows of the single-pass kernels (issue 12 goals: lagged AdamHD ≤ 1.30× fused Adam on the
    CPU, ≤ 1.10× on CUDA; lagged SGDHD ≤ 1.20× torch SGD(momentum), ≤ 1.15× torch's fused SGD
    on CUDA; state = the torch optimizer's). The eager lagged rows carry no goal."""
    adam_goal = 1.10 if cuda else 1.30
    sgd_goal, sgd_vs = (1.15, "torch SGD(momentum, fused)") if cuda and sgd_fused else (1.20, None)
    return [
        Spec(
            "AdamHD tensor fused lagged", "adam",
            adam_hd(granularity="tensor", fused=True, lagged=True), adam_goal, 0.0, adaptive=True,
        ),
        Spec(
            "AdamHD group fused lagged", "adam",
            adam_hd(granularity="group", fused=True, lagged=True), adam_goal, 0.0, adaptive=True,
        ),
        Spec(
            "SGDHD tensor fused lagged", "sgd",
            sgd_hd(granularity="tensor", fused=True, lagged=True), sgd_goal, 0.0, adaptive=True,
            vs=sgd_vs,
        ),
        Spec("AdamHD tensor lagged", "adam", adam_hd(granularity="tensor", lagged=True),
             adaptive=True),
        Spec("SGDHD tensor lagged", "sgd", sgd_hd(granularity="tensor", lagged=True),
             adaptive=True),
    ]  # fmt: skip


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` and a wrapped optimizer's, each counted once."""
    seen: set[int] = set()
    total = 0
    optimizers = [optimizer]
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        optimizers.append(inner)
    for opt in optimizers:
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total += value.numel() * value.element_size()
    return total


def multiplier_range(optimizer: Optimizer, lr: float) -> tuple[float, float] | None:
    """(min, max) learned multiplier of a metalr optimizer, None for plain torch optimizers."""
    summary = getattr(optimizer, "lr_summary", None)
    if summary is None:
        return None
    groups = summary()
    return min(g["min"] for g in groups) / lr, max(g["max"] for g in groups) / lr


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


@dataclass
class Row:
    """The result of one optimizer."""

    name: str
    family: str
    reference: str
    times_ms: list[float]
    ratios: list[float]
    state_bytes: int
    param_bytes: int
    reference_state_bytes: int
    time_goal: float | None
    state_goal: float | None
    multiplier: tuple[float, float] | None = None
    #: The time goal is relative to this (non-reference) row, e.g. the same optimizer's foreach path.
    goal_vs: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        return quantile(self.times_ms, 0.75) - quantile(self.times_ms, 0.25)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def state_ratio(self) -> float:
        return self.state_bytes / self.param_bytes

    @property
    def goal(self) -> str:
        parts = []
        if self.time_goal is not None:
            parts.append(f"≤{self.time_goal:.2f}×" + (f" {self.goal_vs}" if self.goal_vs else ""))
        if self.state_goal is not None:
            base = "Adam" if self.family == "adam" else "SGD"
            parts.append(f"state={base}" + (f"+{self.state_goal:g}" if self.state_goal else ""))
        return ", ".join(parts)

    @property
    def time_ok(self) -> bool | None:
        return None if self.time_goal is None else self.ratio <= self.time_goal

    @property
    def state_ok(self) -> bool | None:
        if self.state_goal is None:
            return None
        expected = self.reference_state_bytes + self.state_goal * self.param_bytes
        return abs(self.state_bytes - expected) <= STATE_RTOL * expected

    @property
    def passed(self) -> bool | None:
        checks = [c for c in (self.time_ok, self.state_ok) if c is not None]
        return all(checks) if checks else None


@dataclass
class BenchResult:
    """Every row plus the conditions of the run."""

    rows: list[Row]
    device: str
    device_name: str
    torch_version: str
    threads: int
    params: int
    tensors: int
    repeats: int
    warmup: int
    skipped: dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


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


# --------------------------------------------------------------------------------------------
# Reporting


def header(result: BenchResult) -> str:
    return (
        f"device: {result.device} ({result.device_name}) | torch {result.torch_version} | "
        f"threads: {result.threads} | params: {result.params:,} in {result.tensors} tensors | "
        f"rounds: {result.repeats} (+{result.warmup} warm-up)"
    )


COLUMNS = [
    "optimizer", "median ms", "IQR ms", "ratio", "vs", "state/param", "goal", "pass",
]  # fmt: skip


def table_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        out.append(
            [
                r.name,
                f"{r.median_ms:.3f}",
                f"{r.iqr_ms:.3f}",
                f"{r.ratio:.3f}",
                "(reference)" if r.name == r.reference else r.reference,
                f"{r.state_ratio:.4f}",
                r.goal or "—",
                verdict(r.passed),
            ]
        )
    return out


def format_markdown(result: BenchResult) -> str:
    """The header line and the markdown table (plus any skipped rows)."""
    lines = [header(result), "", *markdown_table(COLUMNS, "lrrrlrll", table_rows(result))]
    lines.append("")
    lines.append(
        "ratio: median over rounds of t/t(reference) in the same round; state/param: bytes of "
        "optimizer state / bytes of parameters."
    )
    for name, why in result.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines) + "\n"


def write_csv(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """One line per optimizer, unrounded, with the run's conditions on every line."""
    fields = [
        "optimizer", "median_ms", "iqr_ms", "ratio", "reference", "state_bytes", "param_bytes",
        "state_ratio", "goal", "pass", "multiplier_min", "multiplier_max", "device",
        "device_name", "torch", "threads", "params", "tensors", "repeats", "warmup",
    ]  # fmt: skip
    rows = []
    for r in result.rows:
        lo, hi = r.multiplier if r.multiplier is not None else ("", "")
        rows.append(
            [
                r.name,
                r.median_ms,
                r.iqr_ms,
                r.ratio,
                r.reference,
                r.state_bytes,
                r.param_bytes,
                r.state_ratio,
                r.goal,
                verdict(r.passed),
                lo,
                hi,
                result.device,
                result.device_name,
                result.torch_version,
                result.threads,
                result.params,
                result.tensors,
                result.repeats,
                result.warmup,
            ]
        )
    write_rows_csv(path, fields, rows)


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
