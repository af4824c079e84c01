"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/tracked_match/runner.py [--validation] [--tasks ...]
python experiments/results/fit_controller/tracked_match/runner.py --table
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
import trackedpatch
from study_budgets import budgets

RUNS = HERE / "runs.jsonl"
BASELINE = HERE.parent / "transient_match" / "runs.jsonl"  # default, default+val rows (reused)
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"
MODES = {"default": None, "tracked0": 0, "tracked50": 50}
VALIDATION = {"validation_data": {"every": 20}, "validation": {"ray_steps": "budget"}}
TASKS = "digits_logreg,digits_mlp,fewshot_sinusoid,mnist1d_mlp,charlm_gru,animal_cnn"


def load() -> dict:
    done = {}
    for path in (BASELINE, RUNS):
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if path == RUNS or r["mode"] in ("default", "default+val"):
                    done[(r["task"], r["mode"], r["lr"], r["seed"])] = r
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--modes", default="tracked50")
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--validation", action="store_true", help="with the recommended option")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.table:
        return table()
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    assert min(seeds) >= 100, "development seeds only"
    done = load()
    for task, steps in budgets(a.tasks.split(",")).items():
        for lr in (float(x) for x in a.lrs.split(",")):
            for mode in a.modes.split(","):
                for seed in seeds:
                    name = mode + ("+val" if a.validation else "")
                    if (task, name, lr, seed) in done:
                        continue
                    trackedpatch.WINDOW = MODES[mode]
                    spec = {"kind": "adam_hd", **(VALIDATION if a.validation else {})}
                    if MODES[mode] is not None:
                        spec["seek"] = {"moment_restart": 0}
                    t0 = time.time()
                    r = run(task, spec, lr, steps, "full", seed)
                    final = r["final_val_loss"] if r["status"] == "ok" else math.inf
                    rec = {"task": task, "mode": name, "lr": lr, "seed": seed, "steps": steps,
                           "final": final, "best": r["best_val_loss"], "status": r["status"],
                           "secs": round(time.time() - t0, 1)}  # fmt: skip
                    with RUNS.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[(task, name, lr, seed)] = rec
                    print(json.dumps(rec), flush=True)


def table() -> None:
    ref = json.loads(REF.read_text())
    cells: dict = {}
    for (task, mode, lr, seed), r in load().items():
        cells.setdefault((task, lr), {}).setdefault(mode, {})[seed] = r["final"]
    names = ["default", "tracked50", "default+val", "tracked50+val"]
    logs: dict = {}
    print("| task | lr0 | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for task, lr in sorted(cells):
        row = []
        for m in names:
            vals = list(cells[(task, lr)].get(m, {}).values())
            if len(vals) < 3:
                row.append("–")
                continue
            ratio = statistics.mean(vals) / ref[task]
            logs.setdefault(m, {})[(task, lr)] = math.log(ratio)
            row.append(f"{ratio:.3f}")
        print(f"| {task} | {lr:g} | " + " | ".join(row) + " |")
    for base, m in (("default", "tracked50"), ("default+val", "tracked50+val")):
        if m not in logs:
            continue
        keys = [k for k in logs[m] if k in logs.get(base, {})]
        d = [logs[m][k] - logs[base][k] for k in keys]
        print(
            f"{m} vs {base}: {len(keys)} cells, mean log-ratio {statistics.mean(logs[m][k] for k in keys):+.4f}"
            f" vs {statistics.mean(logs[base][k] for k in keys):+.4f} (paired {statistics.mean(d):+.4f}),"
            f" within 10%: {sum(logs[m][k] <= math.log(1.1) for k in keys)} vs {sum(logs[base][k] <= math.log(1.1) for k in keys)}"
        )
        for task in sorted({k[0] for k in keys}):
            td = [logs[m][k] - logs[base][k] for k in keys if k[0] == task]
            print(f"   {task}: {math.exp(statistics.mean(td)):.3f}x")


if __name__ == "__main__":
    main()
