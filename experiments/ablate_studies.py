"""Issue 4's four ablation studies and the follow-ups (5, 6; issue 13's 7: transfer learning with
layer-wise rates, 8: batch size and the learning rate; issue 10's 10: a rate shock mid-run, 11:
what an early overshoot costs): run each grid with
``metalr ablate``, write its report with ``metalr report``, then print (and write) the headline
numbers of each study.

    python experiments/ablate_studies.py            # all studies (resumes finished cells)
    python experiments/ablate_studies.py 1 3        # only studies 1 and 3
    python experiments/ablate_studies.py --headlines-only   # recompute the headlines

Configs: ``configs/ablate_study{1..8,10,11}_*.yaml`` (each header gives its command, hardware, wall
time and expected headline). Outputs: ``experiments/results/ablate_study<N>/`` (records.jsonl,
curves/, report.md, summary.csv, PNGs) and ``experiments/results/ablate_study<N>/headline.md``.

Study 1's goal (issue 4): AdamHD at default settings, started at each initial lr, ends within 10%
of the best-of-grid Adam's final validation loss (mean over seeds) on >= 80% of (task, lr0) cells.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_run_goals  # experiments/ is not a package
import transfer_batch_studies

from metalr.workbench.report_stats import latest_records
from metalr.workbench.runner import read_records

CONFIGS = {
    1: "configs/ablate_study1_lr_sensitivity.yaml",
    2: "configs/ablate_study2_tuning_cost.yaml",
    3: "configs/ablate_study3_components.yaml",
    4: "configs/ablate_study4_schedules.yaml",
    5: "configs/ablate_study5_fast_start.yaml",
    6: "configs/ablate_study6_seek_components.yaml",
    7: "configs/ablate_study7_transfer.yaml",
    8: "configs/ablate_study8_batch_size.yaml",
    10: "configs/ablate_study10_lr_shock.yaml",
    11: "configs/ablate_study11_early_rate.yaml",
}
RESULTS = ROOT / "experiments" / "results"
CURVES_LIMIT = 5 * 2**20  # beyond ~5 MB of curves, drop the uncommitted ones (trim_curves)
GOAL_WITHIN, GOAL_FRACTION = 0.10, 0.80


def metalr_cli() -> list[str]:
    exe = Path(sys.executable).with_name("metalr")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "metalr.cli"]


def run(n: int) -> float:
    tic = time.perf_counter()
    cmd = [*metalr_cli(), "ablate", "--config", CONFIGS[n], "--quiet", "--no-report"]
    print("$", " ".join(cmd[-5:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    out = RESULTS / f"ablate_study{n}"
    subprocess.run([*metalr_cli(), "report", str(out.relative_to(ROOT))], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - tic


# ------------------------------------------------------------------------------------ headlines
def records(n: int | Path) -> list[dict]:
    """The latest record of each (task, optimizer, lr, seed) of study ``n`` (or of a folder)."""
    folder = n if isinstance(n, Path) else RESULTS / f"ablate_study{n}"
    return latest_records(read_records(folder / "records.jsonl"))  # a torn last line is skipped


def table(recs: list[dict], key: str = "final_val_loss") -> dict[tuple, float]:
    """(task, optimizer, lr) → mean over seeds (inf if any seed diverged)."""
    groups = defaultdict(list)
    for r in recs:
        v = r.get(key)
        bad = r.get("status") == "diverged" or v is None or not math.isfinite(v)
        groups[(r["task"], r["optimizer"], r["lr"])].append(math.inf if bad else float(v))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def fmt(v: float) -> str:
    """A mean loss: NaN = no such run (e.g. a prior spec on a task without a prior)."""
    if math.isnan(v):
        return "—"
    return "diverged" if not math.isfinite(v) else f"{v:.4f}"


def md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def best(t: dict, task: str, opt: str) -> tuple[float, float | None]:
    cands = [(v, lr) for (ta, o, lr), v in t.items() if ta == task and o == opt]
    return min(cands, key=lambda c: c[0]) if cands else (math.nan, None)


def within_goal(t: dict, task: str, opt: str, lr: float, ref: str = "adam") -> bool:
    """Study 1's goal test for one cell: ``opt`` started at ``lr`` ends within 10% of the
    best-of-grid ``ref``."""
    return t[(task, opt, lr)] <= (1 + GOAL_WITHIN) * best(t, task, ref)[0]


def headline1() -> str:
    """Study 1's headline: issue 10's goals (experiments/one_run_goals.py)."""
    recs = records(1)
    return one_run_goals.headline(lambda key: table(recs, key))


def headline6() -> str:
    recs = records(6)
    return one_run_goals.headline6(lambda key: table(recs, key))


def headline2() -> str:
    recs = records(2)
    val, test = table(recs), table(recs, "final_test_loss")
    runs = {"adam_hd": 1, "adam_hd_normalized": 1, "adam_hd_recommended": 1, "adam": 1, "adam_tuned_1": 2,
            "adam_tuned_4": 5, "adam_tuned_16": 17, "adam_bayes_4": 5, "adam_bayes_16": 17}  # fmt: skip
    tasks = sorted({k[0] for k in val})
    rows = []
    chosen = defaultdict(list)
    for r in recs:
        if r["optimizer"].startswith(("adam_tuned", "adam_bayes")):
            chosen[(r["task"], r["optimizer"])].append(r["lr_used"])
    hits = {"adam_hd": 0, "adam_hd_normalized": 0, "adam_hd_recommended": 0}
    for task in tasks:
        by_opt = {kk[1]: kk for kk in val if kk[0] == task}
        hd_test = test[by_opt["adam_hd"]]
        for o, k in runs.items():
            if o not in by_opt:
                continue
            key = by_opt[o]
            lrs = chosen.get((task, o))
            pick = "1e-3" if lrs is None else ", ".join(f"{x:.2g}" for x in lrs)
            rows.append([task, o, k, pick, fmt(val[key]), fmt(test[key]),
                         f"{test[key] / hd_test:.3f}"])  # fmt: skip
        tuned = test.get(by_opt.get("adam_tuned_16"), math.nan)
        for o in hits:
            if o in by_opt:
                hits[o] += test[by_opt[o]] <= 1.05 * tuned
    goal2 = ", ".join(f"{o}: **{n}/{len(tasks)}**" for o, n in hits.items())
    return ("## Study 2: tuning cost\n\nGoal 2 (issue 10): one default run (lr 1e-3) within 5% of "
            f"16-trial random-search Adam's test loss on ≥ 4/5 tasks — {goal2} "
            "(adam_hd_recommended is one run with issue 11's recommended validation option, "
            "not the default run goal 2 asks about).\n\n"
            "Final validation and test loss, mean over seeds; "
            "'runs' = full-length training runs spent (a tuning budget of k trials + the "
            "retrain); tuned Adam is selected on validation loss, so its test loss is the fair "
            "column.\n\n"
            + md(["task", "optimizer", "runs", "lr used (per seed)", "val loss", "test loss",
                  "test ÷ AdamHD"], rows))  # fmt: skip


def _relative(n: int, ref: str) -> str:
    """Per optimizer: mean over (task, lr0) of loss ÷ ref's at the same (task, lr0), and the
    number of (task, lr0) cells where it beats ref; plus each one's best-of-grid per task."""
    t = table(records(n))
    tasks = sorted({k[0] for k in t})
    opts = list(dict.fromkeys(k[1] for k in t))
    lrs = sorted({k[2] for k in t if k[2] is not None})
    rows = []
    for o in opts:
        ratios, wins = [], 0
        for task in tasks:
            for lr in lrs:
                if (task, o, lr) in t:
                    a, b = t[(task, o, lr)], t[(task, ref, lr)]
                    ratios.append(a / b if math.isfinite(a) else math.inf)
                    wins += a < b
        geo = (math.exp(sum(math.log(x) for x in ratios) / len(ratios))
               if ratios and all(math.isfinite(x) for x in ratios) else math.inf)  # fmt: skip
        bests = []
        for task in tasks:
            v, lr = best(t, task, o)
            bests.append(f"{fmt(v)}" + ("" if lr is None else f" @{lr:g}"))
        rows.append([o, f"{geo:.3f}" if ratios else "— (lr-free)",
                     f"{wins}/{len(ratios)}" if ratios else "—", *bests])  # fmt: skip
    return md(["optimizer", f"geo-mean loss ÷ {ref} (same task, lr0)",
               f"cells better than {ref}", *[f"best: {x}" for x in tasks]], rows)  # fmt: skip


