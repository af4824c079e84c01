"""Run configs of ``metalr meta-train``: YAML → a type-checked :class:`RunConfig`.

A run config has five sections; every key is checked against the schema below, and an unknown key
or a value of the wrong type raises ``ValueError`` naming it::

    task:  source (sinusoid | glyphs | omniglot), k_shot, k_query, n_way, image_size, ...
    model: kind (mlp | cnn), hidden, channels, blocks, norm
    meta:  any MetaConfig option (inner_rule, rates, inner_steps, inner_lr, meta_lr, seed, ...)
    train: iterations, val_every, val_tasks, val_seed, checkpoint_every
    eval:  num_tasks, k_query, steps, seed, chunk

plus ``smoke:`` (the same sections, merged on top with ``smoke=true`` or ``--smoke``: a
seconds-long version for CI). Overrides are ``section.key=value`` or ``--section.key=value``,
parsed as YAML, applied after the smoke section, and type-checked like the file::

    cfg = load_config("configs/sinusoid_metasgd.yaml", ["task.k_shot=5", "meta.inner_lr=1e-3"])
    load_config(path, ["train.iteratons=5"])   # ValueError: Unknown config key train.iteratons
    load_config(path, ["train.iterations=a"])  # ValueError: Invalid value for train.iterations
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalr.meta.config import MetaConfig

SOURCES = ("sinusoid", "glyphs", "omniglot")
MODELS = ("mlp", "cnn")


@dataclass
class TaskSection:
    source: str = "sinusoid"
    k_shot: int = 10
    k_query: int | None = None  # query examples (per class) in meta-training; None: k_shot
    n_way: int = 5
    image_size: int = 28
    augment: bool = True  # glyphs: random "writer" distortion
    max_scripts: int | None = None  # glyphs: the first N scripts of each split (small, for CI)
    root: str | None = None  # omniglot: folder with images_background/ and images_evaluation/
    rotations: list[int] = field(default_factory=lambda: [0])  # omniglot class augmentation


@dataclass
class ModelSection:
    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # mlp
    channels: int = 16  # cnn: conv3x3 stride 2 → norm → ReLU, ``blocks`` times, then linear
    blocks: int = 4
    norm: str = "batch"  # "batch" (batch statistics, no running buffers: vmap-able) or "none"


@dataclass
class TrainSection:
    iterations: int = 1000
    val_every: int = 100
    val_tasks: int = 100
    val_seed: int = 12345
    checkpoint_every: int = 250


@dataclass
class EvalSection:
    num_tasks: int = 600
    k_query: int = 100  # sinusoid: query points per task; classification: per class
    steps: int | None = None  # inner steps at test time (default: meta.inner_steps)
    seed: int = 2024  # the fixed test set
    # tasks per vectorised call (memory); the fixed tasks are drawn in the sampler's own blocks,
    # so it does not change which tasks a run is scored on (it did until 2026-12-05)
    chunk: int = 100


SECTIONS: dict[str, type] = {
    "task": TaskSection, "model": ModelSection, "meta": MetaConfig,
    "train": TrainSection, "eval": EvalSection,
}  # fmt: skip
TOP_LEVEL = {"name": str}


@dataclass
class RunConfig:
    """A resolved, type-checked run config (see the module docstring)."""

    name: str
    task: TaskSection
    model: ModelSection
    meta: MetaConfig
    train: TrainSection
    eval: EvalSection

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for sec in SECTIONS:
            value = getattr(self, sec)
            out[sec] = value.to_dict() if sec == "meta" else dataclasses.asdict(value)
        return out


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check(path: str, value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` (int → float widening, list ↔ tuple); anything else raises."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if (value is None or value == "None") and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(path, value, arg)
            except ValueError:
                pass
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and Ellipsis not in args and len(args) != len(value):
            raise ValueError(f"Invalid value for {path}: {value!r} (expected {len(args)} items)")
        items = [_check(f"{path}[{i}]", v, args[0] if origin is list or Ellipsis in args
                        else args[i]) for i, v in enumerate(value)]  # fmt: skip
        return items if origin is list else tuple(items)
    elif origin is dict and isinstance(value, dict):
        return {_check(f"{path} key", k, args[0]): _check(f"{path}.{k}", v, args[1])
                for k, v in value.items()}  # fmt: skip
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) and "inf" as strings
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ValueError(f"Invalid value for {path}: {value!r} (expected {_type_name(hint)})")


def _build_section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"Invalid value for {name}: expected a mapping, got {data!r}")  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ValueError(
                f"Unknown config key {name}.{key!s}; valid keys of {name!r}: {', '.join(known)}"
            )
    values = {k: _check(f"{name}.{k}", v, hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"Invalid {name} section: {exc}") from None


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError('run configs need PyYAML: pip install "metalr[experiments]"') from exc
    return yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` → (``["a", "b"]``, YAML-parsed value)."""
    yaml = _yaml()

    key, sep, raw = text.removeprefix("--").partition("=")
    if not sep or not key:
        raise ValueError(
            f"Invalid override {text!r}; expected key=value (e.g. train.iterations=10)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_smoke(
    raw: dict[str, Any], overrides: Sequence[str], smoke: bool
) -> tuple[dict[str, Any], list[tuple[list[str], Any]]]:
    """A copy of ``raw`` with its ``smoke`` section removed, and merged in when ``smoke`` is true
    or an override says ``smoke=true``; returns it with the other overrides, parsed."""
    raw = copy.deepcopy(raw)
    smoke_section = raw.pop("smoke", None) or {}
    parsed = [parse_override(o) for o in overrides]
    for path, value in parsed:
        if path == ["smoke"]:
            smoke = _check("smoke", value, bool)
    if smoke:
        if not isinstance(smoke_section, dict):
            raise ValueError("Invalid value for smoke: expected a mapping of overrides")
        _merge(raw, smoke_section)
    return raw, [(path, value) for path, value in parsed if path != ["smoke"]]


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = copy.deepcopy(value)


