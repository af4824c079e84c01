"""The check of ``protocol.md``: SGD(m) at the grid's five rates, SGD-HD at its defaults and the
candidate (AdamHD's constants and β), nine tasks × lr0 1e-5 … 1e-1 × seeds 366-369
(``experiments/sgd_candidate_check.py``).

    python experiments/results/fit_controller/sgd_shared/check.py            # runs (resumes)
    python experiments/results/fit_controller/sgd_shared/check.py --report
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import sgd_candidate_check as check

SEEDS = "366-369"
SPEC = HERE / "candidate_spec.json"

if __name__ == "__main__":
    check.main(HERE, SEEDS, SPEC)
