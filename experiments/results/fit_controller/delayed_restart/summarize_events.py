"""Per run in events/: step of the first turn, re-opens / later turns (tensor 0), the restart's
mean |d| per tensor, and the logged training loss before/at/after the turn vs the start."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for f in sorted((HERE / "events").glob(sys.argv[1] if len(sys.argv) > 1 else "*.jsonl")):
    ev = [json.loads(l) for l in f.read_text().splitlines()]
    first = min((e["t"] for e in ev if "first_turn" in e["ev"]), default=None)
    reopen = sorted({e["t"] for e in ev if "reopen" in e["ev"]})
    again = sorted({e["t"] for e in ev if "turn_again" in e["ev"]})
    rs = [e for e in ev if "restart" in e["ev"]]
    md = [round(e["mean_d"], 2) for e in rs if "mean_d" in e]
    cf = f.with_name(f.name[: -len(".jsonl")] + ".curve.json")
    cv = json.loads(cf.read_text()) if cf.is_file() else None
    loss = ""
    if cv and first:
        st, tl = cv["step"], cv["train_loss"]
        pick = lambda s, st=st, tl=tl: next(
            (round(tl[i], 3) for i in range(len(st)) if st[i] >= s and tl[i]), None
        )
        loss = f"lr_mean @first turn {cv['lr_mean'][min(range(len(st)), key=lambda i: abs(st[i] - first))]:.2g} max {max(cv['lr_mean']):.2g}; train loss @25 {pick(25)} @first turn {pick(first)} @100 {pick(100)} @250 {pick(250)} @500 {tl[-1]:.3f}"
    print(
        f"{f.stem}: first turn t={first}; reopen at {reopen}; later turns {again}; "
        f"restart t={sorted({e['t'] for e in rs})} mean|d|={md}; {loss}"
    )
