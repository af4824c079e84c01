"""The count of AdamHD's defaults since the noise hold (2026-12-07) on many-seed means: per task,
AdamHD's many-seed mean final validation loss ÷ the best fixed Adam rate's, per lr0, and how many
are ≤ 1.10 (the same seeds and Adam runs as ``../recommended_restart``, whose ``adam`` rows each
JSON here starts from). ``python experiments/results/reference_noise/defaults_hold/count.py``"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from reference_noise import print_counts

if __name__ == "__main__":
    print_counts(HERE, rows=("adam_hd",))
