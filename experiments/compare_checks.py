"""Paired comparison of two constant sets run by ``check_controller.py --out`` on the same seeds.

Study 1's score, the count of (task, lr0) cells whose 3-seed mean final validation loss is within
10% of best-of-grid Adam's, moves by ±6 of 30 cells between seed sets at fixed constants (the
cells near the line flip), so two candidates' counts on different seeds, or even on the same ones,
say little. This script pairs the runs: for every task, lr0 and seed the log-ratio

    d = log(loss_B) - log(loss_A)          (diverged runs count as a loss 100x the other's)

and reports its mean over all of them with a 95% interval from a bootstrap over the seeds (the
seeds are resampled whole, keeping every cell of a seed together: a seed's cells are not
independent), the mean per task, how many cells (3-seed means) each set has within 10%, and in
how many cells B is lower. Negative d: B's losses are lower. With three seeds the bootstrap has
only ten distinct resamples; run nine or more seeds for an interval worth reading.

    python experiments/check_controller.py --seeds 25,26,27,28,29,30,31,32,33 --out a.json
    python experiments/check_controller.py --seeds 25,26,27,28,29,30,31,32,33 \\
        --constants candidate.json --out b.json
    python experiments/compare_checks.py a.json b.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from check_controller import count_within

CAP = math.log(100.0)  # a diverged run against a finite one: 100x


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def log_ratio(a: float, b: float, cap: float = CAP) -> float:
    """``log(b / a)`` with diverged (infinite or NaN) losses capped at ±``cap`` (log 100)."""
    bad_a, bad_b = not math.isfinite(a), not math.isfinite(b)
    if bad_a or bad_b:
        return 0.0 if bad_a and bad_b else (cap if bad_b else -cap)
    return max(-cap, min(cap, math.log(b / a)))


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[float]]:
    """Per cell ``"task|lr"``: the log-ratios B over A, one per seed."""
    if a["seeds"] != b["seeds"] or a["optimizer"] != b["optimizer"]:
        raise ValueError("the two runs must share their seeds and optimizer")
    if set(a["losses"]) != set(b["losses"]):
        raise ValueError("the two runs must cover the same (task, lr0) cells")
    return {k: [log_ratio(x, y) for x, y in zip(a["losses"][k], b["losses"][k])]
            for k in a["losses"]}  # fmt: skip


def seed_bootstrap(d: dict[str, list[float]], draws: int = 2000, seed: int = 0) -> tuple:
    """Mean of ``d`` and its 95% percentile interval, resampling whole seeds."""
    seeds = list(range(len(next(iter(d.values())))))

    def mean_over(idx: Sequence[int]) -> float:
        return statistics.fmean(v[i] for v in d.values() for i in idx)

    lo, hi = bootstrap_interval(seeds, mean_over, random.Random(seed), draws)
    return mean_over(seeds), lo, hi


def bootstrap_interval(
    seeds: Sequence[int],
    stat: Callable[[list[int]], float],
    rng: random.Random,
    draws: int = 2000,
) -> tuple[float, float]:
    """95% percentile interval of ``stat`` over ``draws`` resamples of ``seeds`` (with
    replacement, whole seeds)."""
    values = sorted(stat([rng.choice(seeds) for _ in seeds]) for _ in range(draws))
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def within(run: dict[str, Any]) -> int:
    """Cells whose seed-mean loss is within 10% of the run's best-of-grid reference (counted as
    ``check_controller.py`` counts them)."""
    return count_within(
        statistics.mean(v) / run["reference"][k.split("|")[0]] for k, v in run["losses"].items()
    )


def report(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    d = paired(a, b)
    mean, lo, hi = seed_bootstrap(d)
    lower = sum(statistics.fmean(b["losses"][k]) < statistics.fmean(a["losses"][k]) for k in d)
    counts = (
        f"cells within 10%: {names[0]} {within(a)}/{len(d)}, {names[1]} {within(b)}/{len(d)}; "
        f"{names[1]} lower in {lower}/{len(d)} cells"
    )
    interval = (
        f"mean log-ratio {names[1]}/{names[0]}: {mean:+.4f} (95% seed-bootstrap interval "
        f"{lo:+.4f} to {hi:+.4f}; x{math.exp(mean):.3f})"
    )
    lines = [
        f"{names[0]} = {a['constants']}, {names[1]} = {b['constants']}; seeds {a['seeds']}",
        counts,
        interval,
        "",
        "| task | mean log-ratio |",
        "|---|---:|",
    ]
    for task in dict.fromkeys(k.split("|")[0] for k in d):
        vals = [x for k, v in d.items() if k.split("|")[0] == task for x in v]
        lines.append(f"| {task} | {statistics.fmean(vals):+.4f} |")
    return "\n".join(lines)


def on_test(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` scored on its test losses: ``losses`` and ``reference`` replaced by ``test_losses``
    and ``test_reference`` (Adam's test loss at the rate its validation loss chose)."""
    if run.get("test_losses") is None or run.get("test_reference") is None:
        raise ValueError(
            "--metric test needs check_controller.py --out files with test losses and a test "
            "reference (run check_controller.py once with --metric test for the seeds' reference)"
        )
    return {**run, "losses": run["test_losses"], "reference": run["test_reference"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="check_controller.py --out file of the base set")
    parser.add_argument("b", help="... of the candidate")
    parser.add_argument("--metric", choices=("val", "test"), default="val",
                        help="pair the final validation losses (default) or the test losses")  # fmt: skip
    args = parser.parse_args(argv)
    a, b = load(args.a), load(args.b)
    if args.metric == "test":
        a, b = on_test(a), on_test(b)
    print(report(a, b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
