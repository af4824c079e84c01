"""The meta-learner benchmark's result records and their markdown and CSV output.

:class:`Row` (one backend at one inner-step count) and :class:`MetaBenchResult` (a whole run, with
its conditions), then the header, table, ratio summary and CSV that :mod:`metalr.meta.benchmark`
prints and writes.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field

from metalr._benchtools import markdown_table, quantile, verdict
from metalr._benchtools import write_csv as write_rows_csv
from metalr.meta.bench_backends import GOAL_ROW, GOAL_SPEEDUP, L2L, VMAP


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