def prior_table(t: dict, task: str = "fewshot_sinusoid") -> str:
    """Per metalr optimizer on the few-shot task: no prior (each lr0 and best of grid) vs the
    meta-learned prior (rates and initial weights) vs its rates only."""
    lrs = sorted({k[2] for k in t if k[0] == task and k[2] is not None})
    rows = []
    for o in ("sgd_hd", "adam_hd"):
        if (task, f"{o}_prior", None) not in t:
            continue
        b, b_lr = best(t, task, o)
        prior, rates = t[(task, f"{o}_prior", None)], t.get((task, f"{o}_prior_rates", None))
        rows.append([o, *[fmt(t[(task, o, lr)]) for lr in lrs], f"{fmt(b)} (lr {b_lr:g})",
                     fmt(prior), f"{prior / b:.3f}", fmt(rates) if rates is not None else "—",
                     f"{rates / b:.3f}" if rates is not None else "—"])  # fmt: skip
    if not rows:
        return ""
    return (f"\nMeta-learned prior vs none on {task} (final validation MSE, mean over seeds; each "
            "seed fine-tunes on its own held-out sinusoid; the prior was meta-trained on MAML's "
            "sinusoid distribution by `metalr.workbench.priors`):\n\n"
            + md(["optimizer", *[f"no prior, lr0 {lr:g}" for lr in lrs], "no prior, best",
                  "prior (rates + init)", "÷ best", "prior rates only", "÷ best"], rows))  # fmt: skip


