"""The step benchmark's result records and their Markdown and CSV output.

:class:`Row` (one optimizer: times, paired ratios, state bytes and its goals) and
:class:`BenchResult` (every row plus the run's conditions), then the header, table and CSV that
:mod:`metalr.bench` prints and writes.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

from metalr._benchtools import markdown_table, quantile, verdict
from metalr._benchtools import write_csv as write_rows_csv
from metalr.functional._controller import CONTROLLER_SIZE
from metalr.functional._validation_state import VALIDATION_SIZE

#: What the "state equals the reference's (+ k parameter-sized buffers)" goal allows on top, per
#: parameter tensor: one float32 rate, one seek controller vector (``CONTROLLER_SIZE`` float32)
#: and the validation statistics (``VALIDATION_SIZE`` float32, created at the first step so that
#: every checkpoint format has their slot) — state that grows with the number of tensors, never
#: with their size.
PER_TENSOR_STATE_BYTES = (1 + CONTROLLER_SIZE + VALIDATION_SIZE) * 4


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
    #: Parameter tensors stepped (the per-tensor allowance of the state goal).
    tensors: int = 0

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
        extra = self.state_bytes - expected
        return 0 <= extra <= self.tensors * PER_TENSOR_STATE_BYTES

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
