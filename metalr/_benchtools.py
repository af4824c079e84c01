"""Helpers shared by the benchmark scripts (:mod:`metalr.bench`, :mod:`metalr.meta.benchmark`):
robust statistics over timing rounds and the markdown / CSV output of a result table."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``q`` in [0, 1]; NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def verdict(ok: bool | None) -> str:
    """A goal column's cell: ``pass``, ``FAIL`` or ``—`` (no goal)."""
    return "—" if ok is None else ("pass" if ok else "FAIL")


def markdown_table(columns: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines; ``align`` has one letter per column: ``l`` left, ``r`` right."""
    if len(align) != len(columns):
        raise ValueError(f"align has {len(align)} letters for {len(columns)} columns")
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def write_csv(
    path: str | os.PathLike[str], fields: Sequence[str], rows: Iterable[Sequence]
) -> None:
    """A CSV file with a header line and one line per row (values unrounded)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)


def output_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``PATH`` → (``PATH.md``, ``PATH.csv``); a ``.md``/``.csv`` suffix is replaced."""
    p = Path(path)
    if p.suffix in (".md", ".csv"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".md"), p.with_name(p.name + ".csv")


def emit(
    text: str, output: str | os.PathLike[str] | None, write_csv_to: Callable[[Path], None]
) -> None:
    """Print a benchmark's markdown ``text``; with ``output``, also write it to ``output.md`` and
    let ``write_csv_to`` write ``output.csv`` (see :func:`output_paths`)."""
    print(text, end="")
    if output:
        md, csv_path = output_paths(output)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        write_csv_to(csv_path)
        print(f"wrote {md} and {csv_path}")
