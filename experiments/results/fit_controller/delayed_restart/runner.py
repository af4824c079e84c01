"""Development runner for ``restartpatch3.py``: one worker, serial, every run appended to
``runs.jsonl`` here (a rerun skips finished runs). Development seeds only (>= 100).

    python experiments/results/fit_controller/delayed_restart/runner.py \
        --tasks animal_cnn --modes default,matched,delayed --lrs 1e-3 --seeds 100,101,102
    python .../runner.py --table        # dev tables from runs.jsonl (÷ cached best-of-grid Adam)

Each run is ``fit_controller.run(task, {"kind": "adam_hd"}, lr0, study 1's budget, "full", seed)``
with ``restartpatch3.MODE`` set to the mode ("default" = no patch), torch at one thread, i.e.
``check_controller.py``'s cell. ``--log`` also writes the controller's turn/re-open events.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
sys.path.insert(0, str(HERE))
import restartpatch3
from study_budgets import budgets

RUNS = HERE / "runs.jsonl"
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"


def load() -> dict:
    done = {}
    if RUNS.is_file():
        for line in RUNS.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["mode"], r["lr"], r["seed"])] = r
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="animal_cnn")
    ap.add_argument("--modes", default="default,matched,delayed")
    ap.add_argument("--lrs", default="1e-3")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--log", action="store_true", help="write controller events to events/")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.table:
        return table()
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    assert min(seeds) >= 100, "development seeds only"
    tasks = budgets(a.tasks.split(","))
    done = load()
    for task, steps in tasks.items():
        for lr in (float(x) for x in a.lrs.split(",")):
            for mode in a.modes.split(","):
                for seed in seeds:
                    if (task, mode, lr, seed) in done and not a.log:
                        continue
                    restartpatch3.MODE = "" if mode == "default" else mode
                    if a.log:
                        (HERE / "events").mkdir(exist_ok=True)
                        log = HERE / "events" / f"{task}_{mode}_{lr:g}_{seed}.jsonl"
                        log.unlink(missing_ok=True)
                        restartpatch3.LOG = str(log)
                    else:
                        restartpatch3.LOG = ""
                    t0 = time.time()
                    r = run(task, {"kind": "adam_hd"}, lr, steps, "full", seed)
                    final = r["final_val_loss"] if r["status"] == "ok" else math.inf
                    rec = {
                        "task": task,
                        "mode": mode,
                        "lr": lr,
                        "seed": seed,
                        "steps": steps,
                        "final": final,
                        "best": r["best_val_loss"],
                        "status": r["status"],
                        "secs": round(time.time() - t0, 1),
                    }
                    if a.log:  # the logged curves beside the events
                        c = r["curves"]
                        (HERE / "events" / f"{task}_{mode}_{lr:g}_{seed}.curve.json").write_text(
                            json.dumps(
                                {k: c[k] for k in ("step", "train_loss", "val_loss", "lr_mean")}
                            )
                        )
                    if (task, mode, lr, seed) not in done:
                        with RUNS.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        done[(task, mode, lr, seed)] = rec
                    print(json.dumps(rec), flush=True)


def table() -> None:
    ref = json.loads(REF.read_text())
    done = load()
    cells: dict = {}
    for (task, mode, lr, seed), r in done.items():
        cells.setdefault((task, lr), {}).setdefault(mode, {})[seed] = r["final"]
    order = ["default", "matched", "plain", "delayed", "delayed_plain", "scale", "delayed_scale"]
    for task, lr in sorted(cells):
        modes = cells[(task, lr)]
        seeds = sorted(set.intersection(*(set(v) for v in modes.values())))
        print(f"\n### {task}, lr0 {lr:g} (seeds {seeds}; Adam best-of-grid {ref[task]:.4f})")
        print("| variant | per-seed final val | mean | ÷ Adam |")
        print("|---|---|---:|---:|")
        for m in sorted(modes, key=lambda m: order.index(m) if m in order else 99):
            vals = [modes[m][s] for s in seeds]
            mean = statistics.mean(vals)
            print(
                f"| {m} | {', '.join(f'{v:.4f}' for v in vals)} | {mean:.4f} | "
                f"{mean / ref[task]:.3f} |"
            )


if __name__ == "__main__":
    main()
