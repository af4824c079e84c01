"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/transient_match/runner.py
python experiments/results/fit_controller/transient_match/runner.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
sys.path.insert(0, str(HERE))
import dev_grid
import transientpatch

RUNS = HERE / "runs.jsonl"
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"
MODES = {"default": None, "transient10": 0.9, "transient50": 0.98}
# protocol.md's second part: the same with the recommended validation option (issue 11)
VALIDATION = {"validation_data": {"every": 20}, "validation": {"ray_steps": "budget"}}
TASKS = "digits_logreg,digits_mlp,fewshot_sinusoid,mnist1d_mlp,charlm_gru,animal_cnn"


def load() -> dict:
    return dev_grid.load(RUNS)


def spec(mode: str, validation: bool) -> dict:
    """The run's spec: the library's own restart off where the patch does it."""
    s = {"kind": "adam_hd", **(VALIDATION if validation else {})}
    if MODES[mode] is not None:
        s["seek"] = {"moment_restart": 0}
    return s


def patch(name: str) -> None:
    transientpatch.DECAY = MODES[name.removesuffix("+val")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--validation", action="store_true", help="with the recommended option")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.table:
        return table()
    suffix = "+val" if a.validation else ""
    specs = {m + suffix: spec(m, a.validation) for m in a.modes.split(",")}
    dev_grid.run_grid(RUNS, specs, a.tasks.split(","), [float(x) for x in a.lrs.split(",")],
                      [int(s) for s in a.seeds.split(",")], load(), before_run=patch)  # fmt: skip


def table() -> None:
    ref = json.loads(REF.read_text())
    done = load()
    cells: dict = {}
    for (task, mode, lr, seed), r in done.items():
        cells.setdefault((task, lr), {}).setdefault(mode, {})[seed] = r["final"]
    logs: dict = {}
    names = [m for m in [*MODES, *(f"{m}+val" for m in MODES)]
             if any(m in modes for modes in cells.values())]  # fmt: skip
    print("| task | lr0 | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for task, lr in sorted(cells):
        modes = cells[(task, lr)]
        row = []
        for m in names:
            vals = list(modes.get(m, {}).values())
            if len(vals) < 3:
                row.append("–")
                continue
            ratio = statistics.mean(vals) / ref[task]
            logs.setdefault(m, []).append(math.log(ratio))
            row.append(f"{ratio:.3f}")
        print(f"| {task} | {lr:g} | " + " | ".join(row) + " |")
    for m, v in logs.items():
        print(f"{m}: {len(v)} cells, mean log-ratio {statistics.mean(v):+.4f}, "
              f"within 10%: {sum(x <= math.log(1.1) for x in v)}")  # fmt: skip


if __name__ == "__main__":
    main()
