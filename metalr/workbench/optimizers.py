"""Optimizers of the ablation workbench: torch baselines, schedules, metalr variants and peers.

An optimizer *spec* is a mapping (one entry of a study's ``optimizers:``)::

    adam:         {kind: adam}
    sgd_nesterov: {kind: sgd, momentum: 0.9, nesterov: true}
    adam_cosine:  {kind: adam, schedule: warmup_cosine, schedule_args: {warmup: 0.05}}
    hyper_rms:    {kind: hyperlr, base: rmsprop, hypergrad_lr: 0.02, granularity: tensor}
    adam_rt:      {kind: range_test_adam}          # Adam at the LR range test's suggestion
    adam_tuned:   {kind: tuned_adam, search: random, trials: 8, lr_range: [1.0e-5, 1.0]}
    adam_bayes:   {kind: tuned_adam, search: bayes, trials: 8}   # Optuna TPE (pip install optuna)

Every other key is a keyword argument of the optimizer's constructor (so a typo fails when the
study is loaded, see :func:`check_spec`). Baselines are torch's own classes and schedulers; the
parameter-free peers (prodigyopt, dadaptation, schedulefree, DoG and Mechanic: see
:mod:`metalr.workbench.peers`) are used when importable and
recorded as "not installed" otherwise. ``range_test_adam``, ``tuned_adam`` and the peers do not
take the grid's initial lr (:func:`uses_lr`).

metalr kinds (``sgd_hd``, ``adam_hd``, ``adamw_hd``, ``hyperlr`` on SGD or Adam) take a
meta-learned prior (:mod:`metalr.workbench.priors`)::

    sgd_hd_prior: {kind: sgd_hd, prior: task}                  # the task's own prior
    adam_hd_file: {kind: adam_hd, prior: runs/x/prior.safetensors, prior_weights: false}

A prior supplies the initial rates: the optimizer starts at the prior's per-tensor rates
(``group['lr'] = prior.base_lr``, multipliers = the learned rates, as
:func:`metalr.meta.load_prior` with ``set_lr=True`` writes them) and with the prior's
``hypergrad_lr`` (a spec's ``hypergrad_lr`` applies only to a prior without one). The grid's
initial lr therefore means nothing for such a spec: it runs once per seed, with ``lr: null``
in its record (:func:`uses_lr`). A schedule scales ``group['lr']``, so it scales the prior's
rates. ``prior_weights`` (default true) also copies the prior's learned initial weights into the
model when the prior has them. ``granularity`` and ``rule`` default to the prior's.

Layer-wise rates, freezing, a batch size and a spec's own lr grid are spec keys of
:mod:`metalr.workbench.layerwise`::

    adam_llrd:   {kind: adam, layer_decay: 0.5, freeze_body: 0.3, batch_size: 256, epochs: 20}

metalr kinds also take a *hypergradient warm-up* (a faster early climb or fall of the rates)::

    adam_hd_fast: {kind: adam_hd, hypergrad_warmup: {factor: 10, steps: 50}}

which runs step ``t`` (from 1) with ``β_t = β · (1 + (factor − 1) · exp(−(t − 1) / steps))`` in
every param group (β: the group's own ``hypergrad_lr``, so per-tensor β of a prior scale alike):
``factor`` × β at the start, decaying to β with time constant ``steps``
(:func:`build_hypergrad_warmup`).

A spec may watch a validation stream (``validation_data``: metalr's ``observe_validation``,
``plateau``: ReduceLROnPlateau, ``early_stopping``): see :mod:`metalr.workbench.validation`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim import lr_scheduler as S

import metalr
from metalr.workbench import layerwise as L
from metalr.workbench import peers
from metalr.workbench.search import OPTUNA_INSTALL, SEARCHES, optuna_available
from metalr.workbench.validation import with_step_budget

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
    "dog": ("dog", "DoG", 1.0),  # evaluated at its iterate average (metalr.workbench.peers)
    "mechanic": ("mechanic_pytorch", "mechanize(Adam)", 1.0),
}
SEARCHED = ("range_test_adam", "tuned_adam")
KINDS = (*TORCH, *METALR, "hyperlr", *PEERS, *SEARCHED)
SCHEDULES = ("none", "step", "exponential", "polynomial", "cosine", "warmup_cosine", "cyclic",
             "onecycle", "linear_warmup", "shock")  # fmt: skip
META_KEYS = {"kind", "schedule", "schedule_args", "base", "base_args",  # not constructor kwargs
             "search", "trials", "lr_range", "trial_steps",
             "prior", "prior_weights", "hypergrad_warmup",
             "validation_data", "plateau", "early_stopping",
             # metalr.workbench.layerwise: layer-wise rates, batch size, a spec's own lr grid
             "layer_decay", "freeze_body", "layer_decay_range", "batch_size", "epochs", "lrs"}  # fmt: skip
WARMUP_KEYS = ("factor", "steps")
#: Keys only ``tuned_adam`` reads (its search); any other kind refuses them.
SEARCH_KEYS = ("search", "trials", "lr_range", "trial_steps")


def peer_available(kind: str) -> bool:
    return importlib.util.find_spec(PEERS[kind][0]) is not None


def peer_package(kind: str) -> str:
    """The pip package of a peer (``dog-optimizer`` for ``dog``...)."""
    return peers.PACKAGES.get(kind, (None, PEERS[kind][0]))[1]


def uses_lr(spec: dict[str, Any]) -> bool:
    """Whether the spec trains at the grid's initial lr (else it runs once per seed)."""
    kind = spec["kind"]
    if spec.get("prior") is not None:  # the prior supplies the rates
        return False
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
            raise ImportError(f'{kind} needs {module}: pip install "torch==2.13.0" '
                              f"{peer_package(kind)}")  # fmt: skip
        if kind == "mechanic":
            return peers.build_mechanic(params, **kwargs)
        opt_cls = getattr(importlib.import_module(module), cls)
        return opt_cls(params, lr=default_lr if default_lr is not None else lr, **kwargs)
    raise ValueError(f"Unknown optimizer kind {kind!r}; expected one of {', '.join(KINDS)}")


