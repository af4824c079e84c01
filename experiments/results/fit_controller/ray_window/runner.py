"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/ray_window/runner.py [--modes ...]
python experiments/results/fit_controller/ray_window/runner.py --table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import dev_grid

RUNS = HERE / "runs.jsonl"
BASELINE = HERE.parent / "transient_match" / "runs.jsonl"  # default+val rows (reused)
REF = HERE.parent / "check_adam_reference_seeds_100_101_102.json"
MODES = {
    "default+val": {},
    "before20+val": {"ray_before": 0.2},
    "before30+val": {"ray_before": 0.3},
}
TASKS = "digits_mlp,mnist1d_mlp,digits_logreg,fewshot_sinusoid,animal_cnn"


def spec(mode: str) -> dict:
    """The recommended validation option with the mode's ray keys added."""
    option = dev_grid.RECOMMENDED
    return {"kind": "adam_hd", **option, "validation": {**option["validation"], **MODES[mode]}}


def main(argv=None) -> None:
    a = dev_grid.grid_parser(TASKS, ",".join(MODES)).parse_args(argv)
    done = dev_grid.load(RUNS, BASELINE, {"default+val"})
    if a.table:
        pairs = {m: "default+val" for m in list(MODES)[1:]}
        return dev_grid.table(done, json.loads(REF.read_text()), pairs)
    dev_grid.run_args(RUNS, {m: spec(m) for m in a.modes.split(",")}, a, done)


if __name__ == "__main__":
    main()
