"""Which way the greedy hypergradient points at each task's best fixed Adam rate (a probe).

    python experiments/results/greedy_sign/probe.py            # 84 runs, ~8 min on 2 cores
    python experiments/results/greedy_sign/probe.py --table    # the table from runs.jsonl

Adam at each development task's best fixed rate (the 12-60-seed references of
``../reference_noise/``; the development transformer's from its grid) and at 1/3, 3 and 10
times it, on probe seeds 1200-1202, at each task's budget. Every 20 steps it records the mean cosine of the
gradient with the last parameter change, ``cos(g_t, Δθ_{t-1})`` (``signals.py trace``): positive
means the one-step hypergradient says "the rate is too large", negative "too small". A rule that
follows it settles where it averages zero. The table gives its mean over the second half of each
run, its size-weighted mean over parameter tensors of each tensor's own cosine (what the rule
reads per tensor), the same for the gradient's cosine with discounted trails of the steps taken
(``Z_t = μ Z_{t-1} + Δθ_t``, μ 0.9 and 0.99: the seek rule's ``horizon`` option reads such a
trail), and the final validation loss. Runs append to ``runs.jsonl`` as they finish (a rerun skips
what is there). Held-out tasks are not read.
"""

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "dev_transformer" / "probe"))

#: Best fixed Adam rate per development task (see the module docstring for the sources).
BEST_RATE = {
    "digits_logreg": 1e-2,
    "digits_mlp": 1e-3,
    "mnist1d_mlp": 1e-4,
    "fewshot_sinusoid": 1e-2,
    "charlm_gru": 1e-2,
    "animal_cnn": 1e-3,
    "kjv_transformer": 1e-2,
}
SEEDS = (1200, 1201, 1202)
#: Rates run, as multiples of the best fixed one (1/3 and 3 added after the first table, to read
#: the signal's change within a factor of 3 directly instead of from a decade).
FACTORS = (1 / 3, 1, 3, 10)
OUT = HERE / "runs.jsonl"


def _one(job):
    from signals import run_probe

    task, factor, seed = job
    rows = list(run_probe("trace", task, BEST_RATE[task] * factor, seed, {"kind": "adam"}))
    return {"task": task, "factor": factor, "seed": seed, "rows": rows}


def _done():
    if not OUT.exists():
        return []
    return [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]


def table(records):
    """Markdown: per task and factor, the second-half mean cosine and final val (seed means)."""
    lines = [
        "| task | rate | cos(g, Δθ), 2nd half, per seed | mean | per tensor | trail μ 0.9 | "
        + "trail μ 0.99 | final val (mean) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for task, best in BEST_RATE.items():
        for factor in FACTORS:
            runs = [r for r in records if r["task"] == task and r["factor"] == factor]
            if not runs:
                continue
            cos, per_tensor, trail = [], [], {"0.9": [], "0.99": []}
            for r in sorted(runs, key=lambda r: r["seed"]):
                half = r["rows"][len(r["rows"]) // 2 :]
                cos.append(sum(row["cos"] for row in half) / len(half))
                per_tensor.append(sum(row["tensor_cos"] for row in half) / len(half))
                for mu, values in trail.items():
                    values.append(sum(row["trail_cos"][mu] for row in half) / len(half))
            val = [r["rows"][-1]["val"] for r in runs]
            val = [v for v in val if math.isfinite(v)]
            mean_val = f"{sum(val) / len(val):.4f}" if val else "diverged"
            lines.append(
                f"| {task} | {best * factor:.2g} | "
                f"{' '.join(f'{c:+.3f}' for c in cos)} | {sum(cos) / len(cos):+.3f} | "
                f"{sum(per_tensor) / len(cos):+.3f} | "
                f"{sum(trail['0.9']) / len(cos):+.3f} | {sum(trail['0.99']) / len(cos):+.3f} | "
                f"{mean_val} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not args.table:
        have = {(r["task"], r["factor"], r["seed"]) for r in _done()}
        jobs = [(t, f, s) for f in FACTORS for s in SEEDS for t in BEST_RATE]
        jobs = [j for j in jobs if j not in have]
        with ProcessPoolExecutor(args.workers) as pool:
            for record in pool.map(_one, jobs):
                with OUT.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(record["task"], record["factor"], record["seed"], flush=True)
    print(table(_done()))


if __name__ == "__main__":
    main()
