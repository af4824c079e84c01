"""The library's ``seek={"moment_restart": 1, "restart_match": 1}`` against the check's recorded
runs (``candidate.json``: ``restartpatch2.py`` in mode ``matched``, AdamHD's defaults otherwise):
the final validation losses of four recorded (task, lr0, seed) runs must be equal.

    python experiments/results/fit_controller/matched_restart/equal_runs.py    # ~3 min, 1 core
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/

RUNS = [("digits_logreg", 1e-3, 60), ("digits_mlp", 1e-1, 61), ("fewshot_sinusoid", 1e-2, 62),
        ("animal_cnn", 1e-5, 63)]  # fmt: skip
SPEC = {"kind": "adam_hd", "seek": {"moment_restart": 1, "restart_match": 1}}

if __name__ == "__main__":
    import torch
    from check_controller import TASKS, _run

    torch.set_num_threads(1)
    recorded = json.loads((HERE / "candidate.json").read_text())
    lines = ["| run | recorded (monkeypatch) | library | |", "|---|---:|---:|---|"]
    for task, lr, seed in RUNS:
        want = recorded["losses"][f"{task}|{lr:g}"][recorded["seeds"].index(seed)]
        got = _run((task, SPEC, lr, seed, "full", TASKS[task]))[0]
        lines.append(f"| {task} lr0 {lr:g} seed {seed} | {want!r} | {got!r} | "
                     f"{'equal' if got == want else 'DIFFERENT'} |")  # fmt: skip
        print(lines[-1], flush=True)
    (HERE / "equal.md").write_text(
        "The library against the recorded check runs (`equal_runs.py`):\n\n"
        + "\n".join(lines)
        + "\n"
    )
