"""``metalr report <results>``: tables and plots of an ablation study's records.

Seeds are aggregated per (task, optimizer, initial lr): mean and 95% confidence interval
(Student-t half-width ``t_{0.975,n-1} · s / √n``). A diverged run counts as an infinite loss, so a
cell with any diverged seed reads "diverged (k/n)". Writes into the results folder (or ``out``):

* ``report.md``: the setup (per task: size, examples per split, batch, parameters, steps, seeds);
  per task, final validation loss vs initial lr per optimizer; each optimizer at its best lr (with
  its final mean effective lr and how many lrs land within 10% of that best); links to the plots;
  a rank summary across tasks, with ties where 95% intervals overlap; the optimizers that were not
  installed. A legend under each table says what its columns measure;
* ``summary.csv``: one row per aggregated cell;
* ``<task>_sensitivity.png`` (final validation loss vs initial lr; a value above 2× the untrained
  loss is drawn at that cap and written beside it), ``<task>_loss_curves.png`` (validation loss
  vs step at each optimizer's best lr, mean ± CI band) and ``<task>_lr_trajectories.png`` (mean
  effective lr vs step, one line per initial lr) and ``<task>_lr_per_layer.png`` (metalr
  optimizers: each layer's effective lr vs step at the best initial lr; identical curves are
  drawn once and labelled "k identical").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The tables, plots and statistics live in report_markdown, report_plots and report_stats; every
# name this module had before that split is re-exported here (F401) and stays importable.
from metalr.meta.results import markdown_table, write_csv  # noqa: F401
from metalr.workbench.report_markdown import (  # noqa: F401
    BEST_TABLE_LEGEND,
    LR_TABLE_LEGEND,
    PLOTS,
    RANK_LEGEND,
    SETUP_LEGEND,
    markdown,
)
from metalr.workbench.report_plots import (  # noqa: F401
    CAP,
    LINESTYLES,
    MARKERS,
    NEAR,
    identical_groups,
    layer_figure,
    layer_spread,
    layers_overlap,
    loss_curves_figure,
    plots,
    sensitivity_figure,
    trajectories_figure,
)
from metalr.workbench.report_stats import (  # noqa: F401
    WITHIN,
    aggregate,
    best_rows,
    mean_ci,
    ranks,
    tied,
)
from metalr.workbench.runner import read_records


def _header(folder: Path, records: list[dict[str, Any]]) -> str:
    """Where the numbers came from: the last command (``study.json``), the code the records
    were run with (their own provenance: a results folder reused across commits keeps its
    cells, whose code the cache does not check), and the summed run time."""
    study = folder / "study.json"
    if not study.is_file():
        return ""
    info = json.loads(study.read_text())
    prov = info.get("provenance", {})
    seconds = sum(r.get("wall_time_s") or 0.0 for r in records)
    return (
        f"Study `{info.get('name')}`: `{prov.get('command')}`; {_code_of(records, prov)}; "
        f"torch {prov.get('torch_version')}, metalr {prov.get('metalr_version')}; "
        f"{prov.get('platform')}; {len(records)} runs, {seconds:.1f} s of run time in total.\n\n"
    )


def _code_of(records: list[dict[str, Any]], study: dict[str, Any]) -> str:
    """The git commit(s) the records were run at, marked when the tree had uncommitted changes,
    with a warning when they mix commits (a cell is rerun when its config changes, not when the
    code does: delete the folder, or pass a new ``out``, to rerun every cell)."""
    provs = [r.get("provenance") or {} for r in records] or [study]
    commits = sorted({str(p.get("git_commit")) for p in provs})
    dirty = " (uncommitted changes)" if any(p.get("git_dirty") for p in provs) else ""
    if len(commits) == 1:
        return f"git {commits[0]}{dirty}"
    return (f"**records from {len(commits)} commits** ({', '.join(c[:10] for c in commits)})"
            f"{dirty}: cells are reused across code changes; rerun in a fresh folder to compare "
            "one code version")  # fmt: skip


#: Keys every record of ``metalr ablate`` has (what the report groups by).
_ABLATE_KEYS = frozenset({"task", "optimizer", "lr", "seed"})


def report(results: str | Path, out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``summary.csv`` and the PNGs; returns the markdown and file paths."""
    results = Path(results)
    folder = results if results.is_dir() else results.parent
    records = read_records(results)
    if not records:
        raise FileNotFoundError(
            f"no records in {results} (expected records.jsonl from metalr ablate)"
        )
    foreign = next((r for r in records if not _ABLATE_KEYS <= r.keys()), None)
    if foreign is not None:
        missing = sorted(_ABLATE_KEYS - foreign.keys())
        raise ValueError(
            f"{results} holds records that are not metalr ablate's (one lacks {missing}): "
            "metalr report reads the records.jsonl of an ablation study"
        )
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(records, folder, out)
    text = _header(folder, records) + markdown(records, pngs)
    (out / "report.md").write_text(text)
    rows = [{k: v for k, v in r.items() if k != "ids"} for r in aggregate(records)]
    write_csv(rows, out / "summary.csv")
    return text, [out / "report.md", out / "summary.csv", *pngs]
