"""Does the validation gradient along the ray of travel say a rate is too high? (a probe)

The validation option's hypergradient is greedy: −⟨∇L_val(θ_t), d_{t−1}⟩ asks whether the *last*
step should have been longer. On the tasks that overfit within the budget, the damage of a rate
above the best fixed one is done before any one-step signal turns (README, issue 11). This probe
measures a long-horizon alternative, the *ray cosine*

    c_t = cos(∇L_val(θ_t), θ_t − θ_0)

— the sign of d/dα L_val(θ_0 + α(θ_t − θ_0)) at α = 1: positive when less travel along the path
so far would have given a lower validation loss (MARTHE's forward-mode hypergradient with every
step's Jacobian taken as the identity and no discount). Two tables:

* ``fixed``: Adam at fixed rates; per (task, rate): the final validation loss, the first logged
  step where c_t > 0 and the mean of c_t over the second half of the run (whole validation split
  at every logged step);
* ``controller``: AdamHD at its defaults from ``--lr0`` against the same run with a crude
  controller wrapped around it (not in the library): every ``--every`` steps, if c_t > 0 the
  parameters go back to the last observation where it was not, every rate is cut ×``--cut``
  (the groups' ``lr``) and θ_0 moves to the rewound point (``--window w``: only in the first
  fraction w of the run); or (``--budget f``) once only, at the first c_t > τ before step f·T,
  cut by max(φ, t/(f·T)) — the rate that would overshoot at f of the budget if the overshoot's
  step scales as 1/rate; mean final validation loss over seeds.

Development only: seeds 100–102 by default (study 1 runs seeds 0–2, the checks other sets).
Usage::

    python experiments/ray_signal_probe.py fixed --tasks digits_mlp,digits_logreg --seeds 0
    python experiments/ray_signal_probe.py controller --tasks digits_mlp --seeds 100,101,102
    python experiments/ray_signal_probe.py summary --tables A.md,B.md --reference REF.json \\
        --out experiments/results/ray_signal/summary.md
    python experiments/ray_signal_probe.py summary --checks DIR/base.json,DIR/rule.json \
        --metric test       # writes DIR/summary_test.md
    python experiments/ray_signal_probe.py fixed --size smoke --steps 20 --every 5   # CI
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from study_budgets import study_steps

from metalr.workbench import optimizers as O
from metalr.workbench.runner import _task

FIXED_LRS = "1e-4,1e-3,3e-3,1e-2,3e-2,1e-1"
OUT = Path(__file__).parent / "results" / "ray_signal"


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def ray_cosine(task, model, seed: int, anchor: torch.Tensor) -> float:
    """cos(∇L_val(θ), θ − anchor) on the run's whole validation split (0 before any travel)."""
    params = list(model.parameters())
    x, y = task.splits(seed)[1]
    grads = torch.autograd.grad(task.loss(model(x), y), params)
    g, travel = _flat(list(grads)), _flat(params) - anchor
    norm = float(g.norm() * travel.norm())
    return float(g @ travel) / norm if norm > 0 else 0.0


def run(task, spec: dict, lr: float, seed: int, steps: int, every: int | None,
        controller: dict | None = None) -> dict:  # fmt: skip
    """One run; ``controller`` wraps a ray-cut-and-rewind rule around it: ``{"cut": κ, "window":
    w}`` cuts ×κ at every c_t > 0 in the first fraction ``w`` of the run; ``{"budget": f, "tau":
    τ, "floor": φ}`` acts once, at the first c_t > τ before step f·T (before w·T with ``"act_before":
    w``), cutting by max(φ, t / (f·T)): the rate that would put the overshoot at f of the budget if
    its step scales as 1 / rate (``"persist": k``: at the k-th look in a row with c_t > τ; the
    rewind goes back to the look before the first of them). With ``"cap": True`` the cut is a ceiling instead: from then on
    the mean effective rate (``lr_summary``) is held at most at the factor × its value at the
    action, by scaling the groups' ``lr`` after each step — AdamHD's ramp and tracking climb back
    over a plain cut of ``lr`` (they target the edge whatever ``lr`` is), not over a ceiling."""
    model = task.model(seed)
    opt = O.build_for_model(spec, model, lr, task)
    params = list(model.parameters())
    anchor, snapshot = _flat(params).clone(), None
    nxt, cosines, acted, ceiling, streak = task.batches(seed), [], False, None, 0
    for step in range(1, steps + 1):
        x, y = nxt()
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
        if ceiling is not None and (rate := O.lr_summary(opt)["mean"]) > ceiling:
            for group in opt.param_groups:
                group["lr"] *= ceiling / rate
        if every is None or step % every:  # None: no looks (a run without the rule)
            continue
        c = ray_cosine(task, model, seed, anchor)
        cosines.append((step, c))
        if controller is None:
            continue
        if "budget" in controller:
            horizon = controller["budget"] * steps
            before = controller.get("act_before", controller["budget"]) * steps
            streak = streak + 1 if c > controller["tau"] else 0
            act = not acted and streak >= controller.get("persist", 1) and step < before
            factor = max(controller["floor"], step / horizon)
        else:
            act = c > 0 and step <= controller["window"] * steps
            factor = controller["cut"]
        if act:
            acted = True
            if controller.get("cap"):
                ceiling = factor * O.lr_summary(opt)["mean"]
            else:
                for group in opt.param_groups:
                    group["lr"] *= factor
            if snapshot is not None:
                with torch.no_grad():
                    for p, s in zip(params, snapshot):
                        p.copy_(s)
            anchor = _flat(params).clone()
        elif c <= controller.get("tau", 0.0):  # the last look that did not read an overshoot
            snapshot = [p.detach().clone() for p in params]
    lrs = [group["lr"] for group in opt.param_groups]
    return {"final_val": task.evaluate(model, "val", seed), "cosines": cosines, "lrs": lrs,
            "rate": O.lr_summary(opt)["mean"], "final_test": task.evaluate(model, "test", seed)}  # fmt: skip