def headline3() -> str:
    t = table(records(3))
    return "## Study 3: metalr's parts (AdamHD)\n\n" + _relative(3, "adam_hd") + prior_table(t)


def headline4() -> str:
    return "## Study 4: schedules and the LR range test vs fixed-rate Adam\n\n" + _relative(
        4, "adam"
    )


WARM_VARIANTS = {"adam_hd": "AdamHD (defaults)",
                 "adam_hd_warm10": "warm-up ×10, 50 steps",
                 "adam_hd_warm5": "warm-up ×5, 100 steps"}  # fmt: skip


def headline5() -> str:
    t = table(records(5))
    tasks = sorted({k[0] for k in t})
    lrs = sorted({k[2] for k in t if k[1] == "adam_hd"})
    rows, totals = [], dict.fromkeys(WARM_VARIANTS, 0)
    for task in tasks:
        b_adam, b_lr = best(t, task, "adam")
        for lr in lrs:
            cells = []
            for opt in WARM_VARIANTS:
                ok = within_goal(t, task, opt, lr)
                totals[opt] += ok
                ratio = t[(task, opt, lr)] / b_adam
                cells.append(("∞" if not math.isfinite(ratio) else f"{ratio:.3f}")
                             + ("" if ok else " ✗"))  # fmt: skip
            rows.append([task, f"{lr:g}", f"{fmt(b_adam)} (lr {b_lr:g})", *cells])
    n = len(tasks) * len(lrs)
    summary = ", ".join(f"{label}: **{totals[o]}/{n} = {totals[o] / n:.0%}**"
                        for o, label in WARM_VARIANTS.items())  # fmt: skip
    return (
        "## Study 5: a faster early climb (hypergradient warm-up) vs study 1's gap\n\n"
        "Study 1's goal test (final validation loss, mean over seeds, within "
        f"{GOAL_WITHIN:.0%} of the best-of-grid Adam of the same grid; goal ≥ "
        f"{GOAL_FRACTION:.0%} of (task, lr0) cells): {summary}. The warm-up runs step t with "
        "β_t = 0.02 · (1 + (factor − 1) · exp(−(t − 1)/steps)).\n\n"
        "Loss ÷ best-of-grid Adam (✗: not within 10%):\n\n"
        + md(["task", "lr0", "best Adam", *WARM_VARIANTS.values()], rows)
    )


