"""The check of ``protocol.md``: round 12's best against SGD-HD's defaults on seeds 370-373
(``experiments/sgd_candidate_check.py``: SGD(m) at the grid's five rates, both SGD-HD arms from
lr0 1e-5 … 1e-1, nine tasks).

    python experiments/results/fit_controller/round12_sgd/check.py --spec     # candidate_spec.json
    python experiments/results/fit_controller/round12_sgd/check.py            # runs (resumes)
    python experiments/results/fit_controller/round12_sgd/check.py --report

``--spec`` writes the candidate as it would ship: the base set (``base.json``) with the fit's
best constants (``best.json``), every value to 4 significant digits, as ``_seek_constants.py``
stores the fitted sets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import sgd_candidate_check as check

SEEDS = "370-373"
SPEC = HERE / "candidate_spec.json"


def write_spec() -> None:
    constants = {**json.loads((HERE / "base.json").read_text())["constants"],
                 **json.loads((HERE / "best.json").read_text())["constants"]}  # fmt: skip
    rounded = {k: float(f"{v:.4g}") for k, v in constants.items()}
    beta = rounded.pop("hypergrad_lr")
    SPEC.write_text(json.dumps({"seek": rounded, "hypergrad_lr": beta}))


if __name__ == "__main__":
    if "--spec" in sys.argv:
        write_spec()
    elif "--report" in sys.argv:
        check.report(HERE, SEEDS)
    else:
        check.run_all(HERE, SEEDS, SPEC)
