"""The matched restart (``restartpatch2.py``, mode ``matched``) on study 1's held-out tasks,
seeds 0-2, AdamHD otherwise at its defaults, against best-of-grid Adam and AdamHD at defaults
from study 1's records (``experiments/horizon_heldout.py``'s scoring). A probe for the next
session's decision (protocol.md): nothing rides on it here.

    python experiments/results/fit_controller/matched_restart/heldout.py     # ~15 min, 2 cores
"""

from __future__ import annotations

import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
sys.path.insert(0, str(HERE))
os.environ["RESTART"] = "matched"
import restartpatch2  # noqa: F401  (patches AdamHD.step; forked workers inherit it)
from horizon_heldout import LRS, SEEDS, TASKS, _run, study1_reference

if __name__ == "__main__":
    spec = {"kind": "adam_hd"}
    jobs = [(t, spec, lr, s, steps, "full") for t, steps in TASKS.items() for lr in LRS
            for s in SEEDS]  # fmt: skip
    with ProcessPoolExecutor(2) as pool:
        runs = list(pool.map(_run, jobs))
    mine = {(t, lr): statistics.mean(r["final"] for r in runs if (r["task"], r["lr"]) == (t, lr))
            for t in TASKS for lr in LRS}  # fmt: skip
    adam, hd = study1_reference()
    lines = ["| task | " + " | ".join(f"lr0 {lr:g}" for lr in LRS) + " |",
             "|---|" + "---:|" * len(LRS)]  # fmt: skip
    hits = base_hits = 0
    for t in TASKS:
        cells = []
        for lr in LRS:
            r, b = mine[(t, lr)] / adam[t], hd[(t, lr)] / adam[t]
            hits, base_hits = hits + (r <= 1.10), base_hits + (b <= 1.10)
            cells.append(f"{r:.2f} ({b:.2f})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    head = (
        f"Held-out tasks, seeds 0-2, final val ÷ best-of-grid Adam: matched restart "
        f"{hits}/15 cells within 10%, defaults {base_hits}/15 (in brackets)."
    )
    text = head + "\n\n" + "\n".join(lines) + "\n"
    (HERE / "heldout.md").write_text(text)
    print(text)