def headline7() -> str:
    folder = RESULTS / "ablate_study7"
    recs = transfer_batch_studies.attach_curves(records(7), folder)
    return transfer_batch_studies.headline7(recs, folder)


def headline8() -> str:
    folder = RESULTS / "ablate_study8"
    recs = transfer_batch_studies.attach_curves(records(8), folder)
    return transfer_batch_studies.headline8(recs, folder)


def headline10(folder: Path | None = None) -> str:
    """Study 10: each method with and without the x100 shock at 40% of the run (``folder``: a
    rerun of its config on other seeds, ``out=...``)."""
    recs = records(folder or 10)
    t, peak = table(recs), table(recs, "peak_train_ratio")
    seeds = defaultdict(list)
    for r in recs:
        v = r.get("final_val_loss")
        seeds[(r["task"], r["optimizer"])].append(v if v is not None else math.inf)
    tasks = sorted({k[0] for k in t})
    methods = ["adam", "adam_hd", "adam_hd_guard"]
    rows, ratios = [], defaultdict(list)
    for task in tasks:
        for m in methods:
            calm, shocked = t[(task, m, 1e-3)], t[(task, f"{m}_shock", 1e-3)]
            ratio = shocked / calm if math.isfinite(shocked) else math.inf
            ratios[m].append(ratio)
            diverged = sum(not math.isfinite(v) for v in seeds[(task, f"{m}_shock")])
            rows.append([task, m, fmt(calm), fmt(shocked), f"{ratio:.2f}",
                         f"{peak[(task, f'{m}_shock', 1e-3)]:.3g}",
                         f"{peak[(task, m, 1e-3)]:.3g}", diverged])  # fmt: skip
    seed_list = ", ".join(str(s) for s in sorted({r["seed"] for r in recs}))
    summary = []
    for m in methods:
        finite = [r for r in ratios[m] if math.isfinite(r)]
        geo = math.exp(sum(map(math.log, finite)) / len(finite)) if finite else math.inf
        summary.append([m, f"{geo:.2f}", len(ratios[m]) - len(finite)])
    return (
        "## Study 10: a x100 learning-rate shock at 40% of the run\n\n"
        f"Final validation loss (mean over seeds {seed_list}) without and with the shock, their "
        "ratio, and the largest minibatch training loss ÷ the first (with / without the shock)."
        "\n\n"
        + md(
            [
                "method",
                "geo-mean shocked ÷ calm (tasks without a divergence)",
                "tasks with a diverged seed",
            ],
            summary,
        )
        + "\n"
        + md(
            [
                "task",
                "method",
                "final val",
                "final val, shocked",
                "shocked ÷ calm",
                "peak train ÷ first, shocked",
                "calm",
                "diverged seeds (shocked)",
            ],
            rows,
        )
    )


#: Study 11's schedules: name → (label, multiple of the base rate r it starts at).
EARLY_RATE = {"adam": ("fixed r", 1.0), "adam_x7": ("7r throughout", 7.0),
              "adam_x7_for50": ("7r for 50 steps, then r", 7.0),
              "adam_x7_for100": ("7r for 100 steps, then r", 7.0),
              "adam_x3_for50": ("3r for 50 steps, then r", 3.0),
              "adam_x7_from50": ("r for 50 steps, then 7r", 1.0),
              "adam_x7_from100": ("r for 100 steps, then 7r", 1.0),
              "adam_x7_from200": ("r for 200 steps, then 7r", 1.0),
              "adam_x3_from200": ("r for 200 steps, then 3r", 1.0)}  # fmt: skip


