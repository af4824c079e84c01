"""Carry a study's records to its cells' new ids after a validation default was added, where the
new key provably leaves a cell's run unchanged.

The workbench keys a metalr cell by every setting it resolves (:func:`metalr.workbench.runner.
expand`), so adding a key to ``VALIDATION_DEFAULTS`` gives every cell that watches a validation
stream a new id, and a study rerun would rerun all of them — most of them bit for bit. For a key
listed in :data:`UNCHANGED`, this script reads each cell whose id has no record, computes the id
it had before the key existed (the key removed from its resolved ``validation`` settings and from
the spec's own ``validation``), and, where that record exists and the cell's run does not read
the key, appends the record again under the new id (``"rekeyed_from"``: the old id). Cells whose
run the key changes are left for the study to rerun::

    python experiments/rekey_records.py configs/ablate_study9_validation.yaml --key track_steps

``track_steps`` (2026-12-07) scales a seek group's tracking β by ``max(1, track_steps /
ray_steps)``; a cell where that factor is 1 (no ``ray_steps``, or a budget of at least
``track_steps`` steps) runs exactly as before (``tests/test_validation_track_steps.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import metalr.workbench.optimizers as O
from metalr.functional.validation import tracking_scale
from metalr.workbench.config import StudyConfig, load_study
from metalr.workbench.runner import append_record, expand, read_records

#: Keys this script may carry records across: key → whether a cell's run (its resolved
#: settings, the budget filled in) is the same as before the key existed.
UNCHANGED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "track_steps": lambda settings: tracking_scale(settings.get("validation") or {}) == 1.0,
}


@contextmanager
def _settings_without(key: str) -> Iterator[None]:
    """``resolved_settings`` as it was before ``validation[key]`` existed."""
    original = O.resolved_settings

    def without(spec: dict[str, Any], steps: int) -> dict[str, Any] | None:
        settings = original(spec, steps)
        if settings is not None and isinstance(settings.get("validation"), dict):
            settings = {**settings, "validation": _dropped(settings["validation"], key)}
        return settings

    O.resolved_settings = without
    try:
        yield
    finally:
        O.resolved_settings = original


def _dropped(options: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k != key}


def _old_config(cfg: StudyConfig, key: str) -> StudyConfig:
    """``cfg`` with ``key`` removed from every spec's ``validation`` (a row that writes the key
    out, to keep the run it had, had no such key before)."""
    optimizers = copy.deepcopy(cfg.optimizers)
    for spec in optimizers.values():
        if isinstance(spec.get("validation"), dict):
            spec["validation"] = _dropped(spec["validation"], key)
    return dataclasses.replace(cfg, optimizers=optimizers)


def rekey(cfg: StudyConfig, key: str, records_path: Path) -> tuple[int, int]:
    """Append the carried records; returns (carried, left to rerun)."""
    if key not in UNCHANGED:
        raise ValueError(f"Invalid key: {key!r}; expected one of {sorted(UNCHANGED)}")
    records = {r.get("id"): r for r in read_records(records_path)}
    cells = expand(cfg)
    with _settings_without(key):
        old_cells = expand(_old_config(cfg, key))
    carried = left = 0
    for cell, old in zip(cells, old_cells, strict=True):
        if cell["id"] in records or old["id"] not in records:
            continue
        settings = O.resolved_settings(cell["spec"], cell["steps"])
        if settings is None or not UNCHANGED[key](settings):
            left += 1
            continue
        record = {**records[old["id"]], "id": cell["id"], "spec": cell["spec"],
                  "rekeyed_from": old["id"]}  # fmt: skip
        append_record(record, records_path)
        records[cell["id"]] = record
        carried += 1
    return carried, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--key", required=True, choices=sorted(UNCHANGED))
    args = parser.parse_args(argv)
    cfg = load_study(args.config)
    carried, left = rekey(cfg, args.key, cfg.out_dir / "records.jsonl")
    print(f"{args.config}: {carried} records carried to their new ids, {left} cells to rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