def fixed_table(args) -> list[str]:
    lines = ["| task | Adam lr | seed | final val | first step c > 0 | mean c, 2nd half |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.tasks.split(","):
        task = _task(name, args.size, "cpu", args.size == "smoke")
        steps = args.steps or study_steps(name)
        for lr in (float(v) for v in args.lrs.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run(task, {"kind": "adam"}, lr, seed, steps, args.every)
                first = next((s for s, c in r["cosines"] if c > 0), None)
                late = [c for s, c in r["cosines"] if s > steps / 2] or [0.0]
                lines.append(f"| {name} | {lr:g} | {seed} | {r['final_val']:.4f} | "
                             f"{'—' if first is None else first} | {statistics.mean(late):+.3f} |")  # fmt: skip
                print(lines[-1], flush=True)
    return lines


def controller_table(args) -> list[str]:
    if args.budget is not None and args.cap:
        head = (f"+ one ray rewind and ceiling, budget {args.budget:g}, acting before "
                f"{args.act_before:g}, τ {args.tau:g}, floor {args.floor:g}"
                + (f", {args.persist} looks in a row" if args.persist > 1 else ""))  # fmt: skip
        rule = {"budget": args.budget, "tau": args.tau, "floor": args.floor, "cap": True,
                "act_before": args.act_before, "persist": args.persist}  # fmt: skip
    elif args.budget is None:
        head = f"+ ray cut ×{args.cut:g} and rewind, window {args.window:g}"
        rule = {"cut": args.cut, "window": args.window}
    else:
        head = f"+ one ray rewind, budget {args.budget:g}, τ {args.tau:g}, floor {args.floor:g}"
        rule = {"budget": args.budget, "tau": args.tau, "floor": args.floor}
    lines = [f"| task | lr0 | AdamHD | {head} | per seed | AdamHD, test | with the rule, test |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.tasks.split(","):
        task = _task(name, args.size, "cpu", args.size == "smoke")
        steps = args.steps or study_steps(name)
        for lr in (float(v) for v in args.lrs.split(",")):
            base = [run(task, {"kind": "adam_hd"}, lr, s, steps, None) for s in seeds]
            ray = [run(task, {"kind": "adam_hd"}, lr, s, steps, args.every, rule) for s in seeds]
            mean = lambda runs, key: statistics.mean(r[key] for r in runs)
            per_seed = ", ".join(f"{a['final_val']:.3f}→{b['final_val']:.3f}"
                                 for a, b in zip(base, ray))  # fmt: skip
            lines.append(f"| {name} | {lr:g} | {mean(base, 'final_val'):.4f} | "
                         f"{mean(ray, 'final_val'):.4f} | {per_seed} | "
                         f"{mean(base, 'final_test'):.4f} | {mean(ray, 'final_test'):.4f} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def summary_table(args) -> list[str]:
    """Controller tables against a reference (task → best-of-grid Adam's loss on the same seeds):
    cells within 10% for each column, and the paired mean log-ratio (rule ÷ defaults) with a 95%
    bootstrap interval over the cells (``compare_checks.bootstrap_interval``)."""
    import json
    import math
    import random

    from compare_checks import bootstrap_interval

    if args.checks:
        reference, cells = _check_cells(args.checks.split(","), args.metric)
        args.tables = ""
    else:
        reference = json.loads(Path(args.reference).read_text())
        cells = []  # (task, lr0, defaults, with the rule)
    columns = (2, 3) if args.metric == "val" else (5, 6)
    for path in filter(None, args.tables.split(",")):
        for line in Path(path).read_text().splitlines():
            c = [x.strip() for x in line.strip().strip("|").split("|")]
            if line.startswith("| ") and c[0] in reference:
                cells.append((c[0], float(c[1]), *(float(c[k]) for k in columns)))
    within = [sum(c[k] / reference[c[0]] <= 1.1 for c in cells) for k in (2, 3)]
    logs = [math.log(r / b) for _, _, b, r in cells]
    mean = statistics.mean(logs)
    lo, hi = bootstrap_interval(list(range(len(logs))),
                                lambda idx: statistics.mean(logs[i] for i in idx), random.Random(0))  # fmt: skip
    head = (f"{len(cells)} cells; within 10% of the reference: defaults {within[0]}, with the "
            f"rule {within[1]}; paired mean log-ratio {mean:+.3f} (95% interval {lo:+.3f} to "
            f"{hi:+.3f})")  # fmt: skip
    lines = [
        head,
        "",
        "| task | mean log-ratio | defaults ÷ ref | rule ÷ ref |",
        "|---|---|---|---|",
    ]
    for task in sorted({c[0] for c in cells}):
        mine = [c for c in cells if c[0] == task]
        shift = statistics.mean(math.log(c[3] / c[2]) for c in mine)
        ratios = [", ".join(f"{c[k] / reference[task]:.2f}" for c in mine) for k in (2, 3)]
        lines.append(f"| {task} | {shift:+.3f} | {ratios[0]} | {ratios[1]} |")
    return lines


def _check_cells(paths: list[str], metric: str) -> tuple[dict, list]:
    """The summary's reference and cells from two ``check_controller.py --out`` files (the
    defaults, then the rule; the same seeds): each cell's seed-mean loss, validation or test."""
    import json

    base, rule = (json.loads(Path(p).read_text()) for p in paths)
    if base["seeds"] != rule["seeds"]:
        raise ValueError("the two check files must share their seeds")
    key, ref = ("losses", "reference") if metric == "val" else ("test_losses", "test_reference")
    cells = []
    for cell, losses in base[key].items():
        task, lr = cell.split("|")
        cells.append((task, float(lr), statistics.mean(losses), statistics.mean(rule[key][cell])))
    return base[ref], cells


def default_out(args) -> Path:
    """Where a table goes without ``--out``: a summary of two check files beside the first of
    them (``summary_<metric>.md``: the check's own folder, not the folder-wide summary another
    comparison wrote), any other table in ``experiments/results/ray_signal/<table>.md``."""
    if args.table == "summary" and args.checks:
        return Path(args.checks.split(",")[0]).parent / f"summary_{args.metric}.md"
    return OUT / f"{args.table}.md"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("table", choices=("fixed", "controller", "summary"))
    ap.add_argument("--tables", default=None, help="summary: controller tables, comma-separated")
    ap.add_argument("--reference", default=None, help="summary: task → reference loss (JSON)")
    ap.add_argument("--checks", default=None,
                    help="summary: instead of tables, two check_controller.py --out files "
                         "(defaults,rule) with their references")  # fmt: skip
    ap.add_argument(
        "--metric",
        choices=("val", "test"),
        default="val",
        help="summary: the tables' validation (default) or test columns",
    )
    ap.add_argument("--tasks", default="digits_mlp,digits_logreg,mnist1d_mlp,fewshot_sinusoid")
    ap.add_argument("--lrs", default=None, help=f"fixed: {FIXED_LRS}; controller: 1e-3")
    ap.add_argument("--seeds", default="100,101,102")
    ap.add_argument("--steps", type=int, default=None, help="default: study 1's budget per task")
    ap.add_argument("--every", type=int, default=None, help="fixed: 50, controller: 20")
    ap.add_argument("--cut", type=float, default=0.3)
    ap.add_argument("--window", type=float, default=1.0, help="cut only in this first fraction")
    ap.add_argument("--budget", type=float, default=None, help="the one-rewind rule's f")
    ap.add_argument("--tau", type=float, default=0.005, help="the one-rewind rule's threshold")
    ap.add_argument("--floor", type=float, default=0.1, help="the one-rewind rule's deepest cut")
    ap.add_argument("--cap", action="store_true", help="the one-rewind rule sets a ceiling")
    ap.add_argument("--persist", type=int, default=1, help="looks in a row with c > tau to act")
    ap.add_argument("--act-before", type=float, default=None, help="act only before this fraction")
    ap.add_argument("--size", default="full", choices=("full", "smoke"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.lrs = args.lrs or (FIXED_LRS if args.table == "fixed" else "1e-3")
    args.every = args.every or (50 if args.table == "fixed" else 20)
    if args.act_before is None:
        args.act_before = args.budget
    torch.set_num_threads(1)
    make = {"fixed": fixed_table, "controller": controller_table, "summary": summary_table}
    lines = make[args.table](args)
    command = "python experiments/ray_signal_probe.py " + " ".join(argv or sys.argv[1:])
    text = "\n".join([f"`{command}`", "", *lines]) + "\n"
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    main()
