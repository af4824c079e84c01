"""The ablation workbench: grids of optimizers × initial lrs × seeds on small offline tasks.

* :func:`run_study` / ``metalr ablate``: run a study config into JSONL records with curves and
  provenance (resumable; in-process, a process pool or Ray tasks; optional TensorBoard);
* :func:`report` / ``metalr report``: seed-aggregated tables and plots;
* :func:`find_lr` / ``metalr find-lr``: the LR range test (Smith 2017);
* :mod:`~metalr.workbench.tasks` and :mod:`~metalr.workbench.optimizers`: what a study can name.
"""

from metalr.workbench.config import StudyConfig, default_study, load_study, resolve_study
from metalr.workbench.find_lr import RangeTest, find_lr
from metalr.workbench.report import report
from metalr.workbench.runner import read_records, run_cell, run_study
from metalr.workbench.tasks import TASKS, make_task

__all__ = [
    "TASKS",
    "RangeTest",
    "StudyConfig",
    "default_study",
    "find_lr",
    "load_study",
    "make_task",
    "read_records",
    "report",
    "resolve_study",
    "run_cell",
    "run_study",
]
