"""After the check (it decides nothing): the held-out transformer with the recommended option
without the restart, seeds 0-2, against study 1's best-of-grid Adam and study 9's option row.

    python experiments/results/fit_controller/val_no_restart_tf/heldout.py
"""

import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT / "experiments"))
from ablate_studies import records, table
from check_controller import LRS, _run
from study_budgets import study_steps

TASK, SEEDS = "pysrc_transformer", (0, 1, 2)
SPEC = {"kind": "adam_hd", "validation_data": {"every": 20}, "validation": {"ray_steps": "budget"},
        "seek": {"moment_restart": 0, "restart_match": 0}}  # fmt: skip


def main() -> None:
    steps = study_steps(TASK)
    jobs = [(TASK, SPEC, lr, s, "full", steps) for lr in LRS for s in SEEDS]
    with ProcessPoolExecutor(2) as pool:
        losses = list(pool.map(_run, jobs))
    study1, study9 = table(records(1)), table(records(9))
    best = min(v for (t, o, _), v in study1.items() if t == TASK and o == "adam")
    rows = []
    for lr in LRS:
        mine = statistics.mean(v for (_, _, l, _, _, _), (v, _) in zip(jobs, losses) if l == lr)
        option = study9[(TASK, "adam_hd_val20_ray_gate", lr)]
        rows.append({"lr0": lr, "no_restart": mine / best, "option": option / best})
    (HERE / "heldout.json").write_text(json.dumps({"best_adam": best, "rows": rows}, indent=1))
    print(f"{TASK}, seeds {SEEDS}: final validation ÷ best-of-grid Adam ({best:.4f})")
    for r in rows:
        print(
            f"lr0 {r['lr0']:g}: option {r['option']:.3f}, without the restart {r['no_restart']:.3f}"
        )


if __name__ == "__main__":
    main()
