"""Choose the constants of the validation signal (``VALIDATION_DEFAULTS``) on the training suite.

Procedure (fixed before it was run):

* **Suite and reference:** those of ``experiments/fit_controller.py`` (study 1's four fast tasks:
  digits_logreg, digits_mlp, mnist1d_mlp at 1000 steps, fewshot_sinusoid at 100; best-of-grid
  Adam per task from its ``reference.json``), started at ``lr0 ∈ {1e-5, 1e-1}``, seed 0. The
  held-out tasks and study 1's two slow tasks are never run here.
* **Validation stream:** one validation minibatch of 128 (the whole split when smaller) every 10
  training steps (the recommended frequency): ``validation_data: {every: 10, batch: 128}``.
* **Objective** (minimised): the mean over cells of
  ``max(0, log(final / ref_final)) + ½ max(0, log(best / ref_best))`` (log-ratios capped at 2).
* **Search:** the full grid ``hypergrad_lr ∈ {0.03, 0.1, 0.3}`` × ``evidence ∈ {0, 0.2, 0.4}``
  × ``train_weight ∈ {0, 1}`` (``signal_decay`` 0.7, ``signal_sq_decay`` 0.95 fixed): 18
  settings × 8 cells. A grid, not a Bayesian search: three constants, and every setting is
  reported.

    python experiments/choose_validation.py            # ~15 CPU-min; writes <out>/grid.jsonl
    python experiments/choose_validation.py --smoke    # seconds

Appends one line per setting to ``<out>/grid.jsonl`` (rerunning skips settings already there)
and writes ``<out>/best.json``; default ``<out>``: ``experiments/results/choose_validation``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_controller import LR0S, ROOT, SUITE, capped_log_ratio, reference, run

GRID = {"hypergrad_lr": (0.03, 0.1, 0.3), "evidence": (0.0, 0.2, 0.4), "train_weight": (0.0, 1.0)}
STREAM = {"every": 10}  # batch: the task's training batch (128 here; fewshot: its 100-point split)


def score(options: dict[str, float], ref: dict, steps: dict[str, int], size: str) -> tuple:
    spec = {"kind": "adam_hd", "validation": options, "validation_data": STREAM}
    cells = []
    for name, n in steps.items():
        for lr in LR0S:
            r = run(name, spec, lr, n, size)
            f = capped_log_ratio(r["final_val_loss"], ref[name]["final"])
            b = capped_log_ratio(r["best_val_loss"], ref[name]["best"])
            cells.append({"task": name, "lr0": lr, "final_ratio": round(math.exp(f), 4),
                          "best_ratio": round(math.exp(b), 4),
                          "test_loss": r["final_test_loss"],
                          "cost": max(f, 0) + 0.5 * max(b, 0)})  # fmt: skip
    return sum(c["cost"] for c in cells) / len(cells), cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments/results/choose_validation"))
    parser.add_argument("--smoke", action="store_true", help="2 settings of 20-step smoke runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = "smoke" if args.smoke else "full"
    steps = {k: 20 for k in SUITE} if args.smoke else dict(SUITE)
    ref_dir = out if args.smoke else ROOT / "experiments/results/fit_controller"
    ref = reference(ref_dir, steps, size)
    log = out / "grid.jsonl"
    done = {json.dumps(json.loads(l)["options"], sort_keys=True): json.loads(l)
            for l in log.read_text().splitlines()} if log.is_file() else {}  # fmt: skip
    settings = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    for options in settings[:2] if args.smoke else settings:
        key = json.dumps(options, sort_keys=True)
        if key in done:
            continue
        tic = time.perf_counter()
        value, cells = score(options, ref, steps, size)
        row = {"options": options, "objective": value, "seconds": time.perf_counter() - tic,
               "cells": cells}  # fmt: skip
        done[key] = row
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key} objective {value:.4f} ({row['seconds']:.0f} s)", flush=True)
    best = min(done.values(), key=lambda r: r["objective"])
    (out / "best.json").write_text(json.dumps({"options": best["options"],
                                               "objective": best["objective"]}, indent=1))  # fmt: skip
    print(json.dumps(best["options"]))


if __name__ == "__main__":
    main()
