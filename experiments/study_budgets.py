"""Study 1's step budget of each task, read from the study's config, the one place it is written.

Every script that runs study 1's cells outside the workbench (the fresh-seed checks, the
finding-the-rate study, the many-seed references, the cost benchmark) takes its budgets from
here, so that they cannot drift from the study's::

    from study_budgets import budgets, study_steps
    study_steps("animal_cnn")                       # 500
    budgets(["digits_mlp", "fewshot_sinusoid"])     # {"digits_mlp": 1000, "fewshot_sinusoid": 100}

A task the config does not name a budget for gets the study's ``steps`` (1000).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from metalr.workbench.config import StudyConfig, load_study

CONFIG = Path(__file__).resolve().parents[1] / "configs/ablate_study1_lr_sensitivity.yaml"


@functools.cache
def _study() -> StudyConfig:
    return load_study(CONFIG)


def study_steps(task: str) -> int:
    """Study 1's step budget for ``task``, as the workbench reads it from the config (its
    ``task_steps`` entry, else its ``steps``)."""
    return _study().steps_of(task)


def budgets(tasks: Iterable[str]) -> dict[str, int]:
    """``{task: study_steps(task)}`` for ``tasks``, in their order."""
    return {task: study_steps(task) for task in tasks}
