"""The many-seed count under today's defaults: the few-shot row from this folder (the option's
short-run tracking), the other tasks from ``../recommended_restart``.
``python experiments/results/reference_noise/recommended_track/count.py``"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from reference_noise import print_counts

if __name__ == "__main__":
    print_counts(HERE, under=[HERE.parent / "recommended_restart"])
