"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/tracked_match/runner.py [--validation] [--tasks ...]
python experiments/results/fit_controller/tracked_match/runner.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
sys.path.insert(0, str(HERE))
import dev_grid
import trackedpatch

RUNS = HERE / "runs.jsonl"
BASELINE = HERE.parent / "transient_match" / "runs.jsonl"  # default, default+val rows (reused)
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"
MODES = {"default": None, "tracked0": 0, "tracked50": 50}
VALIDATION = {"validation_data": {"every": 20}, "validation": {"ray_steps": "budget"}}
TASKS = "digits_logreg,digits_mlp,fewshot_sinusoid,mnist1d_mlp,charlm_gru,animal_cnn"


def spec(mode: str, validation: bool) -> dict:
    """The run's spec: the library's own restart off where the patch does it."""
    s = {"kind": "adam_hd", **(VALIDATION if validation else {})}
    if MODES[mode] is not None:
        s["seek"] = {"moment_restart": 0}
    return s


def patch(name: str) -> None:
    trackedpatch.WINDOW = MODES[name.removesuffix("+val")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--modes", default="tracked50")
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--validation", action="store_true", help="with the recommended option")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    done = dev_grid.load(RUNS, BASELINE, {"default", "default+val"})
    if a.table:
        pairs = {"tracked50": "default", "tracked50+val": "default+val"}
        return dev_grid.table(done, json.loads(REF.read_text()), pairs)
    suffix = "+val" if a.validation else ""
    specs = {m + suffix: spec(m, a.validation) for m in a.modes.split(",")}
    dev_grid.run_grid(RUNS, specs, a.tasks.split(","), [float(x) for x in a.lrs.split(",")],
                      [int(s) for s in a.seeds.split(",")], done, before_run=patch)  # fmt: skip


if __name__ == "__main__":
    main()
