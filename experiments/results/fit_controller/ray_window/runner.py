"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/ray_window/runner.py [--modes ...]
python experiments/results/fit_controller/ray_window/runner.py --table
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
from study_budgets import budgets

RUNS = HERE / "runs.jsonl"
BASELINE = HERE.parent / "transient_match" / "runs.jsonl"  # default+val rows (reused)
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"
MODES = {
    "default+val": {},
    "before20+val": {"ray_before": 0.2},
    "before30+val": {"ray_before": 0.3},
}
TASKS = "digits_mlp,mnist1d_mlp,digits_logreg,fewshot_sinusoid,animal_cnn"


def load() -> dict:
    done = {}
    for path in (BASELINE, RUNS):
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if path == RUNS or r["mode"] == "default+val":
                    done[(r["task"], r["mode"], r["lr"], r["seed"])] = r
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
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
                    if (task, mode, lr, seed) in done:
                        continue
                    spec = {"kind": "adam_hd", "validation_data": {"every": 20},
                            "validation": {"ray_steps": "budget", **MODES[mode]}}  # fmt: skip
                    t0 = time.time()
                    r = run(task, spec, lr, steps, "full", seed)
                    final = r["final_val_loss"] if r["status"] == "ok" else math.inf
                    rec = {"task": task, "mode": mode, "lr": lr, "seed": seed, "steps": steps,
                           "final": final, "best": r["best_val_loss"], "status": r["status"],
                           "secs": round(time.time() - t0, 1)}  # fmt: skip
                    with RUNS.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[(task, mode, lr, seed)] = rec
                    print(json.dumps(rec), flush=True)


def table() -> None:
    ref = json.loads(REF.read_text())
    cells: dict = {}
    for (task, mode, lr, seed), r in load().items():
        cells.setdefault((task, lr), {}).setdefault(mode, {})[seed] = r["final"]
    logs: dict = {}
    print("| task | lr0 | " + " | ".join(MODES) + " |")
    print("|---|---|" + "---:|" * len(MODES))
    for task, lr in sorted(cells):
        row = []
        for m in MODES:
            vals = list(cells[(task, lr)].get(m, {}).values())
            if len(vals) < 3:
                row.append("–")
                continue
            ratio = statistics.mean(vals) / ref[task]
            logs.setdefault(m, {})[(task, lr)] = math.log(ratio)
            row.append(f"{ratio:.3f}")
        print(f"| {task} | {lr:g} | " + " | ".join(row) + " |")
    base = logs.get("default+val", {})
    for m in list(MODES)[1:]:
        keys = [k for k in logs.get(m, {}) if k in base]
        if not keys:
            continue
        mean_m = statistics.mean(logs[m][k] for k in keys)
        mean_b = statistics.mean(base[k] for k in keys)
        within = sum(logs[m][k] <= math.log(1.1) for k in keys)
        within_b = sum(base[k] <= math.log(1.1) for k in keys)
        print(f"{m}: {len(keys)} cells, mean log-ratio {mean_m:+.4f} vs {mean_b:+.4f}, "
              f"within 10%: {within} vs {within_b}")  # fmt: skip
        for task in sorted({k[0] for k in keys}):
            d = [logs[m][k] - base[k] for k in keys if k[0] == task]
            print(f"   {task}: {math.exp(statistics.mean(d)):.3f}x")


if __name__ == "__main__":
    main()
