"""Headlines and plots of issue 13's studies: 7 (transfer learning, layer-wise rates) and 8 (batch
size and the learning rate). Called by ``experiments/ablate_studies.py 7 8``; every function takes
the study's records (the newest per (task, optimizer, lr, seed)) so tests can feed it fixtures.

Study 7 (``configs/ablate_study7_transfer.yaml``): per task, each method's final validation and
test loss (mean ± 95% CI over seeds), the runs it spent, what its search chose; AdamHD's learned
per-layer rates (final, mean over seeds) beside the tuned layer-wise schedule lr × γ^depth; a plot
of the learned per-layer trajectories next to the hand-made schedule (``<task>_layer_rates.png``).

Study 8 (``configs/ablate_study8_batch_size.yaml``): per task and batch size, the best fixed Adam
rate of the grid, the rate AdamHD ends at (size-weighted geometric mean of lr × multiplier), with
and without warmup, and the final loss of AdamHD against Adam tuned per batch size and Adam at the
linear and square-root rules from the smallest batch's best rate; the fitted exponent of
rate ∝ batch^k for each; a plot (``<task>_batch_size.png``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from metalr.workbench.report import mean_ci

S7_BASELINES = {"adam_tuned": "Adam, one rate (tuned)",
                "adam_freeze_tuned": "Adam, body frozen 30% then unfrozen (tuned)",
                "adam_llrd_tuned": "Adam, layer-wise decay lr·γ^depth (lr, γ tuned)"}  # fmt: skip
S7_METALR = {
    "adam_hd": "AdamHD at defaults (tensor)",
    "adam_hd_prior": "AdamHD + meta-learned prior",
}


def _vals(recs: list[dict], key: str) -> list[float]:
    out = []
    for r in recs:
        v = r.get(key)
        bad = r.get("status") == "diverged" or v is None or not math.isfinite(v)
        out.append(math.inf if bad else float(v))
    return out


def _ci(values: list[float]) -> str:
    m, h = mean_ci(values)
    if not math.isfinite(m):
        return "diverged"
    return f"{m:.4f}" if not math.isfinite(h) else f"{m:.4f} ± {h:.4f}"


def _md(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def _group(records: list[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        g[(r["task"], r["optimizer"], r["lr"])].append(r)
    return g


# ------------------------------------------------------------------------------------- study 7
def _is_weight(name: str) -> bool:
    return not name.rsplit(".", 1)[-1].startswith("bias")


def depth_rates(layers: dict[str, list[float]], at: int = -1) -> dict[str, float]:
    """Rate per layer (the module owning the tensors; biases left out, several weight tensors of
    one layer, e.g. a GRU's ``weight_ih``/``weight_hh``, by their geometric mean) at curve index
    ``at``, in ``named_parameters`` order (head last)."""
    owners: dict[str, list[float]] = {}
    for n, v in layers.items():
        if _is_weight(n):
            owners.setdefault(n.rsplit(".", 1)[0], []).append(v[at])
    return {o: _geo(v) for o, v in owners.items()}


def _layer_curves(layers: dict[str, list[float]]) -> dict[str, list[float]]:
    owners = list(depth_rates(layers))
    steps = len(next(iter(layers.values())))
    per = [depth_rates(layers, i) for i in range(steps)]
    return {o: [p[o] for p in per] for o in owners}


def headline7(records: list[dict], results: Path | None = None) -> str:
    g = _group(records)
    tasks = sorted({k[0] for k in g})
    out = ["## Study 7: transfer learning with layer-wise rates\n"]
    summary = []
    for task in tasks:
        rows, test_means = [], {}
        for opt, label in {**S7_BASELINES, **S7_METALR}.items():
            for (ta, o, lr), rs in sorted(g.items(), key=lambda kv: kv[0][2] or 0):
                if ta != task or o != opt:
                    continue
                rs = sorted(rs, key=lambda r: r["seed"])
                ex = [r.get("extra") or {} for r in rs]
                runs = (ex[0].get("trials", 0) + 1) if ex[0].get("trials") else 1
                if "layer_decay" in ex[0]:
                    pick = ", ".join(
                        f"{r['lr_used']:.2g}/γ{e['layer_decay']:.2f}" for r, e in zip(rs, ex)
                    )
                elif ex[0].get("trials"):
                    pick = ", ".join(f"{r['lr_used']:.2g}" for r in rs)
                else:
                    pick = "prior" if lr is None else f"lr0 {lr:g}"
                val, test = _vals(rs, "final_val_loss"), _vals(rs, "final_test_loss")
                test_means[(opt, lr)] = mean_ci(test)
                rows.append([label, runs, pick, _ci(val), _ci(test), len(rs)])
        out.append(f"### {task}\n\nFinal validation and test loss (mean ± 95% CI over seeds); runs: "
                   "full-length training runs per seed (search trials + the retrain); the tuned "
                   "baselines chose their lr (and γ) on the validation split, so test loss is the "
                   "fair column.\n\n"
                   + _md(["method", "runs", "chosen per seed", "val loss", "test loss", "seeds"],
                         rows))  # fmt: skip
        if test_means:
            (w_opt, w_lr), (w_m, w_h) = min(test_means.items(), key=lambda kv: kv[1][0])
            ties = [f"{o}" + ("" if l is None or o != "adam_hd" else f"@{l:g}")
                    for (o, l), (m, h) in test_means.items()
                    if (o, l) != (w_opt, w_lr) and math.isfinite(m) and m - (h if math.isfinite(h) else 0)
                    <= w_m + (w_h if math.isfinite(w_h) else 0)]  # fmt: skip
            name = w_opt + ("" if w_lr is None or w_opt != "adam_hd" else f"@{w_lr:g}")
            summary.append(f"{task}: lowest test loss **{name}** ({w_m:.4f}); 95% intervals "
                           f"overlapping it: {', '.join(ties) if ties else 'none'}")  # fmt: skip
        out.append(_layer_table(task, g))
        if results is not None:
            png = layer_plot(task, g, results)
            if png:
                out.append(f"![{task}: learned vs hand-made layer-wise rates]({png.name})\n")
    return "\n".join(out[:1] + ["**Who wins (test loss):** " + "; ".join(summary) + ".\n"]
                     + out[1:])  # fmt: skip


def _layer_table(task: str, g: dict) -> str:
    hd = g.get((task, "adam_hd", 1e-3), [])
    llrd = g.get((task, "adam_llrd_tuned", None), [])
    if not hd or not all(r.get("_curves", {}).get("lr_layers") for r in hd):
        return ""
    per = [depth_rates(r["_curves"]["lr_layers"]) for r in hd]
    prior = [r["_curves"]["lr_layers"] for r in g.get((task, "adam_hd_prior", None), [])
             if r.get("_curves", {}).get("lr_layers")]  # fmt: skip
    start = [depth_rates(p, 0) for p in prior]
    layers = list(per[0])
    rows = []
    for i, layer in enumerate(layers):
        depth = len(layers) - 1 - i
        rates = [p[layer] for p in per]
        rel = [p[layer] / p[layers[-1]] for p in per]
        gam = [(r["extra"]["layer_decay"] ** depth) for r in llrd]
        lr = [r["lr_used"] * r["extra"]["layer_decay"] ** depth for r in llrd]
        rows.append([layer, depth, f"{_geo(rates):.3g}", f"{_geo(rel):.3g}",
                     f"{_geo(lr):.3g}" if lr else "—", f"{_geo(gam):.3g}" if gam else "—",
                     f"{_geo([s[layer] / s[layers[-1]] for s in start]):.3g}" if start else "—"])  # fmt: skip
    return (
        "\nLayer-wise rates (per layer: its weight tensors' geometric mean, biases left out; "
        "geometric mean over seeds): AdamHD's final effective "
        "rate (from lr0 1e-3) and its ratio to the head's, beside the tuned layer-wise schedule "
        "(lr·γ^depth, and γ^depth = its ratio to the head's) and the meta-learned prior's "
        "starting rates ÷ its head rate:\n\n"
        + _md(
            [
                "layer",
                "depth",
                "AdamHD final rate",
                "÷ head",
                "tuned lr·γ^d",
                "γ^d",
                "prior start ÷ head",
            ],
            rows,
        )
    )


def _geo(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def layer_plot(task: str, g: dict, results: Path) -> Path | None:
    """AdamHD's per-layer effective rates vs step (seed 0, lr0 1e-3; solid) beside the tuned
    layer-wise schedule of the same seed (dashed, same colour per depth) and AdamHD started from
    the meta-learned prior (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hd = [r for r in g.get((task, "adam_hd", 1e-3), []) if r.get("_curves", {}).get("lr_layers")]
    if not hd:
        return None
    r = min(hd, key=lambda r: r["seed"])
    curves = r["_curves"]
    by_layer = _layer_curves(curves["lr_layers"])
    layers = list(by_layer)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    llrd = [x for x in g.get((task, "adam_llrd_tuned", None), []) if x["seed"] == r["seed"]]
    for i, name in enumerate(layers):
        depth = len(layers) - 1 - i
        c = colors[i % len(colors)]
        ax.plot(curves["step"], by_layer[name], color=c, label=f"AdamHD {name} (depth {depth})")
        if llrd:
            rate = llrd[0]["lr_used"] * llrd[0]["extra"]["layer_decay"] ** depth
            ax.axhline(rate, color=c, ls="--", lw=1)
    prior = [x for x in g.get((task, "adam_hd_prior", None), [])
             if x["seed"] == r["seed"] and x.get("_curves", {}).get("lr_layers")]  # fmt: skip
    prior_layers = _layer_curves(prior[0]["_curves"]["lr_layers"]) if prior else {}
    for i, name in enumerate(layers if prior else []):
        c = colors[i % len(colors)]
        ax.plot(prior[0]["_curves"]["step"], prior_layers[name], color=c, ls=":", lw=1.2)
    if prior:
        ax.plot([], [], "k:", lw=1.2, label="AdamHD + meta-learned prior")
    if llrd:
        ax.plot(
            [], [], "k--", lw=1, label=f"tuned lr·γ^depth (γ={llrd[0]['extra']['layer_decay']:.2f})"
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective learning rate")
    ax.set_title(
        f"{task}, seed {r['seed']}: AdamHD per-layer rates vs tuned lr·γ^depth", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = results / f"{task}_layer_rates.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- study 8
def _bs(opt: str) -> int:
    return int(opt.rsplit("_bs", 1)[1])


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent k of y ∝ x^k (log-log)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def batch_table(records: list[dict], task: str) -> dict[int, dict]:
    """Per batch size: the Adam grid's best lr and loss, the rule lrs, AdamHD's end rates."""
    g = _group(records)
    sizes = sorted({_bs(o) for (t, o, _) in g if t == task and "_bs" in o})
    grid = {b: {lr: rs for (t, o, lr), rs in g.items() if t == task and o == f"adam_bs{b}"}
            for b in sizes}  # fmt: skip

    def mean(rs: list[dict]) -> tuple[float, float]:
        return mean_ci(_vals(rs, "final_val_loss"))

    rows: dict[int, dict] = {}
    b0 = sizes[0]
    best0 = min(grid[b0], key=lambda lr: mean(grid[b0][lr])[0])
    lrs = sorted(grid[b0])
    for b in sizes:
        best = min(grid[b], key=lambda lr: mean(grid[b][lr])[0])
        row = {"best_lr": best, "best": grid[b][best], "grid": grid[b]}
        for rule, power in (("linear", 1.0), ("sqrt", 0.5)):
            want = best0 * (b / b0) ** power
            hit = [lr for lr in lrs if abs(math.log(lr / want)) < 1e-6]
            row[f"{rule}_lr"] = want
            row[rule] = grid[b].get(hit[0]) if hit else None
        for o in ("adam_hd", "adam_hd_warmup"):
            rs = [r for (t, oo, _), x in g.items() if t == task and oo == f"{o}_bs{b}" for r in x]
            row[o] = rs
            row[f"{o}_rate"] = _geo([r["final_lr"]["geomean"] for r in rs]) if rs else math.nan
            peaks = [max(r["_curves"]["lr_mean"]) for r in rs if r.get("_curves")]
            row[f"{o}_peak"] = _geo(peaks) if peaks else math.nan
        rows[b] = row
    return rows


def _cell(rs: list[dict] | None) -> str:
    """A loss cell of study 8: "off grid" for a rule rate outside the grid."""
    if rs is None:
        return "off grid"
    return _ci(_vals(rs, "final_val_loss")) if rs else "—"


def headline8(records: list[dict], results: Path | None = None) -> str:
    tasks = sorted({r["task"] for r in records})
    out = ["## Study 8: batch size and the learning rate\n"]
    for task in tasks:
        rows = batch_table(records, task)
        table, sizes = [], sorted(rows)
        for b, row in rows.items():
            table.append([b, row["best"][0]["steps"], f"{row['best_lr']:.3g}",
                          f"{row['adam_hd_rate']:.3g}", f"{row['adam_hd_peak']:.3g}",
                          f"{row['adam_hd_warmup_rate']:.3g}",
                          _cell(row["best"]), _cell(row["adam_hd"]), _cell(row["adam_hd_warmup"]),
                          f"{_cell(row['linear'])} @{row['linear_lr']:.3g}",
                          f"{_cell(row['sqrt'])} @{row['sqrt_lr']:.3g}"])  # fmt: skip
        k = {name: _slope(sizes, [rows[b][key] for b in sizes]) for name, key in
             (("best Adam", "best_lr"), ("AdamHD end", "adam_hd_rate"),
              ("AdamHD peak", "adam_hd_peak"), ("AdamHD+warmup end", "adam_hd_warmup_rate"))}  # fmt: skip
        out.append(f"### {task}\n\nExponent k of rate ∝ batch^k (log-log fit over the batch sizes; "
                   "linear rule 1, square-root rule 0.5): "
                   + ", ".join(f"{n} **{v:.2f}**" for n, v in k.items()) + ".\n\n"
                   "Final validation loss, mean ± 95% CI over seeds (best Adam: the grid point with "
                   "the lowest mean, selected on the same split: an oracle). Rates: AdamHD's end "
                   "rate is the size-weighted geometric mean of lr × multiplier at the last step; "
                   "its peak rate the largest size-weighted mean rate of any logged step (every "
                   "25 steps; the scale the ramp found before tracking annealed it); geometric "
                   "means over seeds.\n\n"
                   + _md(["batch", "steps", "best Adam lr", "AdamHD end rate", "AdamHD peak rate",
                          "AdamHD+warmup end rate", "best Adam", "AdamHD", "AdamHD+warmup",
                          "Adam linear rule", "Adam sqrt rule"], table))  # fmt: skip
        if results is not None:
            png = batch_plot(task, rows, results)
            out.append(f"![{task}: rate and loss vs batch size]({png.name})\n")
    return "\n".join(out)


def batch_plot(task: str, rows: dict[int, dict], results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(sizes, [rows[s]["best_lr"] for s in sizes], "ko-", label="best fixed Adam lr (grid)")
    a.plot(sizes, [rows[s]["adam_hd_rate"] for s in sizes], "s-", label="AdamHD end rate")
    a.plot(sizes, [rows[s]["adam_hd_peak"] for s in sizes], "s:", label="AdamHD peak rate")
    a.plot(
        sizes, [rows[s]["adam_hd_warmup_rate"] for s in sizes], "^-", label="AdamHD+warmup end rate"
    )
    a.plot(sizes, [rows[s]["linear_lr"] for s in sizes], ":", label="linear rule from batch 16")
    a.plot(sizes, [rows[s]["sqrt_lr"] for s in sizes], "--", label="sqrt rule from batch 16")
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="learning rate", title=task)
    a.legend(fontsize=7)
    series = {"best Adam": "best", "AdamHD": "adam_hd", "AdamHD+warmup": "adam_hd_warmup",
              "Adam linear rule": "linear", "Adam sqrt rule": "sqrt"}  # fmt: skip
    for label, key in series.items():
        ys = [mean_ci(_vals(rows[s][key], "final_val_loss"))[0] if rows[s][key] else math.nan
              for s in sizes]  # fmt: skip
        b.plot(sizes, [y if math.isfinite(y) else math.nan for y in ys], "o-", label=label)
    b.set(xscale="log", yscale="log", xlabel="batch size", ylabel="final validation loss (mean)")
    b.legend(fontsize=7)
    fig.tight_layout()
    path = results / f"{task}_batch_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attach_curves(records: list[dict], folder: Path) -> list[dict]:
    """Each record with its curves under ``_curves`` (when the curves file is still there)."""
    for r in records:
        path = folder / str(r.get("curves") or "")
        if r.get("curves") and path.is_file():
            r["_curves"] = json.loads(path.read_text())
    return records