def build_for_model(
    spec: dict[str, Any], model: torch.nn.Module, lr: float | None, task: Any = None
) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``model`` at ``lr``; with a ``prior``, at the prior's rates
    (``lr`` is ignored) and, unless ``prior_weights: false``, from its initial weights (copied
    into ``model``). ``task`` (a :class:`~metalr.workbench.tasks.Task`) names ``prior: task``."""
    if spec["kind"] == "dog" and peer_available("dog"):  # averages the model's weights
        return peers.build_dog(model, **{k: v for k, v in spec.items() if k not in META_KEYS})
    if spec.get("prior") is None:
        if L.uses_groups(spec):  # one group per layer (depth from the head)
            groups = L.param_groups(model, lr, spec.get("layer_decay") or 1.0)
            return build_optimizer(spec, groups, lr)
        return build_optimizer(spec, model.parameters(), lr)
    from metalr.meta.handoff import load_prior, param_groups_from_prior
    from metalr.workbench.priors import prior_for_spec

    if spec["prior"] == "task" and task is None:
        raise ValueError("prior: task needs the task (build_for_model(..., task=task))")
    prior = prior_for_spec(spec, getattr(task, "name", None), getattr(task, "size", None))
    spec = {"granularity": prior.granularity, **spec}
    if prior.hypergrad_lrs is not None:
        spec.setdefault("rule", prior.hypergrad_rule)
    groups = param_groups_from_prior(model, prior, fixed_rates=False)  # the spec's rule adapts
    opt = build_optimizer(spec, groups, prior.base_lr)
    weights = spec.get("prior_weights", True) and prior.init_weights is not None
    load_prior(opt, model, prior, set_lr=True, load_weights=weights)
    return opt


def resolved_settings(spec: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The hyperparameters a metalr optimizer of ``spec`` resolves, its library defaults included
    (``None`` for torch's optimizers and the peers, whose defaults are not ours to change).

    The workbench hashes them into each cell's id (:func:`metalr.workbench.runner.expand`), so a
    record made under other defaults — a refitted ``SEEK_DEFAULTS``, a new default rule — is
    not reused as if the spec had not changed. Built on one probe parameter at lr 1e-3; the
    group's ``lr`` and ``params`` are dropped, the seek constants unless the rule is ``"seek"``,
    and the validation settings unless the spec sets them or watches a validation stream.
    ``steps`` is the run's budget (``ray_steps: budget``). A ``prior`` spec is resolved without
    its prior (the prior file is the spec's own, named by it).
    """
    kind = spec["kind"]
    if kind not in METALR and kind != "hyperlr":
        return None
    probe = torch.nn.Parameter(torch.zeros(1))
    spec = with_step_budget({k: v for k, v in spec.items() if k != "prior"}, steps)
    opt = build_optimizer(spec, [probe], 1e-3)
    group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "lr")}
    if group.get("rule") != "seek":
        group.pop("seek", None)
    if spec.get("validation_data") is None and spec.get("validation") is None:
        group.pop("validation", None)
    return group


