"""Variants of AdamHD's seek constants on many seeds of study 1's six tasks, at one initial rate.

A study-1 cell compares two 3-seed means, which move by ±6 of 30 cells between seed sets at
fixed constants; a development question ("does a deeper cut at the turn help the tasks that
overfit, and what does it cost the others?") needs many-seed means instead. Because the seek
rule's result hardly depends on ``lr0`` (study 1: the five lr0 cells of a task lie within a few
percent), one lr0 stands for the grid here. Each variant is AdamHD with ``seek`` overrides; the
reference is the best fixed Adam rate of study 1's grid on the same seeds, and the default row
is AdamHD at the shipped constants — both read from (or added to) the per-task caches of
``experiments/reference_noise.py``.

    python experiments/seek_many_seeds.py                     # the committed post-turn ablation
    python experiments/seek_many_seeds.py --lr 1e-3 --variant cut0.3='{"turn_cut": 0.3}'

Per task: the variant's many-seed mean final validation loss ÷ the best fixed Adam rate's, with a
95% paired bootstrap interval over seeds; a geometric mean over the tasks; the count within 10%.
Runs are cached in ``experiments/results/seek_many_seeds/runs.json`` (nothing is rerun); the
table goes to ``.../seek_many_seeds/table.md``. 2-core CPU: ~7 minutes a variant (the CNN is
half of it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_noise, compare_checks
from compare_checks import bootstrap_interval
from one_run_goals import WITHIN
from reference_noise import LRS, RESULTS, STEPS, _run, key, mean_of, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments/results/seek_many_seeds"
#: Seeds per task: those of the committed reference_noise runs (its cached Adam grid is reused).
SEEDS = {"digits_logreg": "100-123", "digits_mlp": "100-123", "mnist1d_mlp": "100-111",
         "fewshot_sinusoid": "100-159", "animal_cnn": "100-111", "charlm_gru": "100-111"}  # fmt: skip
#: The committed ablation: the level the rates take after the turn, and what sets it.
POST_TURN = {
    "headroom 2 (ceiling 2x the cut level)": {"headroom": 2.0},
    "headroom 4": {"headroom": 4.0},
    "turn_cut 0.3 (deeper cut)": {"turn_cut": 0.3},
    "no re-opened ramp": {"resume_window": 0.0},
}


def _variant_key(task: str, seek: Mapping[str, float], lr: float, seed: int) -> str:
    return f"{task}|{json.dumps(dict(sorted(seek.items())))}|{lr:g}|{seed}"


def ratios(
    reference: Mapping[str, float],
    runs: Mapping[str, float],
    seeds: Sequence[int],
    rng: random.Random,
) -> tuple[float, float, float]:
    """The runs' mean ÷ the best fixed rate's mean over ``seeds`` (the rate chosen on these seeds),
    with its 95% paired bootstrap interval. ``reference``: ``key("adam", lr, seed)`` → loss;
    ``runs``: seed → loss."""
    best = min(LRS, key=lambda lr: mean_of(reference, "adam", lr, seeds))

    def stat(sample: Sequence[int]) -> float:
        return statistics.mean(runs[s] for s in sample) / mean_of(reference, "adam", best, sample)

    lo, hi = bootstrap_interval(list(seeds), stat, rng)
    return stat(seeds), lo, hi


def table(rows: Mapping[str, Mapping[str, tuple[float, float, float]]], lr: float) -> str:
    """Markdown: one row per variant, one column per task (ratio and interval), the geometric
    mean over tasks and the count of tasks within 10%."""
    tasks = list(next(iter(rows.values())))
    lines = [
        f"AdamHD variants at lr0 {lr:g}: many-seed mean final validation loss ÷ the best fixed Adam "
        "rate's (study 1's grid) on the same seeds (95% paired bootstrap interval); seeds: "
        + ", ".join(f"{t} {SEEDS.get(t, '?')}" for t in tasks),
        "",
        "| variant | " + " | ".join(tasks) + " | geometric mean | within 10% |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for name, cells in rows.items():
        values = [cells[t][0] for t in tasks]
        geo = math.exp(statistics.mean(math.log(v) for v in values))
        hits = sum(v <= 1 + WITHIN for v in values)
        parts = [f"{r:.3f} ({lo:.2f}-{hi:.2f})" for r, lo, hi in (cells[t] for t in tasks)]
        lines.append(f"| {name} | " + " | ".join(parts) + f" | {geo:.3f} | {hits}/{len(tasks)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=1e-3, help="the one initial rate (a grid rate)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON of seek overrides (default: the post-turn ablation)")  # fmt: skip
    parser.add_argument("--tasks", default=",".join(SEEDS), help="comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.lr not in LRS:
        raise ValueError(f"Invalid --lr: {args.lr:g}; expected one of {', '.join(map(str, LRS))}")
    variants = dict(POST_TURN)
    if args.variant:
        variants = {}
        for text in args.variant:
            name, sep, spec = text.partition("=")
            if not sep:
                raise ValueError(f"Invalid --variant: {text!r}; expected NAME=JSON")
            variants[name] = json.loads(spec)
    tasks = args.tasks.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "runs.json"
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    # reference_noise's cache: the Adam grid and the default AdamHD row
    ref_paths = {task: RESULTS / f"{task}_adam.json" for task in tasks}
    refs = {task: json.loads(path.read_text()) if path.is_file() else {}
            for task, path in ref_paths.items()}  # fmt: skip
    jobs = []
    for task in tasks:
        for s in parse_seeds(SEEDS[task]):
            jobs += [("ref", task, {"kind": "adam"}, lr, s, key("adam", lr, s))
                     for lr in LRS if key("adam", lr, s) not in refs[task]]  # fmt: skip
            if key("adam_hd", args.lr, s) not in refs[task]:
                jobs.append(("ref", task, {"kind": "adam_hd"}, args.lr, s,
                             key("adam_hd", args.lr, s)))  # fmt: skip
            for seek in variants.values():
                k = _variant_key(task, seek, args.lr, s)
                if k not in cache:
                    jobs.append(("var", task, {"kind": "adam_hd", "seek": seek}, args.lr, s, k))
    with ProcessPoolExecutor(args.workers) as pool:
        runs = [(task, spec, lr, s, STEPS[task]) for _, task, spec, lr, s, _ in jobs]
        for (where, task, *_, k), loss in zip(jobs, pool.map(_run, runs)):
            (refs[task] if where == "ref" else cache)[k] = loss
            if where == "var":
                cache_path.write_text(json.dumps(cache, indent=0, sort_keys=True))
    for task in {job[1] for job in jobs if job[0] == "ref"}:  # keep what was added
        ref_paths[task].write_text(json.dumps(refs[task], indent=0, sort_keys=True))
    rng = random.Random(0)
    rows: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name, seek in {"shipped defaults": None, **variants}.items():
        rows[name] = {}
        for task in tasks:
            seeds = parse_seeds(SEEDS[task])
            runs = {s: (refs[task][key("adam_hd", args.lr, s)] if seek is None
                        else cache[_variant_key(task, seek, args.lr, s)]) for s in seeds}  # fmt: skip
            rows[name][task] = ratios(refs[task], runs, seeds, rng)
    text = table(rows, args.lr)
    command = "python experiments/seek_many_seeds.py " + " ".join(argv or sys.argv[1:])
    (args.out / "table.md").write_text(f"`{command.strip()}`\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
