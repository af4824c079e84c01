"""Carry a study's finished runs over to rows whose spec pins what the library's default was when
they ran, and drop the runs of rows whose default changed, so that rerunning the study reruns
only those.

A workbench cell's id is a hash of its spec, not of the library's defaults: when a default
changes, ``{kind: adam_hd}`` keeps its id and its old records would be reused for a computation
they no longer are. Pinning the old behaviour in a row's spec (for example ``seek:
{moment_restart: 0}``) gives the row new ids; the records computed before the change are that
pinned computation exactly, so they are relabelled instead of rerun: new id, optimizer name and
spec, the curves copied, and ``provenance.relabelled`` naming the record they came from and the
pin. ``--check N`` reruns N relabelled cells and requires bit-equal final losses.

    python experiments/relabel_records.py configs/ablate_study6_seek_components.yaml \\
        --pin '{"seek": {"moment_restart": 0}}' --carry adam_hd:no_restart --carry no_cut:no_cut \\
        --drop adam_hd --check 2
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

from metalr.workbench.config import load_study
from metalr.workbench.runner import expand, read_records, run_cell


def unpinned(spec: dict[str, Any], pin: dict[str, Any]) -> dict[str, Any]:
    """``spec`` less the pinned keys (a nested mapping left empty is removed)."""
    out = copy.deepcopy(spec)
    for key, value in pin.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            for inner in value:
                out[key].pop(inner, None)
            if not out[key]:
                del out[key]
        else:
            out.pop(key, None)
    return out


def relabel(
    config: str, pin: dict[str, Any], carry: dict[str, str], drop: set[str]
) -> tuple[list[dict], int, int]:
    """Rewrite ``records.jsonl`` of ``config``'s study; returns the relabelled records and the
    counts relabelled and dropped."""
    cfg = load_study(config)
    out = Path(cfg.out)
    path = out / "records.jsonl"
    records = read_records(path)
    cells = {c["id"]: c for c in expand(cfg)}
    by_key = {(r["optimizer"], r["task"], r["lr"], r["seed"]): r for r in records}
    added = []
    for cell in cells.values():
        source = None
        for old_name, new_name in carry.items():
            if new_name != cell["optimizer"]:
                continue
            old = by_key.get((old_name, cell["task"], cell["lr"], cell["seed"]))
            if old is None or old["id"] == cell["id"]:
                continue
            if old["spec"] != unpinned(cell["spec"], pin):
                raise SystemExit(f"{old_name} → {new_name}: the recorded spec {old['spec']} is "
                                 f"not {cell['spec']} less the pin {pin}")  # fmt: skip
            source = old
        if source is None:
            continue
        new = copy.deepcopy(source)
        new.update(id=cell["id"], optimizer=cell["optimizer"], spec=cell["spec"])
        if source.get("curves"):
            shutil.copyfile(out / source["curves"], out / "curves" / f"{cell['id']}.json")
            new["curves"] = f"curves/{cell['id']}.json"
        prov = new.setdefault("provenance", {})
        prov["cell"] = {k: v for k, v in cell.items() if k != "id"}
        prov["relabelled"] = {"from_id": source["id"], "from_optimizer": source["optimizer"],
                              "pinned": pin}  # fmt: skip
        added.append(new)
    dropped = [r for r in records if r["optimizer"] in drop and r["id"] in cells]
    carried = {r["provenance"]["relabelled"]["from_id"] for r in added}
    carried -= {r["id"] for r in records if r["optimizer"] in set(carry) - set(drop)
                and r["id"] in cells}  # a source still in the grid stays  # fmt: skip
    gone = {r["id"] for r in dropped} | {r["id"] for r in added} | carried
    kept = [r for r in records if r["id"] not in gone]
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept + added)
    path.write_text(text)
    return added, len(added), len(dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--pin", required=True, help="JSON: what the spec gains, e.g. a seek key")
    parser.add_argument("--carry", action="append", default=[], help="old:new row names")
    parser.add_argument("--drop", action="append", default=[], help="rows to rerun")
    parser.add_argument("--check", type=int, default=0, help="rerun this many relabelled cells")
    args = parser.parse_args(argv)
    carry = dict(pair.split(":", 1) for pair in args.carry)
    added, n_added, n_dropped = relabel(args.config, json.loads(args.pin), carry, set(args.drop))
    print(f"relabelled {n_added} records, dropped {n_dropped}")
    cfg = load_study(args.config)
    cells = {c["id"]: c for c in expand(cfg)}
    for record in random.Random(0).sample(added, min(args.check, len(added))):
        again = run_cell(cells[record["id"]])
        same = again["final_val_loss"] == record["final_val_loss"]
        print(f"check {record['optimizer']} {record['task']} lr {record['lr']:g} seed "
              f"{record['seed']}: {record['final_val_loss']!r} → {again['final_val_loss']!r} "
              f"{'equal' if same else 'DIFFERENT'}")  # fmt: skip
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