def headline11(folder: Path | None = None) -> str:
    """Study 11: final and best validation loss of each early-rate schedule at base rate r
    (mean of the seeds with a 95% t-interval), ÷ the fixed rate's; AdamHD beside them."""
    from metalr.workbench.report_stats import mean_ci

    recs = records(folder or 11)
    by = defaultdict(list)
    for r in recs:
        by[(r["task"], r["optimizer"], r["lr"])].append(r)
    rows = []
    for task in sorted({k[0] for k in by}):
        for opt, (label, multiple) in EARLY_RATE.items():
            for start in sorted(lr for t, o, lr in by if t == task and o == opt):
                base = start / multiple
                runs = by[(task, opt, start)]
                fixed = by.get((task, "adam", base))
                finals = [r["final_val_loss"] for r in runs]
                m, half = mean_ci(finals)
                ratio = (
                    m / (sum(r["final_val_loss"] for r in fixed) / len(fixed))
                    if fixed
                    else math.nan
                )
                best_m = sum(r["best_val_loss"] for r in runs) / len(runs)
                rows.append([task, f"{base:g}", label, f"{m:.4f} ± {half:.4f}",
                             f"{best_m:.4f}", f"{ratio:.2f}", len(runs)])  # fmt: skip
        for (t, o, lr), runs in sorted(by.items()):
            if t == task and o == "adam_hd":
                m, half = mean_ci([r["final_val_loss"] for r in runs])
                best_m = sum(r["best_val_loss"] for r in runs) / len(runs)
                rows.append([task, f"lr0 {lr:g}", "AdamHD (defaults)",
                             f"{m:.4f} ± {half:.4f}", f"{best_m:.4f}", "", len(runs)])  # fmt: skip
    return ("## Study 11: what an early overshoot costs on the tasks that overfit\n\n"
            "Final validation loss, mean over seeds ± the 95% t-interval's half-width; ÷ fixed r: the schedule's "
            "mean final ÷ Adam's at the fixed rate r.\n\n"
            + md(["task", "r", "schedule", "final val (± 95% CI)", "best val", "÷ fixed r",
                  "seeds"], rows))  # fmt: skip


HEADLINES = {
    1: headline1,
    2: headline2,
    3: headline3,
    4: headline4,
    5: headline5,
    6: headline6,
    7: headline7,
    8: headline8,
    10: headline10,
    11: headline11,
}


def trim_curves(studies: list[int]) -> None:
    """When the curve folders of the studies just run exceed the size limit, drop the curve files
    git does not track (the run's new ones: their report's plots are already written). Curves an
    earlier commit holds are kept, and other studies' folders are not touched."""
    folders = [RESULTS / f"ablate_study{n}" / "curves" for n in studies]
    total = sum(f.stat().st_size for d in folders if d.is_dir() for f in d.iterdir())
    print(f"curve folders: {total / 2**20:.1f} MiB", flush=True)
    if total <= CURVES_LIMIT:
        return
    removed = 0
    for d in folders:
        if not d.is_dir():
            continue
        tracked = tracked_names(d)
        for f in d.iterdir():
            if f.name not in tracked:
                f.unlink()
                removed += 1
    print(f"removed {removed} uncommitted curve files (over the size limit); committed ones kept")


def tracked_names(folder: Path) -> set[str]:
    """The names of the files in ``folder`` that git tracks (none outside a git checkout)."""
    out = subprocess.run(["git", "-C", str(folder), "ls-files", "-z", "."], capture_output=True,
                         text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        return set()
    return {name for name in out.stdout.split("\0") if name and "/" not in name}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="*", type=int, default=list(CONFIGS))
    p.add_argument("--headlines-only", action="store_true")
    args = p.parse_args()
    for n in args.studies:
        if not args.headlines_only:
            seconds = run(n)
            print(f"study {n}: {seconds:.0f} s wall (run + report)", flush=True)
        text = HEADLINES[n]()
        (RESULTS / f"ablate_study{n}" / "headline.md").write_text(text)
        print(text, flush=True)
    if not args.headlines_only:
        trim_curves(args.studies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
