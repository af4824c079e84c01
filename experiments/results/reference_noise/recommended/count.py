"""The count of protocol.md: per task, the recommended option's (``candidate``) and AdamHD's
(no validation) many-seed mean final validation loss ÷ the best fixed Adam rate's, per lr0, and
how many are ≤ 1.10. ``python experiments/results/reference_noise/recommended/count.py``"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from reference_noise import print_counts

if __name__ == "__main__":
    print_counts(HERE)
