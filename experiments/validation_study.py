"""Study 9 (issue 11): rates that watch the validation loss, against ReduceLROnPlateau and early
stopping on study 1's grid, with one shared validation stream (``configs/ablate_study9_validation.yaml``).

    python experiments/validation_study.py                  # run (resumes), report, headline
    python experiments/validation_study.py --headline-only  # recompute the headline

Study 1's ``adam`` and ``adam_hd`` cells are the same cells here (same ids): they are copied
from ``experiments/results/ablate_study1`` instead of being rerun. Headline (written to
``experiments/results/ablate_study9/headline.md``), per method, on study 1's six tasks and on the
three held-out tasks apart:

* issue 11's goal 1: (task, lr0) cells whose final validation loss (mean over seeds) is within 10%
  of best-of-grid Adam's; the same on the test split (reference: the test loss of the Adam run
  the grid picks by final validation loss), which no method saw;
* for Adam + ReduceLROnPlateau and Adam + early stopping (both need the lr tuned), their
  best-of-grid per task against best-of-grid Adam;
* goal 2, cost: not from these records (the grids ran at different times on shared cores), but
  from the paired, interleaved benchmark ``experiments/bench_validation_cost.py``, whose table
  (``experiments/results/bench_validation_cost.md``) is appended when it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate_studies import records, trim_curves
from ablate_studies import table as mean_table  # mean over seeds, inf if one diverged
from bench_validation_cost import every_flag, results_path
from one_run_goals import HELDOUT, WITHIN

CONFIG = "configs/ablate_study9_validation.yaml"
OUT = ROOT / "experiments/results/ablate_study9"
STUDY1 = ROOT / "experiments/results/ablate_study1"
SEEDED = ("adam", "adam_hd")
METHODS = {"adam_hd": "AdamHD (option off)", "adam_hd_val": "AdamHD + observe_validation",
           "adam_hd_val20": "AdamHD + observe_validation, every 20 steps",
           "adam_hd_val20_rewind": "AdamHD + observe_validation, every 20, rewind 1",
           "adam_hd_pass": "AdamHD + a validation pass observed alone, every 20, rewind 1",
           "adam_hd_ray": "AdamHD + the ray ceiling alone, a validation pass's gradient, every 20",
           "adam_hd_val20_ray": "AdamHD + observe_validation, every 20, with the ray ceiling",
           "adam_hd_ray_clock": "AdamHD + the ray ceiling alone on its rate-weighted clock",
           "adam_hd_val20_ray_clock": "AdamHD + observe_validation, every 20, with the ray "
                                      "ceiling on its rate-weighted clock",
           "adam_hd_val20_ray_gate": "AdamHD + observe_validation, every 20, with the ray "
                                     "ceiling on its clock, gated on the gradient's fall",
           "adam_plateau": "Adam + ReduceLROnPlateau", "adam_es": "Adam + early stopping",
           "adam_plateau_pass": "Adam + ReduceLROnPlateau on the pass",
           "adam_es_pass": "Adam + early stopping on the pass",
           "adam": "Adam"}  # fmt: skip


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("metalr")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "metalr.cli"]


def seed_from_study1() -> int:
    """Copy study 1's adam / adam_hd records (and curves) whose cell ids this study expands to."""
    from metalr.workbench import load_study
    from metalr.workbench.runner import expand

    ids = {c["id"] for c in expand(load_study(ROOT / CONFIG)) if c["optimizer"] in SEEDED}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "curves").mkdir(exist_ok=True)
    path = OUT / "records.jsonl"
    have = {json.loads(l)["id"] for l in path.read_text().splitlines()} if path.is_file() else set()
    copied = 0
    with open(path, "a") as f:
        for line in (STUDY1 / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["id"] in ids and r["id"] not in have:
                f.write(line + "\n")
                have.add(r["id"])
                copied += 1
                curve = STUDY1 / "curves" / f"{r['id']}.json"
                if curve.is_file():
                    shutil.copy(curve, OUT / "curves" / curve.name)
    return copied


def load() -> list[dict]:
    return records(OUT)


def _ref(val: dict, test: dict, task: str) -> tuple[float, float]:
    """Best-of-grid Adam's final validation loss, and the test loss of that same grid point."""
    v, lr = min((v, lr) for (t, o, lr), v in val.items() if t == task and o == "adam")
    return v, test[(task, "adam", lr)]


def goal_rows(val: dict, test: dict, tasks: list[str]) -> list[list[str]]:
    rows = []
    for opt, label in METHODS.items():
        cells = [(t, lr) for (t, o, lr) in val if o == opt and t in tasks]
        if not cells:
            continue
        ratios = [(val[(t, opt, lr)] / _ref(val, test, t)[0],
                   test[(t, opt, lr)] / _ref(val, test, t)[1]) for t, lr in cells]  # fmt: skip
        n = len(ratios)
        hits_v = sum(r[0] <= 1 + WITHIN for r in ratios)
        hits_t = sum(r[1] <= 1 + WITHIN for r in ratios)
        worst = max(r[0] for r in ratios)
        div = sum(not math.isfinite(r[0]) for r in ratios)
        rows.append([label, f"{hits_v}/{n} = {hits_v / n:.0%}", f"{hits_t}/{n} = {hits_t / n:.0%}",
                     "diverged" if not math.isfinite(worst) else f"{worst:.2f}×", str(div)])  # fmt: skip
    return rows


def tuned_rows(val: dict, test: dict, tasks: list[str]) -> list[list[str]]:
    """Best-of-grid per task for the lr-tuned methods, over best-of-grid Adam (val, test)."""
    rows = []
    for task in tasks:
        row = [task]
        ref_v, ref_t = _ref(val, test, task)
        for opt in ("adam_plateau", "adam_es", "adam_hd_val"):
            cands = [(v, lr) for (t, o, lr), v in val.items() if t == task and o == opt]
            if not cands:
                row.append("–")
                continue
            v, lr = min(cands)
            row.append(f"{v / ref_v:.2f} / {test[(task, opt, lr)] / ref_t:.2f} (lr {lr:g})")
        rows.append(row)
    return rows


def md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _cost_table(every: int, whole_pass: bool = False) -> str:
    """The table of ``experiments/bench_validation_cost.py --every N [--pass]`` (its file without
    the title line), or how to make it."""
    bench = results_path(every, OUT.parent, whole_pass=whole_pass)
    if not bench.is_file():
        flags = every_flag(every) + (" --pass" if whole_pass else "")
        command = f"python experiments/bench_validation_cost.py{flags}"
        return f"Not measured yet: run `{command}`."
    return bench.read_text().split("\n", 2)[2].strip()


def headline(seconds: float | None) -> str:
    recs = load()
    val, test = mean_table(recs, "final_val_loss"), mean_table(recs, "final_test_loss")
    tasks = sorted({r["task"] for r in recs})
    study1 = [t for t in tasks if t not in HELDOUT]
    held = [t for t in tasks if t in HELDOUT]
    head = ["method", "final val within 10%", "test within 10%", "worst (val)", "diverged"]
    when = f"{seconds:.0f} s for the cells run now" if seconds else "see the records"
    intro = (
        f"`python experiments/validation_study.py` ({when}; 2-core CPU, 2 workers × 1 "
        f"thread; {len(recs)} records, seeds 0–2; study 1's adam/adam_hd cells reused)."
    )
    reference = (
        "Reference: best-of-grid Adam (lr 1e-5 … 1e-1) per task, by final validation "
        "loss; the test column compares test losses (the Adam reference: its grid point "
        "chosen on validation). Cells: (task, lr0), mean over 3 seeds. The rows fed a pass "
        "over the whole validation split choose (stop, rewind, cut) on the very loss the val "
        "column scores: their test column is the fair one."
    )
    tuned_head = [
        "task",
        "Adam + ReduceLROnPlateau",
        "Adam + early stopping",
        "AdamHD + observe_validation",
    ]
    parts = [
        "# Study 9 — rates that watch the validation loss (issue 11)",
        intro,
        reference,
        f"## Study 1's tasks ({', '.join(study1)})",
        md(head, goal_rows(val, test, study1)),
        f"## Held-out tasks ({', '.join(held)})",
        md(head, goal_rows(val, test, held)),
        "## Tuned per task: best-of-grid, ratio to best-of-grid Adam (val / test)",
        md(tuned_head, tuned_rows(val, test, tasks)),
        "## Cost of the option (every 10 steps, a validation batch of the training batch size)",
        _cost_table(10),
        "## Cost at every 20 steps (the recommended frequency since 2026-12-04)",
        _cost_table(20),
        "## Cost of a validation pass every 20 steps (the whole split, forward only)",
        _cost_table(20, whole_pass=True),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--headline-only", action="store_true")
    args = parser.parse_args(argv)
    seconds = None
    if not args.headline_only:
        print(f"seeded {seed_from_study1()} records from study 1", flush=True)
        tic = time.perf_counter()
        subprocess.run([*cli(), "ablate", "--config", CONFIG, "--quiet", "--no-report"],
                       cwd=ROOT, check=True)  # fmt: skip
        subprocess.run([*cli(), "report", str(OUT.relative_to(ROOT))], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        seconds = time.perf_counter() - tic
        trim_curves([9])  # the plots are drawn; new curves past the size limit are not kept
    text = headline(seconds)
    (OUT / "headline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
