"""A development grid for controller probes (``experiments/results/fit_controller/*/runner.py``).

Each run is one (task, mode, lr0, seed) cell at study 1's budget, appended to a JSONL file as it
finishes (a stopped grid resumes); the table scores each cell's seed-mean final validation loss
against best-of-grid Adam on the same seeds and pairs each mode with its base mode::

    done = load(RUNS, reused=OLD_RUNS, reused_modes={"default+val"})
    run_grid(RUNS, {"default+val": spec, "wider+val": other}, TASKS, LRS, SEEDS, done)
    table(done, json.loads(REF.read_text()), {"wider+val": "default+val"})

Development seeds only (≥ 100): checks on unused seeds go through ``check_controller.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from study_budgets import budgets

Key = tuple[str, str, float, int]  # (task, mode, lr0, seed)

#: Issue 11's recommended validation option as a workbench spec's keys (a validation minibatch
#: every 20 steps, the ray ceiling at its defaults over the run's budget).
RECOMMENDED = {"validation_data": {"every": 20}, "validation": {"ray_steps": "budget"}}


def patched_spec(patched: bool, validation: bool) -> dict[str, Any]:
    """AdamHD's spec for a probe whose patch does the moment restart: the library's own restart
    off where the patch does it (``patched``), with the recommended option if ``validation``."""
    s: dict[str, Any] = {"kind": "adam_hd", **(RECOMMENDED if validation else {})}
    if patched:
        s["seek"] = {"moment_restart": 0}
    return s


def grid_parser(tasks: str, modes: str) -> argparse.ArgumentParser:
    """A probe runner's command line: the grid (``--tasks``, ``--modes``, ``--lrs``, ``--seeds``,
    comma-separated) and ``--table``; :func:`run_args` runs what it parsed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=tasks)
    ap.add_argument("--modes", default=modes)
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--table", action="store_true")
    return ap


def run_args(
    runs: Path, specs: Mapping[str, dict[str, Any]], args: argparse.Namespace,
    done: dict[Key, dict], before_run: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """:func:`run_grid` over the tasks, rates and seeds :func:`grid_parser` parsed."""
    run_grid(runs, specs, args.tasks.split(","), [float(x) for x in args.lrs.split(",")],
             [int(s) for s in args.seeds.split(",")], done, before_run=before_run)  # fmt: skip


def load(
    runs: Path, reused: Path | None = None, reused_modes: Iterable[str] = ()
) -> dict[Key, dict]:
    """The runs done so far: ``runs``' records, and ``reused``'s records of ``reused_modes``."""
    keep = set(reused_modes)
    done: dict[Key, dict] = {}
    for path, wanted in ((reused, keep), (runs, None)):
        if path is None or not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if wanted is None or r["mode"] in wanted:
                done[(r["task"], r["mode"], r["lr"], r["seed"])] = r
    return done


def run_grid(
    runs: Path, specs: Mapping[str, dict[str, Any]], tasks: Iterable[str], lrs: Iterable[float],
    seeds: Iterable[int], done: dict[Key, dict],
    before_run: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Run every (task, lr0, mode, seed) cell not in ``done`` (``before_run(mode)`` first: a
    probe's patch), one thread, appending each record to ``runs``."""
    import torch
    from fit_controller import run

    torch.set_num_threads(1)
    seeds = list(seeds)
    assert min(seeds) >= 100, "development seeds only"
    for task, steps in budgets(list(tasks)).items():
        for lr in lrs:
            for mode, spec in specs.items():
                for seed in seeds:
                    if (task, mode, lr, seed) in done:
                        continue
                    if before_run is not None:
                        before_run(mode)
                    t0 = time.time()
                    r = run(task, spec, lr, steps, "full", seed)
                    final = r["final_val_loss"] if r["status"] == "ok" else math.inf
                    rec = {"task": task, "mode": mode, "lr": lr, "seed": seed, "steps": steps,
                           "final": final, "best": r["best_val_loss"], "status": r["status"],
                           "secs": round(time.time() - t0, 1)}  # fmt: skip
                    with runs.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[(task, mode, lr, seed)] = rec
                    print(json.dumps(rec), flush=True)


def table(done: Mapping[Key, dict], ref: Mapping[str, float], pairs: Mapping[str, str],
          seeds: int = 3) -> None:  # fmt: skip
    """Print the cells' ratios to ``ref`` (best-of-grid Adam per task) for every mode of
    ``pairs`` (mode → its base), then each pair's mean log-ratio over their common cells, the
    cells within 10% and each task's geometric-mean ratio mode ÷ base."""
    cells: dict = {}
    for (task, mode, lr, seed), r in done.items():
        cells.setdefault((task, lr), {}).setdefault(mode, {})[seed] = r["final"]
    names = list(dict.fromkeys(m for pair in pairs.items() for m in reversed(pair)))
    logs: dict = {}
    print("| task | lr0 | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for task, lr in sorted(cells):
        row = []
        for m in names:
            vals = list(cells[(task, lr)].get(m, {}).values())
            if len(vals) < seeds:
                row.append("–")
                continue
            ratio = statistics.mean(vals) / ref[task]
            logs.setdefault(m, {})[(task, lr)] = math.log(ratio)
            row.append(f"{ratio:.3f}")
        print(f"| {task} | {lr:g} | " + " | ".join(row) + " |")
    for m, base in pairs.items():
        keys = [k for k in logs.get(m, {}) if k in logs.get(base, {})]
        if not keys:
            continue
        mean_m = statistics.mean(logs[m][k] for k in keys)
        mean_b = statistics.mean(logs[base][k] for k in keys)
        d = statistics.mean(logs[m][k] - logs[base][k] for k in keys)
        within = sum(logs[m][k] <= math.log(1.1) for k in keys)
        within_b = sum(logs[base][k] <= math.log(1.1) for k in keys)
        print(f"{m} vs {base}: {len(keys)} cells, mean log-ratio {mean_m:+.4f} vs {mean_b:+.4f} "
              f"(paired {d:+.4f}), within 10%: {within} vs {within_b}")  # fmt: skip
        for task in sorted({k[0] for k in keys}):
            td = [logs[m][k] - logs[base][k] for k in keys if k[0] == task]
            print(f"   {task}: {math.exp(statistics.mean(td)):.3f}x")
