"""Study configs of ``metalr ablate``: YAML → a type-checked :class:`StudyConfig`.

A study is a grid ``tasks × optimizers × lrs × seeds`` (lr-free optimizers: ``tasks × seeds``)::

    name: ablate_default
    tasks: [digits_logreg, digits_mlp]       # metalr.workbench.tasks.TASKS
    size: smoke                              # smoke | full (task sizes)
    steps: 300                               # optimizer steps per run
    task_steps: {charlm_gru: 100}            # per-task step budgets (default: steps)
    log_every: 10                            # curve resolution (validation loss, lr summary)
    lrs: [1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1, 1.0]
    seeds: [0, 1]
    optimizers: {adam: {kind: adam}, adam_hd: {kind: adam_hd}}   # see metalr.workbench.optimizers
    workers: 1                               # processes (ray: CPUs of a local Ray)
    executor: local                          # local (in-process, process pool) | ray
    ray_address: null                        # ray: null (local, $RAY_ADDRESS) | auto | ip:port
    tensorboard: false                       # events in <out>/tensorboard/<task>/<optimizer>/
    device: cpu                              # cpu | cuda | auto
    smoke: {steps: 20, seeds: [0]}           # merged with smoke=true / --smoke

Overrides are ``key=value`` (YAML values), ``optimizers.<name>.<key>=value`` or
``optimizers.<name>={kind: adam}``, type-checked like the file; an unknown key raises naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalr.meta.run_config import _check, _yaml, apply_smoke, parse_override
from metalr.workbench.optimizers import check_priors, check_spec
from metalr.workbench.tasks import SIZES, TASKS


@dataclass
class StudyConfig:
    name: str = "study"
    tasks: list[str] = field(default_factory=lambda: ["digits_mlp"])
    size: str = "smoke"
    steps: int = 300
    task_steps: dict[str, int] = field(default_factory=dict)  # per task; others: steps
    log_every: int = 10
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    optimizers: dict[str, Any] = field(default_factory=lambda: {"adam": {"kind": "adam"}})
    workers: int = 1
    executor: str = "local"  # local | ray
    ray_address: str | None = None  # ray.init(address=...); None: a local instance or $RAY_ADDRESS
    tensorboard: bool = False  # one TensorBoard run per grid cell under <out>/tensorboard
    device: str = "cpu"
    out: str | None = None  # results folder (default: runs/ablate/<name>)
    divergence: float = 1e4  # a run whose training loss exceeds this × its first loss diverged
    range_test_steps: int = 100  # steps of the LR range test (range_test_adam)
    fallback_text: bool = False  # charlm_gru: tiny built-in text (tests only)

    def steps_of(self, task: str) -> int:
        """The step budget of ``task``'s runs."""
        return self.task_steps.get(task, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else default_out_dir(self.name)


KEYS = [f.name for f in dataclasses.fields(StudyConfig)]
EXECUTORS = ("local", "ray")


def resolve_study(
    raw: dict[str, Any], overrides: list[str] = (), smoke: bool = False
) -> StudyConfig:  # type: ignore[assignment]
    """Merge the smoke section (when asked) and ``key=value`` overrides into ``raw``; check it.

    A smoke run whose smoke section and overrides name no ``out`` writes to ``<out>_smoke``, so
    its few steps never join the full study's records (the report keeps the newest record per
    task, optimizer, lr and seed: a shared folder would mix the two in one mean)."""
    smoke_out = _smoke_out(raw, overrides, smoke)
    raw, parsed = apply_smoke(raw, overrides, smoke)
    if smoke_out is not None:
        raw["out"] = smoke_out
    for path, value in parsed:
        key = ".".join(path)
        if path[0] not in KEYS:
            raise ValueError(f"Unknown config key {key}; valid keys: {', '.join([*KEYS, 'smoke'])}")
        if path[0] == "task_steps" and len(path) == 2:
            raw.setdefault("task_steps", {})[path[1]] = value
        elif path[0] == "optimizers" and len(path) in (2, 3):
            opts = raw.setdefault("optimizers", {})
            if len(path) == 2:
                opts[path[1]] = value
            elif path[1] not in opts:
                raise ValueError(f"Unknown config key {key}: no optimizer named {path[1]!r}")
            else:
                opts[path[1]][path[2]] = value
        elif len(path) == 1:
            raw[path[0]] = value
        else:
            raise ValueError(f"Unknown config key {key}")
    for key in raw:
        if key not in KEYS:
            raise ValueError(f"Unknown config key {key}; valid keys: {', '.join([*KEYS, 'smoke'])}")
    _drop_unused_budgets(raw, parsed)
    hints = typing.get_type_hints(StudyConfig)
    values = {k: _check(k, v, hints[k]) for k, v in raw.items() if k != "optimizers"}
    opts = raw.get("optimizers", {"adam": {"kind": "adam"}})
    if not isinstance(opts, dict) or not opts:
        raise ValueError("Invalid value for optimizers: expected a non-empty mapping name → spec")
    values["optimizers"] = {str(n): check_spec(str(n), copy.deepcopy(s)) for n, s in opts.items()}
    cfg = StudyConfig(**values)
    _check_study(cfg)
    return cfg


def _drop_unused_budgets(raw: dict[str, Any], parsed: list[tuple[list[str], Any]]) -> None:
    """The config's ``task_steps`` of known tasks that the study no longer runs (``tasks=[...]``
    narrowed it) are dropped; a budget an override names must be for one of the study's tasks."""
    steps, tasks = raw.get("task_steps"), raw.get("tasks")
    if not isinstance(steps, dict) or not isinstance(tasks, list):
        return
    named = {path[1] for path, _ in parsed if path[0] == "task_steps" and len(path) == 2}
    raw["task_steps"] = {
        task: n for task, n in steps.items() if task in tasks or task in named or task not in TASKS
    }


def default_out_dir(name: str) -> Path:
    """A study's results folder when its config names no ``out``."""
    return Path("runs") / "ablate" / name


def _smoke_out(raw: dict[str, Any], overrides: list[str], smoke: bool) -> str | None:
    """The smoke run's own folder, or None (not a smoke run, or its ``out`` is given)."""
    parsed = [parse_override(o) for o in overrides]
    smoke = smoke or any(path == ["smoke"] and value is True for path, value in parsed)
    section = raw.get("smoke") or {}
    if (
        not smoke
        or any(path == ["out"] for path, _ in parsed)
        or (isinstance(section, dict) and "out" in section)
    ):
        return None
    name = next((v for path, v in parsed if path == ["name"]), raw.get("name", StudyConfig.name))
    base = raw.get("out") or default_out_dir(str(name))
    return f"{base}_smoke"


def _check_study(cfg: StudyConfig) -> None:
    for t in cfg.tasks:
        if t not in TASKS:
            raise ValueError(f"Invalid value for tasks: {t!r}; expected some of {', '.join(TASKS)}")
    if cfg.size not in SIZES:
        raise ValueError(f"Invalid value for size: {cfg.size!r}; expected one of {SIZES}")
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"Invalid value for executor: {cfg.executor!r}; expected local or ray")
    if cfg.device not in ("cpu", "cuda", "auto") and not cfg.device.startswith("cuda:"):
        raise ValueError(f"Invalid value for device: {cfg.device!r}; expected cpu, cuda or auto")
    check_priors(cfg.tasks, cfg.optimizers)
    for task, steps in cfg.task_steps.items():
        if task not in cfg.tasks:
            raise ValueError(f"Invalid key of task_steps: {task!r} is not one of the study's "
                             f"tasks ({', '.join(cfg.tasks)})")  # fmt: skip
        if steps < 1:
            raise ValueError(f"Invalid value for task_steps.{task}: {steps!r} (expected >= 1)")
    for key in ("steps", "log_every", "workers", "range_test_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"Invalid value for {key}: {getattr(cfg, key)!r} (expected >= 1)")
    if not cfg.tasks or not cfg.seeds or not cfg.lrs:
        raise ValueError("tasks, seeds and lrs must each be non-empty")
    for key in ("tasks", "seeds", "lrs"):  # a repeat would run and record one cell twice
        values = getattr(cfg, key)
        if len(set(values)) != len(values):
            raise ValueError(f"Invalid value for {key}: {values!r} (repeated entries)")
    if any(not 0 < lr < math.inf for lr in cfg.lrs):
        raise ValueError(f"Invalid value for lrs: {cfg.lrs!r} (expected positive, finite rates)")
    if not cfg.divergence > 1:
        raise ValueError(f"Invalid value for divergence: {cfg.divergence!r} (expected > 1)")


def load_study(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> StudyConfig:  # type: ignore[assignment]
    """Read a YAML study config and apply its smoke section and overrides."""
    raw = _yaml().safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004
    raw.setdefault("name", Path(path).stem)
    return resolve_study(raw, overrides, smoke)


def default_study_text() -> str:
    """The embedded default study (the same text as ``configs/ablate_default.yaml``)."""
    from metalr.workbench.default_study import TEXT

    return TEXT


def default_study(overrides: list[str] = (), smoke: bool = False) -> StudyConfig:  # type: ignore[assignment]
    """The embedded default study with ``overrides``."""
    raw = _yaml().safe_load(default_study_text())
    return resolve_study(raw, overrides, smoke)
