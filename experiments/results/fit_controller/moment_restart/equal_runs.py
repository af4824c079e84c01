"""The library's ``seek={"moment_restart": 1}`` against the check's monkeypatch (``restartpatch.py``),
each on four runs with the recommended validation option: final validation losses and the logged
largest rates must be equal. ``python experiments/results/fit_controller/moment_restart/equal_runs.py``
(each face in its own process: the monkeypatch replaces ``AdamHD.step``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE.parents[2]
RUNS = [("digits_logreg", 1e-3, 100), ("digits_mlp", 1e-5, 101), ("fewshot_sinusoid", 1e-2, 102),
        ("mnist1d_mlp", 1e-1, 100)]  # fmt: skip


def runs(face: str) -> dict[str, list]:
    import torch

    sys.path.insert(0, str(EXPERIMENTS))
    spec = {"kind": "adam_hd", "validation_data": {"every": 20},
            "validation": {"ray_steps": "budget"}}  # fmt: skip
    if face == "patch":
        sys.path.insert(0, str(HERE))
        os.environ["RESTART"] = "first"
        import restartpatch

        restartpatch.MODE = "first"
    else:
        spec["seek"] = {"moment_restart": 1}
    torch.set_num_threads(1)
    from fit_controller import run
    from study_budgets import budgets

    out = {}
    for task, lr, seed in RUNS:
        r = run(task, spec, lr, budgets((task,))[task], "full", seed)
        out[f"{task}|{lr:g}|{seed}"] = [r["final_val_loss"], r["curves"]["lr_max"]]
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(runs(sys.argv[1])))
        raise SystemExit(0)
    faces = {f: json.loads(subprocess.run([sys.executable, __file__, f], check=True,
                                          capture_output=True, text=True).stdout)
             for f in ("patch", "library")}  # fmt: skip
    for key in faces["patch"]:
        a, b = faces["patch"][key], faces["library"][key]
        print(key, a[0], b[0], "equal" if a == b else "DIFFERENT")