def applies_to(spec: dict[str, Any], task: str) -> bool:
    """Whether ``spec`` runs on ``task``: a ``prior: task`` spec runs only on the tasks that have
    a meta-learned prior (so one study can mix them with tasks that have none)."""
    from metalr.workbench.priors import TASK_PRIORS

    return spec.get("prior") != "task" or task in TASK_PRIORS


def check_priors(tasks: list[str], optimizers: dict[str, dict[str, Any]]) -> None:
    """Raise when a ``prior: task`` spec would run on none of the study's tasks."""
    from metalr.workbench.priors import TASK_PRIORS

    for name, spec in optimizers.items():
        if spec.get("prior") == "task" and not any(applies_to(spec, t) for t in tasks):
            raise ValueError(f"Invalid value for optimizers.{name}.prior: 'task', but none of the "
                             f"study's tasks ({', '.join(tasks)}) has a meta-learned prior (only "
                             f"{', '.join(TASK_PRIORS)} do)")  # fmt: skip


def build_schedule(spec: dict[str, Any], opt: torch.optim.Optimizer, steps: int) -> Any:
    """A torch scheduler stepped once per optimizer step over ``steps`` steps (or None)."""
    name = spec.get("schedule", "none")
    a = dict(spec.get("schedule_args") or {})
    if spec.get("freeze_body") is not None:
        return L.freeze_schedule(opt, spec["freeze_body"], steps)
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
    elif name == "linear_warmup":  # start_factor × lr → lr over the first `warmup` of the run
        warm = max(1, int(take("warmup", 0.1) * steps))
        sched = S.LinearLR(opt, start_factor=take("start_factor", 0.01), total_iters=warm)
    elif name == "cyclic":  # triangular between lr × base_factor and lr
        lr = opt.param_groups[0]["lr"]
        half = max(1, steps // (2 * take("cycles", 4)))
        sched = S.CyclicLR(opt, base_lr=lr * take("base_factor", 0.1), max_lr=lr, step_size_up=half,
                           mode="triangular", cycle_momentum=False)  # fmt: skip
    elif name == "shock":  # lr × factor for good from `at` of the run (a bad restart, a typo)
        start, factor = int(take("at", 0.4) * steps), take("factor", 100.0)
        sched = S.LambdaLR(opt, lambda t: factor if t >= start else 1.0)
    elif name == "onecycle":
        sched = S.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps + 1,
                             pct_start=take("pct_start", 0.3))  # fmt: skip
    else:
        raise ValueError(f"Unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if a:
        raise ValueError(f"Unknown schedule_args for {name}: {', '.join(a)}")
    return sched


def build_hypergrad_warmup(
    spec: dict[str, Any], opt: torch.optim.Optimizer
) -> Callable[[int], None] | None:
    """``set_beta(t)``, called before optimizer step ``t`` (from 1), or None without a warm-up.

    It writes ``β_t = β · (1 + (factor − 1) · exp(−(t − 1) / steps))`` into every param group's
    ``hypergrad_lr``, β being the group's value when the optimizer was built.
    """
    warm = spec.get("hypergrad_warmup")
    if warm is None:
        return None
    factor, tau = float(warm["factor"]), float(warm["steps"])
    groups = opt.param_groups
    base = [g["hypergrad_lr"] for g in groups]

    def set_beta(step: int) -> None:
        scale = 1.0 + (factor - 1.0) * math.exp(-(step - 1) / tau)
        for group, beta in zip(groups, base):
            group["hypergrad_lr"] = beta * scale

    return set_beta


def _check_warmup(name: str, spec: dict[str, Any]) -> None:
    warm, kind = spec["hypergrad_warmup"], spec["kind"]
    where = f"optimizers.{name}.hypergrad_warmup"
    if kind not in METALR and kind != "hyperlr":
        raise ValueError(f"Invalid {where}: kind {kind!r} has no hypergradient; only "
                         f"{', '.join((*METALR, 'hyperlr'))} do")  # fmt: skip
    if not isinstance(warm, dict) or set(warm) != set(WARMUP_KEYS):
        raise ValueError(f"Invalid value for {where}: {warm!r}; expected a mapping with exactly "
                         f"the keys {', '.join(WARMUP_KEYS)}")  # fmt: skip
    factor, steps = warm["factor"], warm["steps"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ValueError(f"Invalid value for {where}.factor: {factor!r} (expected a number >= 1)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid value for {where}.steps: {steps!r} (expected an integer >= 1)")


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


def layer_lrs(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float] | None:
    """Mean effective lr per parameter tensor, by name (metalr optimizers; others: None)."""
    if not hasattr(opt, "effective_lrs"):
        return None
    eff = opt.effective_lrs()
    return {n: float(eff[p].float().mean()) for n, p in model.named_parameters() if p in eff}


def set_mode(opt: torch.optim.Optimizer, mode: str) -> None:
    """schedulefree optimizers and averaged DoG evaluate at other weights than they train at:
    switch them."""
    fn: Callable[[], Any] | None = getattr(opt, mode, None)
    if callable(fn) and peers.swaps_weights(opt):
        fn()


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    """Validate one spec by building it on a dummy parameter (typos in kwargs fail here)."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"Invalid value for optimizers.{name}: expected a mapping with a 'kind'")
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"Invalid value for optimizers.{name}.kind: {kind!r}; expected one of "
                         f"{', '.join(KINDS)}")  # fmt: skip
    if spec.get("prior") is not None or "prior_weights" in spec:
        _check_prior(name, spec)
    if "hypergrad_warmup" in spec:
        _check_warmup(name, spec)
    from metalr.workbench.validation import check_validation_spec

    check_validation_spec(name, spec, kind in METALR or kind == "hyperlr")
    L.check(name, spec)
    if kind in PEERS and not peer_available(kind):
        return spec  # recorded as "not installed" by the runner
    ignored = [key for key in SEARCH_KEYS if key in spec] if kind != "tuned_adam" else []
    if ignored:
        raise ValueError(f"Invalid optimizers.{name}: {', '.join(ignored)} only apply to kind "
                         f"tuned_adam (the search), not {kind!r}")  # fmt: skip
    if "lrs" in spec and not uses_lr(spec):
        raise ValueError(f"Invalid optimizers.{name}.lrs: kind {kind!r} does not train at the "
                         "grid's rates (it searches or sets its own), so a grid of its own is unused")  # fmt: skip
    if "lr_range" in spec:
        _check_lr_range(name, spec["lr_range"])
    search = spec.get("search", "grid")
    if kind == "tuned_adam" and search not in SEARCHES:
        raise ValueError(f"Invalid value for optimizers.{name}.search: {search!r}; expected one "
                         f"of {', '.join(SEARCHES)}")  # fmt: skip
    if kind == "tuned_adam" and search == "bayes" and not optuna_available():
        raise ValueError(f"optimizers.{name}.search: bayes needs Optuna: {OPTUNA_INSTALL}")
    for key in ("trials", "trial_steps"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise ValueError(f"Invalid value for optimizers.{name}.{key}: {spec[key]!r}")
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = build_optimizer(with_step_budget(spec, 10), [p], 1e-3)  # ray_steps: budget
        build_schedule(spec, opt, 10)
        build_hypergrad_warmup(spec, opt)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid optimizers.{name}: {exc}") from None
    return spec


def _check_lr_range(name: str, value: Any) -> None:
    """``[low, high]``, two rates with ``0 < low < high`` (the search draws log-uniformly)."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          and 0 < value[0] < value[1] < math.inf)  # fmt: skip
    if not ok:
        raise ValueError(f"Invalid value for optimizers.{name}.lr_range: {value!r} (expected "
                         "[low, high] with 0 < low < high)")  # fmt: skip


def _check_prior(name: str, spec: dict[str, Any]) -> None:
    from metalr.meta.prior import LRPrior
    from metalr.workbench import priors

    value, kind = spec.get("prior"), spec["kind"]
    if kind not in METALR and kind != "hyperlr":
        raise ValueError(f"Invalid optimizers.{name}.prior: kind {kind!r} takes no prior; only "
                         f"{', '.join((*METALR, 'hyperlr'))} do")  # fmt: skip
    if value is None:
        raise ValueError(f"Invalid optimizers.{name}.prior_weights: given without a prior")
    if not isinstance(spec.get("prior_weights", True), bool):
        raise ValueError(f"Invalid value for optimizers.{name}.prior_weights: "  # noqa: TRY004
                         f"{spec['prior_weights']!r}; expected true or false")  # fmt: skip
    try:
        priors.inner_rule(spec)
    except ValueError as exc:
        raise ValueError(f"Invalid optimizers.{name}: {exc}") from None
    if value == "task":
        return
    if not isinstance(value, str) or not Path(value).is_file():
        raise ValueError(f"Invalid value for optimizers.{name}.prior: {value!r}; expected 'task' "
                         "or the path of an LRPrior file (metalr meta-train writes one)")  # fmt: skip
    try:
        priors.check_compatible(spec, LRPrior.load(value))
    except Exception as exc:  # noqa: BLE001 - any unreadable file: name the key
        raise ValueError(f"Invalid value for optimizers.{name}.prior: {value!r}: {exc}") from None
