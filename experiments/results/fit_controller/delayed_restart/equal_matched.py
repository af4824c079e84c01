"""Checks that restartpatch3's mode ``matched`` equals restartpatch2's on one run, bit for bit:
runs restartpatch2 (RESTART=matched) on the given cell and compares with runs.jsonl's record.

    RESTART=matched python .../equal_matched.py animal_cnn 1e-3 100
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent / "matched_restart"))
assert os.environ.get("RESTART") == "matched"
import restartpatch2  # noqa: F401
import torch
from fit_controller import run
from study_budgets import study_steps

torch.set_num_threads(1)
task, lr, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
r = run(task, {"kind": "adam_hd"}, lr, study_steps(task), "full", seed)
mine = [json.loads(l) for l in (HERE / "runs.jsonl").read_text().splitlines()]
rec = next(
    x for x in mine if (x["task"], x["mode"], x["lr"], x["seed"]) == (task, "matched", lr, seed)
)
print(
    task,
    lr,
    seed,
    "restartpatch2:",
    r["final_val_loss"],
    "restartpatch3:",
    rec["final"],
    "equal" if r["final_val_loss"] == rec["final"] else "DIFFERENT",
)
