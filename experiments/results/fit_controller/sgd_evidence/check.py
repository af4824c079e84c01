"""The check of ``protocol.md``: the candidate (AdamHD's set with half its evidence, β 0.04043)
against SGD-HD's defaults on seeds 370-373 (``experiments/sgd_candidate_check.py``: SGD(m) at
the grid's five rates, both SGD-HD arms from lr0 1e-5 … 1e-1, nine tasks).

    python experiments/results/fit_controller/sgd_evidence/check.py            # runs (resumes)
    python experiments/results/fit_controller/sgd_evidence/check.py --report
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import sgd_candidate_check as check

SEEDS = "370-373"
SPEC = HERE / "candidate_spec.json"

if __name__ == "__main__":
    check.main(HERE, SEEDS, SPEC)
