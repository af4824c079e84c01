"""Runner for ``protocol.md`` (development seeds only; every run appended to ``runs.jsonl``).

python experiments/results/fit_controller/ray_window/runner.py [--modes ...]
python experiments/results/fit_controller/ray_window/runner.py --table
"""

from __future__ import annotations

import argparse
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
    return {"kind": "adam_hd", "validation_data": {"every": 20},
            "validation": {"ray_steps": "budget", **MODES[mode]}}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--lrs", default="1e-5,1e-3,1e-1")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    done = dev_grid.load(RUNS, BASELINE, {"default+val"})
    if a.table:
        pairs = {m: "default+val" for m in list(MODES)[1:]}
        return dev_grid.table(done, json.loads(REF.read_text()), pairs)
    dev_grid.run_grid(RUNS, {m: spec(m) for m in a.modes.split(",")}, a.tasks.split(","),
                      [float(x) for x in a.lrs.split(",")],
                      [int(s) for s in a.seeds.split(",")], done)  # fmt: skip


if __name__ == "__main__":
    main()
