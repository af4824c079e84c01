"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/tracked_match/runner.py [--validation] [--tasks ...]
python experiments/results/fit_controller/tracked_match/runner.py --table
"""

from __future__ import annotations

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
TASKS = "digits_logreg,digits_mlp,fewshot_sinusoid,mnist1d_mlp,charlm_gru,animal_cnn"


def spec(mode: str, validation: bool) -> dict:
    return dev_grid.patched_spec(MODES[mode] is not None, validation)


def patch(name: str) -> None:
    trackedpatch.WINDOW = MODES[name.removesuffix("+val")]


def main(argv=None) -> None:
    ap = dev_grid.grid_parser(TASKS, "tracked50")
    ap.add_argument("--validation", action="store_true", help="with the recommended option")
    a = ap.parse_args(argv)
    done = dev_grid.load(RUNS, BASELINE, {"default", "default+val"})
    if a.table:
        pairs = {"tracked50": "default", "tracked50+val": "default+val"}
        return dev_grid.table(done, json.loads(REF.read_text()), pairs)
    suffix = "+val" if a.validation else ""
    specs = {m + suffix: spec(m, a.validation) for m in a.modes.split(",")}
    dev_grid.run_args(RUNS, specs, a, done, before_run=patch)


if __name__ == "__main__":
    main()
