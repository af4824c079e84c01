"""The count of ``protocol.md`` (``../recommended``'s measurement rerun under the defaults of
2026-12-07): per task, the recommended option's (``candidate``) and AdamHD's (no validation)
many-seed mean final validation loss ÷ the best fixed Adam rate's, per lr0, and how many are
≤ 1.10. ``python experiments/results/reference_noise/recommended_restart/count.py``"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
from check_controller import LRS
from reference_noise import best_fixed_rate, mean_of, parse_seeds

SEEDS = {"fewshot_sinusoid": "100-159", "digits_logreg": "100-129", "digits_mlp": "100-129"}
STUDY1 = ("animal_cnn", "charlm_gru", "digits_logreg", "digits_mlp", "fewshot_sinusoid",
          "mnist1d_mlp")  # fmt: skip
HELD_OUT = ("diabetes_mlp", "animal_autoencoder", "pysrc_transformer")

if __name__ == "__main__":
    totals: dict[str, list[int]] = {}
    for task in STUDY1 + HELD_OUT:
        losses = json.loads((HERE / f"{task}.json").read_text())
        seeds = parse_seeds(SEEDS.get(task, "100-111"))
        best, ref = best_fixed_rate(losses, "adam", seeds)
        row = f"| {task} ({len(seeds)} seeds) | {best:g} |"
        for name in ("candidate", "adam_hd"):
            ratios = [mean_of(losses, name, lr, seeds) / ref for lr in LRS]
            hits = sum(r <= 1.10 for r in ratios)
            part = "study 1" if task in STUDY1 else "held out"
            totals.setdefault(f"{name}, {part}", []).append(hits)
            row += " " + ", ".join(f"{r:.2f}" for r in ratios) + f" ({hits}/5) |"
        print(row)
    for label, hits in totals.items():
        print(f"{label}: {sum(hits)}/{5 * len(hits)}")
