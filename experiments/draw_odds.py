"""How likely one 3-seed grid is to meet a count goal, from many-seed runs of every cell.

Study 1 and the issues' goals count a (task, lr0) cell when the 3-seed mean final validation loss
of the adaptive optimizer is at most 1.10× the lowest 3-seed mean of the fixed-rate optimizer over
the grid's five rates (best-of-grid, on the same seeds). ``reference_noise.py`` ran every row of
that grid on 12–60 seeds per task; this script resamples them: each draw picks 3 of a task's
seeds at random (without replacement, the same three for every row of the task, tasks drawn
independently — their seeds are independent runs), scores every cell as study 1 does and sums
the cells over the tasks. Over many draws that gives the distribution of the count a fresh
3-seed grid would report, so a goal's count can be read as a probability:

    P(count ≥ goal)        the chance one 3-seed grid meets the goal with today's rows;
    ceiling                the same count for an oracle that runs the fixed-rate optimizer at
                           the task's many-seed best rate from every lr0 (it passes a task's
                           five cells together): the criterion's own noise floor.

    python experiments/draw_odds.py            # writes results/reference_noise/draw_odds.md

A measurement of the criterion, not of a new optimizer: nothing is fitted on it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_controller import LRS
from one_run_goals import WITHIN
from reference_noise import (
    HELD_OUT_TASKS,
    RESULTS,
    STUDY1_TASKS,
    best_fixed_rate,
    mean_of,
    task_losses,
)

Losses = Mapping[str, float]  # reference_noise's "row|lr|seed" → final validation loss


def complete_seeds(losses: Losses, rows: Sequence[str]) -> list[int]:
    """The seeds on which every row in ``rows`` has a loss at every grid rate."""
    seeds = {int(k.rsplit("|", 1)[1]) for k in losses}
    return sorted(
        s for s in seeds
        if all(f"{r}|{lr:g}|{s}" in losses for r in rows for lr in LRS)
    )  # fmt: skip


def cells_within(losses: Losses, row: str, fixed: str, seeds: Sequence[int]) -> int:
    """Study 1's count on one task: ``row``'s cells (one per lr0) whose mean over ``seeds`` is
    within ``WITHIN`` of the best mean of ``fixed`` over the grid's rates on the same seeds."""
    ref = min(mean_of(losses, fixed, lr, seeds) for lr in LRS)
    return sum(mean_of(losses, row, lr, seeds) <= (1 + WITHIN) * ref for lr in LRS)


def oracle_within(losses: Losses, fixed: str, best_lr: float, seeds: Sequence[int]) -> int:
    """The count of a run at ``best_lr`` (the many-seed best fixed rate) from every lr0: 5 when
    its mean over ``seeds`` is within ``WITHIN`` of those seeds' best-of-grid, else 0."""
    ref = min(mean_of(losses, fixed, lr, seeds) for lr in LRS)
    return len(LRS) * (mean_of(losses, fixed, best_lr, seeds) <= (1 + WITHIN) * ref)


