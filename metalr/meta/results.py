"""Run outputs of ``metalr meta-train`` / ``few-shot-eval``: atomic files, provenance, statistics.

Every file a run writes goes through :func:`atomic_save` / :func:`atomic_write_json` (a temporary
file in the same folder, then ``os.replace``), so an interrupted run never leaves a torn
checkpoint behind: the previous one stays in place until the new one is complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "metalr.run-checkpoint/1"
RESULTS_FORMAT = "metalr.run-results/1"


def _atomic(path: str | Path, write: Callable[[Any], None], mode: str) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then ``os.replace`` it there.

    The temporary file is opened with mode ``0o666`` filtered by the process umask (``0o644``
    under umask ``022``), as ``open(path, "w")`` would create it, not ``tempfile``'s ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    return _atomic(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf as ``null``) through ``os.replace``."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False) + "\n"
    return _atomic(path, lambda f: f.write(text), "w")


def json_safe(obj: Any) -> Any:
    """Nested dicts/lists with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by the runner (``weights_only``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many kinds
        raise ValueError(f"{path} is not a readable metalr run checkpoint ({exc!r:.200})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a metalr run checkpoint")
    return ckpt


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of the resolved config as canonical JSON (sorted keys)."""
    blob = json.dumps(json_safe(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(config: dict[str, Any], config_file: str | Path | None = None) -> dict[str, Any]:
    """Where a number came from: config and hashes, code version, software, machine."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, Any] = {
        "config": config,
        "config_sha256": config_sha256(config),
        "config_file": str(config_file) if config_file is not None else None,
        "config_file_sha256": None,
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "metalr_version": _version("metalr"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if config_file is not None and Path(config_file).is_file():
        info["config_file_sha256"] = hashlib.sha256(Path(config_file).read_bytes()).hexdigest()
    return info


class MeanCI:
    """Mean and 95% CI half-width (``1.96 · s / √n``) pooled from chunks of tasks.

    ``MetaLearner.evaluate`` reports each chunk's mean and half-width; with the chunk size this
    recovers the chunk's sample variance, and the pooled sums give the exact mean and standard
    deviation over all tasks (the same numbers as one call over every task).
    """

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.parts: list[tuple[int, float, float]] = []

    def add(self, n: int, mean: float, ci95: float) -> None:
        var = (ci95 * math.sqrt(n) / 1.96) ** 2 if n > 1 else 0.0
        self.parts.append((n, mean, var))
        self.n += n
        self.total += n * mean

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def ci95(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        ss = sum((n - 1) * v + n * (mu - m) ** 2 for n, mu, v in self.parts)
        return 1.96 * math.sqrt(ss / (self.n - 1)) / math.sqrt(self.n)


def pool_chunks(chunks: Iterable[dict[str, float]]) -> dict[str, float]:
    """Pool ``MetaLearner.evaluate`` outputs of several chunks into one (mean and CI per metric)."""
    stats: dict[str, MeanCI] = {}
    for out in chunks:
        n = int(out["num_tasks"])
        for key, value in out.items():
            if key != "num_tasks" and not key.endswith("_ci95"):
                stats.setdefault(key, MeanCI()).add(n, value, out.get(f"{key}_ci95", math.nan))
    result: dict[str, float] = {}
    for key, s in stats.items():
        result[key], result[f"{key}_ci95"] = s.mean, s.ci95
        result["num_tasks"] = s.n
    return result


def fmt_ci(mean: float | None, ci95: float | None, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.482 ± 0.061"`` (``"—"`` when missing)."""
    if mean is None or not math.isfinite(mean):
        return "—"
    if ci95 is None or not math.isfinite(ci95):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {ci95 * scale:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``align`` is one of ``l``/``r`` per column."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *[[str(c) for c in r] for r in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows (dicts with the same keys) as CSV, atomically."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(json_safe(rows))
    text = buf.getvalue()
    return _atomic(path, lambda f: f.write(text), "w")
