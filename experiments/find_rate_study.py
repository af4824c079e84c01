"""Finding the rate (issue 10, goal 4): how fast does AdamHD at defaults reach a task's best rate?

Protocol (fixed before the run): for each task of study 1, ``r*`` is the best fixed Adam rate of
study 1's grid (lowest final validation loss, mean over seeds; read from
``experiments/results/ablate_study1/records.jsonl``). AdamHD at defaults is started at
``lr0 = 1e-4 · r*`` and ``lr0 = 100 · r*`` (3 seeds, study 1's budgets), and every step records

* the effective rate: the size-weighted geometric mean of ``lr · m`` over the parameter tensors;
* the minibatch training loss.

Reported per (task, start): the first step at which the effective rate is within 2× of ``r*``
(goal ≤ 100; "never" if it does not get there), and from ``100 · r*`` the peak training loss over
the run divided by the first step's loss (goal ≤ 1.5). Means and ranges over seeds.

    python experiments/find_rate_study.py                 # after study 1 (~10 min on 2 cores)
    python experiments/find_rate_study.py --smoke         # seconds, tiny tasks

Writes ``experiments/results/find_rate/{records.jsonl, headline.md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from study_budgets import study_steps

import metalr
from metalr.workbench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
STUDY1 = ROOT / "experiments/results/ablate_study1/records.jsonl"
FACTORS = (1e-4, 100.0)
GOAL_STEPS, GOAL_PEAK = 100, 1.5


def best_adam_rates(path: Path) -> dict[str, float]:
    """Per task, the grid lr whose mean final validation loss (over seeds) is lowest for Adam."""
    losses: dict[tuple[str, float], list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("optimizer") != "adam" or r.get("status") == "not installed":
            continue
        v = r.get("final_val_loss")
        ok = r.get("status") != "diverged" and v is not None and math.isfinite(v)
        losses[(r["task"], r["lr"])].append(v if ok else math.inf)
    best: dict[str, tuple[float, float]] = {}
    for (task, lr), vs in losses.items():
        mean = sum(vs) / len(vs)
        if task not in best or mean < best[task][0]:
            best[task] = (mean, lr)
    return {task: lr for task, (_, lr) in best.items()}


def effective_rate(opt: metalr.AdamHD) -> float:
    """Size-weighted geometric mean of the per-tensor effective rates."""
    logs, sizes = [], []
    for p, rate in opt.effective_lrs().items():
        logs.append(float(torch.log(rate.double()).mean()))
        sizes.append(p.numel())
    return math.exp(sum(l * n for l, n in zip(logs, sizes)) / sum(sizes))


def run(
    task_name: str, size: str, lr0: float, seed: int, steps: int, spec: dict | None = None
) -> dict:
    """Per step, the effective rate and the minibatch loss of AdamHD at defaults (or of the
    workbench optimizer ``spec``) started at ``lr0``."""
    task = make_task(task_name, size, fallback_text=size == "smoke")
    model = task.model(seed)
    if spec is None:
        opt = metalr.AdamHD(model.parameters(), lr=lr0)
    else:
        from metalr.workbench.optimizers import build_for_model

        opt = build_for_model(spec, model, lr0, task)
    nxt = task.batches(seed)
    rates, losses = [], []
    for _ in range(steps):
        x, y = nxt()
        loss = task.loss(model(x), y)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        rates.append(effective_rate(opt))
    return {"rates": rates, "losses": losses}


def steps_to_within(rates: list[float], target: float, factor: float = 2.0) -> int | None:
    for i, r in enumerate(rates, start=1):
        if target / factor <= r <= target * factor:
            return i
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny tasks, 20 steps, 1 seed")
    p.add_argument("--out", default=str(ROOT / "experiments/results/find_rate"))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        best = {"digits_logreg": 1e-2, "fewshot_sinusoid": 1e-2}
        seeds, size = [0], "smoke"
    else:
        best, seeds, size = best_adam_rates(STUDY1), args.seeds, "full"
    tic = time.perf_counter()
    rows, records = [], []
    for task_name, r_star in best.items():
        steps = 20 if args.smoke else study_steps(task_name)
        for factor in FACTORS:
            hits, peaks = [], []
            for seed in seeds:
                res = run(task_name, size, factor * r_star, seed, steps)
                hit = steps_to_within(res["rates"], r_star)
                finite = [v for v in res["losses"] if math.isfinite(v)]
                peak = (max(finite) / finite[0]) if finite else math.inf
                if len(finite) < len(res["losses"]):
                    peak = math.inf
                hits.append(hit)
                peaks.append(peak)
                records.append({"task": task_name, "best_rate": r_star, "factor": factor,
                                "seed": seed, "steps_to_2x": hit, "peak_loss_ratio": peak,
                                "final_rate": res["rates"][-1] if res["rates"] else None})  # fmt: skip
            rows.append((task_name, r_star, factor, hits, peaks))
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = headline(rows, time.perf_counter() - tic, seeds)
    (out / "headline.md").write_text(text)
    print(text)
    return 0


def headline(rows: list[tuple], seconds: float, seeds: list[int]) -> str:
    def steps_cell(hits: list[int | None]) -> str:
        if any(h is None for h in hits):
            got = [h for h in hits if h is not None]
            return f"never on {len(hits) - len(got)}/{len(hits)}" + (
                f" (else {max(got)})" if got else ""
            )
        return f"{statistics.mean(hits):.0f} ({min(hits)}–{max(hits)})"

    header = ("| task | best fixed rate r* | start | steps to within 2× of r* (mean, range) | "
              "peak train loss ÷ first | goal |")  # fmt: skip
    lines = [header, "|---|---:|---|---:|---:|---|"]
    met_steps = met_peak = total = high = 0
    for task, r_star, factor, hits, peaks in rows:
        ok_steps = all(h is not None and h <= GOAL_STEPS for h in hits)
        ok_peak = factor < 1 or all(p <= GOAL_PEAK for p in peaks)
        total += 1
        met_steps += ok_steps
        if factor > 1:
            high += 1
            met_peak += ok_peak
        peak = "—" if factor < 1 else f"{max(peaks):.2f}"
        lines.append(f"| {task} | {r_star:g} | {factor:g}·r* | {steps_cell(hits)} | {peak} | "
                     f"{'met' if ok_steps and ok_peak else '**not met**'} |")  # fmt: skip
    return (f"## Finding the rate (issue 10, goal 4)\n\nAdamHD at defaults started at 1e-4× and "
            f"100× each task's best fixed Adam rate (study 1's grid), seeds {seeds}. Within 2× "
            f"of r* in ≤ {GOAL_STEPS} steps on every seed: **{met_steps}/{total}** (task, start) "
            f"cells; peak training loss ≤ {GOAL_PEAK}× the first from 100×: **{met_peak}/{high}**. "
            f"Wall time {seconds:.0f} s (`python experiments/find_rate_study.py`).\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
