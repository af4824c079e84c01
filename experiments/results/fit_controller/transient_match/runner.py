"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/transient_match/runner.py
python experiments/results/fit_controller/transient_match/runner.py --table
"""

from __future__ import annotations

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
TASKS = "digits_logreg,digits_mlp,fewshot_sinusoid,mnist1d_mlp,charlm_gru,animal_cnn"


def load() -> dict:
    return dev_grid.load(RUNS)


def spec(mode: str, validation: bool) -> dict:
    """protocol.md's second part runs each mode with the recommended validation option."""
    return dev_grid.patched_spec(MODES[mode] is not None, validation)


def patch(name: str) -> None:
    transientpatch.DECAY = MODES[name.removesuffix("+val")]


def main(argv=None) -> None:
    ap = dev_grid.grid_parser(TASKS, ",".join(MODES))
    ap.add_argument("--validation", action="store_true", help="with the recommended option")
    a = ap.parse_args(argv)
    if a.table:
        return table()
    suffix = "+val" if a.validation else ""
    specs = {m + suffix: spec(m, a.validation) for m in a.modes.split(",")}
    dev_grid.run_args(RUNS, specs, a, load(), before_run=patch)


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
