"""Optimizers of the ablation workbench: torch baselines, schedules, metalr variants and peers.

An optimizer *spec* is a mapping (one entry of a study's ``optimizers:``)::

    adam:         {kind: adam}
    sgd_nesterov: {kind: sgd, momentum: 0.9, nesterov: true}
    adam_cosine:  {kind: adam, schedule: warmup_cosine, schedule_args: {warmup: 0.05}}
    hyper_rms:    {kind: hyperlr, base: rmsprop, hypergrad_lr: 0.02, granularity: tensor}
    adam_rt:      {kind: range_test_adam}          # Adam at the LR range test's suggestion
    adam_tuned:   {kind: tuned_adam, search: random, trials: 8, lr_range: [1.0e-5, 1.0]}

Every other key is a keyword argument of the optimizer's constructor (so a typo fails when the
study is loaded, see :func:`check_spec`). Baselines are torch's own classes and schedulers; the
parameter-free peers (prodigyopt, dadaptation, schedulefree) are used when importable and
recorded as "not installed" otherwise. ``range_test_adam``, ``tuned_adam`` and the peers do not
take the grid's initial lr (:func:`uses_lr`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import lr_scheduler as S

import metalr

TORCH = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad,
}  # fmt: skip
METALR = {"sgd_hd": metalr.SGDHD, "adam_hd": metalr.AdamHD, "adamw_hd": metalr.AdamWHD}
# kind → (module, class, default lr); lr-free: the grid's lr is not used
PEERS = {
    "prodigy": ("prodigyopt", "Prodigy", 1.0),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", 1.0),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", None),  # takes an lr
}
SEARCHED = ("range_test_adam", "tuned_adam")
KINDS = (*TORCH, *METALR, "hyperlr", *PEERS, *SEARCHED)
SCHEDULES = ("none", "step", "exponential", "polynomial", "cosine", "warmup_cosine", "cyclic",
             "onecycle")  # fmt: skip
META_KEYS = {"kind", "schedule", "schedule_args", "base", "base_args",  # not constructor kwargs
             "search", "trials", "lr_range", "trial_steps", "range_test"}  # fmt: skip


def peer_available(kind: str) -> bool:
    return importlib.util.find_spec(PEERS[kind][0]) is not None


def uses_lr(spec: dict[str, Any]) -> bool:
    """Whether the spec trains at the grid's initial lr (else it runs once per seed)."""
    kind = spec["kind"]
    return kind not in SEARCHED and (kind not in PEERS or PEERS[kind][2] is None)


