"""``check_protocol.md``: check_controller's grid on seeds 69, 78, 79, 99 for the recommended
validation option with the library's matched restart (A) and with the transient match (B).

    python experiments/results/fit_controller/transient_match/check.py A    # ~15 min, 2 cores
    python experiments/results/fit_controller/transient_match/check.py B
    python experiments/compare_checks.py check_default_val.json check_transient50_val.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
sys.path.insert(0, str(HERE))
import check_controller
import transientpatch

SEEDS = "69,78,79,99"
VALIDATION = {"validation_data": {"every": 20}, "validation": {"ray_steps": "budget"}}
_plain_run = check_controller._run


def _run_transient(job):
    """A job whose spec carries ``_transient`` (b) runs with the patch at that b."""
    name, spec, lr, seed, size, steps = job
    spec = dict(spec)
    transientpatch.DECAY = spec.pop("_transient", None)
    return _plain_run((name, spec, lr, seed, size, steps))


if __name__ == "__main__":
    arm = sys.argv[1]
    check_controller._run = _run_transient  # forked workers see it
    spec = dict(VALIDATION)
    out = HERE / "check_default_val.json"
    if arm == "B":
        spec = {**spec, "seek": {"moment_restart": 0}, "_transient": 0.98}
        out = HERE / "check_transient50_val.json"
    sys.exit(check_controller.main(["--seeds", SEEDS, "--spec", json.dumps(spec),
                                    "--out", str(out)]))  # fmt: skip
