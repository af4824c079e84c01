"""The long-horizon signal (``seek={"horizon": μ}``) on study 1's held-out tasks.

Runs AdamHD with the horizon on the three held-out tasks (pysrc_transformer, animal_autoencoder,
diabetes_mlp) × study 1's five initial rates × its seeds 0, 1, 2, and scores every cell's final
validation loss (mean over seeds) against best-of-grid Adam from study 1's own records (same
tasks, budgets, seeds and code for Adam), beside AdamHD at its defaults from the same records.
The held-out tasks decide nothing: the protocol is ``experiments/results/horizon/protocol.md``.
Every finished run is appended to ``runs.jsonl`` (a stop loses nothing; a rerun skips them).

    python experiments/horizon_heldout.py --horizon 0.95             # ~15 min on 2 cores
    python experiments/horizon_heldout.py --horizon 0.95 --smoke     # CI: tiny sizes, 5 steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fit_controller, one_run_goals
from one_run_goals import WITHIN
from study_budgets import budgets

from metalr.workbench.report_stats import latest_records

ROOT = Path(__file__).resolve().parents[1]
STUDY1 = ROOT / "experiments/results/ablate_study1/records.jsonl"
TASKS = budgets(("pysrc_transformer", "animal_autoencoder", "diabetes_mlp"))
LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SEEDS = (0, 1, 2)


def _run(job: tuple[str, dict[str, Any], float, int, int, str]) -> dict[str, Any]:
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    task, spec, lr, seed, steps, size = job
    r = run(task, spec, lr, steps, size, seed)
    final = r["final_val_loss"] if r["status"] == "ok" else math.inf
    return {"task": task, "lr": lr, "seed": seed, "spec": spec, "size": size, "final": final,
            "best": r["best_val_loss"]}  # fmt: skip


def study1_reference(path: Path = STUDY1) -> tuple[dict, dict]:
    """Best-of-grid Adam's final validation loss per task and AdamHD's (defaults) per
    (task, lr0), each the mean over seeds 0-2, from study 1's records (a cell rerun under later
    defaults appends: the newest record of each seed counts, as in the study's report)."""
    runs: dict[tuple[str, str, float], list[float]] = {}
    for r in latest_records(json.loads(line) for line in path.read_text().splitlines()):
        if r["task"] in TASKS and r["optimizer"] in ("adam", "adam_hd") and r["seed"] in SEEDS:
            final = r["final_val_loss"] if r["status"] == "ok" else math.inf
            runs.setdefault((r["task"], r["optimizer"], r["lr"]), []).append(final)
    adam = {t: min(statistics.mean(runs[(t, "adam", lr)]) for lr in LRS) for t in TASKS}
    hd = {(t, lr): statistics.mean(runs[(t, "adam_hd", lr)]) for t in TASKS for lr in LRS}
    return adam, hd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=float, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="smoke-size tasks, 5 steps")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/horizon"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "adam_hd", "seek": {"horizon": args.horizon}}
    size = "smoke" if args.smoke else "full"
    log = out / ("runs_smoke.jsonl" if args.smoke else "runs.jsonl")
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["lr"], r["seed"], json.dumps(r["spec"]), r["size"])] = r
    jobs = [(t, spec, lr, s, 5 if args.smoke else steps, size)
            for t, steps in TASKS.items() for lr in LRS for s in SEEDS
            if (t, lr, s, json.dumps(spec), size) not in done]  # fmt: skip
    with ProcessPoolExecutor(args.workers) as pool, log.open("a") as sink:
        for r in pool.map(_run, jobs):
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            done[(r["task"], r["lr"], r["seed"], json.dumps(r["spec"]), r["size"])] = r
    mine = {(t, lr): statistics.mean(done[(t, lr, s, json.dumps(spec), size)]["final"]
                                     for s in SEEDS) for t in TASKS for lr in LRS}  # fmt: skip
    if args.smoke:
        print(f"smoke: {len(mine)} cells, all finite: {all(map(math.isfinite, mine.values()))}")
        return
    adam, hd = study1_reference()
    ratio = {k: v / adam[k[0]] for k, v in mine.items()}
    base = {k: v / adam[k[0]] for k, v in hd.items()}
    within = sum(r <= 1 + WITHIN for r in ratio.values())
    within_base = sum(r <= 1 + WITHIN for r in base.values())
    head = (
        f"Held-out tasks, seeds 0-2, final validation loss ÷ best-of-grid Adam (study 1's "
        f"records): horizon {args.horizon} within 10% on {within}/{len(ratio)} cells, "
        f"defaults {within_base}/{len(base)}."
    )
    lines = [head, "", "| task | " + " | ".join(f"lr0 {lr:g}" for lr in LRS) + " |",
             "|---|" + "---:|" * len(LRS)]  # fmt: skip
    for t in TASKS:
        cells = [f"{ratio[(t, lr)]:.2f} ({base[(t, lr)]:.2f})" for lr in LRS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each cell: with the horizon (AdamHD at its defaults in brackets).")
    text = "\n".join(lines)
    (out / f"heldout_horizon_{args.horizon:g}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