def build_optimizer(spec: dict[str, Any], params: Any, lr: float | None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` at ``lr`` (``range_test_adam``/``tuned_adam``: plain Adam)."""
    kind = spec["kind"]
    kwargs = {k: v for k, v in spec.items() if k not in META_KEYS}
    for key in ("betas", "lr_bounds"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if kind in TORCH or kind in METALR:
        return {**TORCH, **METALR}[kind](params, lr=lr, **kwargs)
    if kind in SEARCHED:
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if kind == "hyperlr":
        base = spec.get("base", "sgd")
        if base not in TORCH:
            raise ValueError(f"Invalid base for hyperlr: {base!r}; expected one of {tuple(TORCH)}")
        inner = TORCH[base](params, lr=lr, **(spec.get("base_args") or {}))
        return metalr.HyperLR(inner, **kwargs)
    if kind in PEERS:
        module, cls, default_lr = PEERS[kind]
        if not peer_available(kind):
            raise ImportError(f'{kind} needs {module}: pip install "torch==2.13.0" {module}')
        opt_cls = getattr(importlib.import_module(module), cls)
        return opt_cls(params, lr=default_lr if default_lr is not None else lr, **kwargs)
    raise ValueError(f"Unknown optimizer kind {kind!r}; expected one of {', '.join(KINDS)}")


def build_schedule(spec: dict[str, Any], opt: torch.optim.Optimizer, steps: int) -> Any:
    """A torch scheduler stepped once per optimizer step over ``steps`` steps (or None)."""
    name = spec.get("schedule", "none")
    a = dict(spec.get("schedule_args") or {})
    if name == "none":
        if a:
            raise ValueError(f"schedule_args {a} given without a schedule")
        return None
    take = lambda key, default: a.pop(key, default)
    if name == "step":
        sched = S.StepLR(
            opt, step_size=take("step_size", max(1, steps // 3)), gamma=take("gamma", 0.1)
        )
    elif name == "exponential":  # decays to `final` × lr over the run
        sched = S.ExponentialLR(opt, gamma=take("final", 0.01) ** (1.0 / max(1, steps)))
    elif name == "polynomial":
        sched = S.PolynomialLR(opt, total_iters=steps, power=take("power", 1.0))
    elif name == "cosine":
        sched = S.CosineAnnealingLR(opt, T_max=steps, eta_min=take("eta_min", 0.0))
    elif name == "warmup_cosine":
        warm = max(1, int(take("warmup", 0.05) * steps))
        sched = S.SequentialLR(opt, [
            S.LinearLR(opt, start_factor=take("start_factor", 0.01), total_iters=warm),
            S.CosineAnnealingLR(opt, T_max=max(1, steps - warm))], milestones=[warm])  # fmt: skip
    elif name == "cyclic":  # triangular between lr × base_factor and lr
        lr = opt.param_groups[0]["lr"]
        half = max(1, steps // (2 * take("cycles", 4)))
        sched = S.CyclicLR(opt, base_lr=lr * take("base_factor", 0.1), max_lr=lr, step_size_up=half,
                           mode="triangular", cycle_momentum=False)  # fmt: skip
    elif name == "onecycle":
        sched = S.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps + 1,
                             pct_start=take("pct_start", 0.3))  # fmt: skip
    else:
        raise ValueError(f"Unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if a:
        raise ValueError(f"Unknown schedule_args for {name}: {', '.join(a)}")
    return sched


def lr_summary(opt: torch.optim.Optimizer) -> dict[str, float]:
    """Min/mean/max effective rate over all parameters (metalr) or groups (``lr × d`` for the
    D-adaptation family, ``lr`` otherwise)."""
    if hasattr(opt, "lr_summary"):
        rows = opt.lr_summary()
        sizes = [sum(p.numel() for p in g["params"]) for g in opt.param_groups]
        mean = sum(r["mean"] * n for r, n in zip(rows, sizes)) / max(1, sum(sizes))
        return {
            "min": min(r["min"] for r in rows),
            "mean": mean,
            "max": max(r["max"] for r in rows),
        }
    vals = [float(g["lr"]) * float(g.get("d", 1.0)) for g in opt.param_groups]
    return {"min": min(vals), "mean": sum(vals) / len(vals), "max": max(vals)}


def set_mode(opt: torch.optim.Optimizer, mode: str) -> None:
    """schedulefree optimizers evaluate at a different point than they train: switch them."""
    fn: Callable[[], Any] | None = getattr(opt, mode, None)
    if callable(fn) and type(opt).__module__.startswith("schedulefree"):
        fn()


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    """Validate one spec by building it on a dummy parameter (typos in kwargs fail here)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"Invalid value for optimizers.{name}: expected a mapping with a 'kind'")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"Invalid value for optimizers.{name}.kind: {kind!r}; expected one of "
                         f"{', '.join(KINDS)}")  # fmt: skip
    if kind in PEERS and not peer_available(kind):
        return spec  # recorded as "not installed" by the runner
    search = spec.get("search", "grid")
    if kind == "tuned_adam" and search not in ("grid", "random"):
        raise ValueError(f"Invalid value for optimizers.{name}.search: {search!r}")
    for key in ("trials", "trial_steps"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise ValueError(f"Invalid value for optimizers.{name}.{key}: {spec[key]!r}")
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = build_optimizer(spec, [p], 1e-3)
        build_schedule(spec, opt, 10)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid optimizers.{name}: {exc}") from None
    return spec
