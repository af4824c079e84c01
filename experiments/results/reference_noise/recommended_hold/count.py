"""The count of ``protocol.md`` (``../recommended_restart``'s measurement rerun under the noise
hold, AdamHD's default since 2026-12-07): per task, the recommended option's (``candidate``) and AdamHD's (no validation)
many-seed mean final validation loss ÷ the best fixed Adam rate's, per lr0, and how many are
≤ 1.10. ``python experiments/results/reference_noise/recommended_hold/count.py``"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from reference_noise import print_counts

if __name__ == "__main__":
    print_counts(HERE)