@dataclass
class Odds:
    """The distribution of one row's count over ``draws`` 3-seed grids."""

    counts: list[int]
    cells: int

    def at_least(self, goal: int) -> float:
        return sum(c >= goal for c in self.counts) / len(self.counts)

    def at_most(self, count: int) -> float:
        return sum(c <= count for c in self.counts) / len(self.counts)

    def quantile(self, q: float) -> int:
        ordered = sorted(self.counts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def mean(self) -> float:
        return statistics.mean(self.counts)


def draw_odds(
    tasks: Mapping[str, Losses], rows: Sequence[str], fixed: str, draws: int = 20000,
    seed: int = 0, k: int = 3,
) -> dict[str, Odds]:  # fmt: skip
    """Each row's count (and ``"ceiling"``'s) over ``draws`` grids of ``k`` seeds per task."""
    rng = random.Random(seed)
    prepared = []
    for losses in tasks.values():
        seeds = complete_seeds(losses, [fixed, *rows])
        if len(seeds) < k:
            raise ValueError(f"Invalid losses: {len(seeds)} complete seeds, expected ≥ {k}")
        best_lr, _ = best_fixed_rate(losses, fixed, seeds)
        prepared.append((losses, seeds, best_lr))
    counts: dict[str, list[int]] = {name: [] for name in [*rows, "ceiling"]}
    for _ in range(draws):
        total = dict.fromkeys(counts, 0)
        for losses, seeds, best_lr in prepared:
            chosen = rng.sample(seeds, k)
            for name in rows:
                total[name] += cells_within(losses, name, fixed, chosen)
            total["ceiling"] += oracle_within(losses, fixed, best_lr, chosen)
        for name, c in total.items():
            counts[name].append(c)
    cells = len(LRS) * len(tasks)
    return {name: Odds(c, cells) for name, c in counts.items()}


def load(folders: Sequence[Path], names: Sequence[str], suffix: str = "") -> dict[str, Losses]:
    """Each task's runs from the first of ``folders`` that has them (``<task><suffix>.json``)."""
    return {t: task_losses(folders, t, suffix) for t in names}


#: The many-seed runs under today's defaults: the few-shot task rerun since the option's short-run
#: tracking (``recommended_track``), the other tasks unchanged by it (``recommended_restart``).
ADAM_RUNS = (RESULTS / "recommended_track", RESULTS / "recommended_restart")
#: Since the noise hold (2026-12-07): AdamHD's defaults (``defaults_hold``) and the recommended
#: option (``recommended_hold``, which starts from the former's runs) beside the same Adam runs.
HOLD_RUNS = (RESULTS / "recommended_hold",)

#: (label, folders, file suffix, tasks, fixed row, {row: (its label, goal, observed on seeds 0–2)})
GOALS = (
    ("Adam rows, study 1's six tasks", HOLD_RUNS, "", STUDY1_TASKS, "adam",
     {"adam_hd": ("AdamHD defaults (#10 goal 1)", 24, 22),
      "candidate": ("+ recommended validation option (#11 goal 1)", 27, 26)}),
    ("Adam rows, the three held-out tasks", HOLD_RUNS, "", HELD_OUT_TASKS, "adam",
     {"adam_hd": ("AdamHD defaults (#10 goal 1, held out)", 12, 6),
      "candidate": ("+ recommended validation option (held out)", 14, 14)}),
    ("Adam rows, study 1's six tasks, before the noise hold", ADAM_RUNS, "", STUDY1_TASKS, "adam",
     {"adam_hd": ("AdamHD defaults before the noise hold", 24, 20),
      "candidate": ("+ recommended validation option (#11 goal 1)", 27, 28)}),
    ("Adam rows, the three held-out tasks, before the noise hold", ADAM_RUNS, "", HELD_OUT_TASKS,
     "adam", {"adam_hd": ("AdamHD defaults before the noise hold (held out)", 12, 5),
              "candidate": ("+ recommended validation option (held out)", 14, 14)}),
    ("SGD(m) rows, all nine tasks", (RESULTS,), "_sgd", STUDY1_TASKS + HELD_OUT_TASKS, "sgd",
     {"sgd_hd": ("SGD-HD defaults (#10 goal 5)", 32, 31)}),
)  # fmt: skip


def report(draws: int = 20000) -> str:
    intro = (
        f"Each row: the count of cells within {WITHIN:.0%} of best-of-grid on {draws} random "
        "3-seed grids drawn from the many-seed runs (`python experiments/draw_odds.py`). "
        "*Ceiling*: the fixed-rate optimizer itself at each task's many-seed best rate."
    )
    header = (
        "| row | cells | goal | observed (seeds 0–2) | mean count | 5–95% of draws | "
        "P(≥ goal) | P(≤ observed) |"
    )
    lines = [intro, "", header, "|---|---:|---:|---:|---:|---|---:|---:|"]
    for label, folders, suffix, names, fixed, rows in GOALS:
        odds = draw_odds(load(folders, names, suffix), list(rows), fixed, draws)
        goals = [g for _, g, _ in rows.values()]
        for name, (row_label, goal, observed) in rows.items():
            o = odds[name]
            lines.append(
                f"| {row_label} | {o.cells} | {goal} | {observed} | {o.mean:.1f} | "
                f"{o.quantile(0.05)}–{o.quantile(0.95)} | {o.at_least(goal):.0%} | "
                f"{o.at_most(observed):.0%} |"
            )
        c = odds["ceiling"]
        lines.append(
            f"| *ceiling: {fixed} at the best fixed rate ({label})* | {c.cells} | {max(goals)} | "
            f"– | {c.mean:.1f} | {c.quantile(0.05)}–{c.quantile(0.95)} | "
            f"{c.at_least(max(goals)):.0%} | – |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--out", default=str(RESULTS / "draw_odds.md"))
    args = parser.parse_args(argv)
    text = report(args.draws)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