def resolve_config(
    raw: dict[str, Any],
    overrides: list[str] = (),
    smoke: bool = False,  # type: ignore[assignment]
) -> RunConfig:
    """Merge the ``smoke`` section (when asked) and the overrides into ``raw``, then check it."""
    raw, parsed = apply_smoke(raw, overrides, smoke)
    for path, value in parsed:
        if len(path) == 1 and path[0] in TOP_LEVEL:
            raw[path[0]] = value
            continue
        if len(path) != 2 or path[0] not in SECTIONS:
            raise ValueError(
                f"Unknown config key {'.'.join(path)}; expected <section>.<key> with a section "
                f"in {', '.join(SECTIONS)} (or one of: {', '.join([*TOP_LEVEL, 'smoke'])})"
            )
        raw.setdefault(path[0], {})[path[1]] = value
    for key in raw:
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise ValueError(f"Unknown config key {key}; expected one of {', '.join(SECTIONS)}")
    name = _check("name", raw.get("name", "run"), str)
    sections = {s: _build_section(s, cls, raw.get(s) or {}) for s, cls in SECTIONS.items()}
    cfg = RunConfig(name=name, **sections)
    _check_run(cfg)
    return cfg


def _check_run(cfg: RunConfig) -> None:
    if cfg.task.source not in SOURCES:
        raise ValueError(f"Invalid task.source: {cfg.task.source!r}; expected one of {SOURCES}")
    if cfg.model.kind not in MODELS:
        raise ValueError(f"Invalid model.kind: {cfg.model.kind!r}; expected one of {MODELS}")
    if cfg.model.norm not in ("batch", "none"):
        raise ValueError(f"Invalid model.norm: {cfg.model.norm!r}; expected 'batch' or 'none'")
    if (cfg.task.source == "sinusoid") != (cfg.model.kind == "mlp"):
        raise ValueError("sinusoid tasks need model.kind=mlp; glyphs and omniglot need cnn")
    if cfg.task.source == "omniglot" and not cfg.task.root:
        raise ValueError("task.source=omniglot needs task.root (the Omniglot folder)")
    positives = {
        "task.k_shot": cfg.task.k_shot, "task.k_query": 1 if cfg.task.k_query is None else cfg.task.k_query,
        "task.n_way": cfg.task.n_way, "task.image_size": cfg.task.image_size,
        "model.channels": cfg.model.channels, "model.blocks": cfg.model.blocks,
        "train.iterations": cfg.train.iterations, "train.val_every": cfg.train.val_every,
        "train.val_tasks": cfg.train.val_tasks, "train.checkpoint_every": cfg.train.checkpoint_every,
        "eval.num_tasks": cfg.eval.num_tasks, "eval.k_query": cfg.eval.k_query,
        "eval.chunk": cfg.eval.chunk, "eval.steps": 1 if cfg.eval.steps is None else cfg.eval.steps,
    }  # fmt: skip
    for key, value in positives.items():
        if value < 1:
            raise ValueError(f"Invalid value for {key}: {value!r} (expected an integer >= 1)")


def load_config(
    path: str | Path,
    overrides: list[str] = (),
    smoke: bool = False,  # type: ignore[assignment]
) -> RunConfig:
    """Read a YAML run config and apply the smoke section and overrides."""
    yaml = _yaml()

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")  # noqa: TRY004
    raw.setdefault("name", Path(path).stem)
    return resolve_config(raw, overrides, smoke)
