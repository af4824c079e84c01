"""Plumbing shared by the meta-learning studies (``meta_sinusoid.py``, ``meta_glyphs.py``): the
command line, one run (meta-train + evaluate + the prior handed to the optimizer, reused when
finished), and the outputs (CSV + markdown)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from metalr.meta.evaluation import ensure_prior_eval
from metalr.meta.results import write_csv
from metalr.meta.runner import ensure_run, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RESULTS = ROOT / "experiments" / "results"


def parse_args(description: str, methods: dict[str, str], shots: str,
               argv: list[str] | None) -> tuple[argparse.Namespace, Path, list[str], list[int]]:  # fmt: skip
    """The study's options; returns them with the results folder, methods and shots chosen."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny runs into a temp dir")
    parser.add_argument("--out", type=Path, help="results folder (default: experiments/results)")
    parser.add_argument("--methods", default=",".join(methods), help="comma-separated subset")
    parser.add_argument("--shots", default=shots, help="comma-separated subset")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log validation lines")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stem = Path(parser.prog).stem
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"{stem}_")) if args.smoke else RESULTS)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(methods)}")
    return args, out, chosen, [int(k) for k in args.shots.split(",") if k]


def run(config_file: Path, overrides: list[str], runs_dir: Path,
        args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Meta-train and evaluate one configuration (reused when finished with the same config);
    returns its config, results and the evaluation of its prior inside the drop-in optimizer."""
    cfg = load_config(config_file, overrides, smoke=args.smoke)
    folder = runs_dir / cfg.name
    res = ensure_run(cfg, folder, config_file=config_file, quiet=not args.verbose,
                     keep_checkpoint=args.keep_checkpoints)  # fmt: skip
    return cfg, res, ensure_prior_eval(cfg, folder)


def run_fields(res: dict[str, Any]) -> dict[str, Any]:
    """The last columns of every study row: compute time, seed and config hash of the run."""
    return {"train_seconds": round(res["train"]["seconds"], 1),
            "eval_seconds": round(res["eval_seconds"], 1), "seed": res["seed"],
            "config_sha256": res["provenance"]["config_sha256"]}  # fmt: skip


def write_outputs(rows: list[dict[str, Any]], out: Path, stem: str, text: str,
                  elapsed: float) -> None:  # fmt: skip
    """``<out>/<stem>.csv`` and ``<out>/<stem>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{stem}.csv")
    (out / f"{stem}.md").write_text(text)
    print(f"wrote {out / f'{stem}.md'} and .csv ({elapsed:.0f} s)")
