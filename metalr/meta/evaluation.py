"""``metalr few-shot-eval`` as functions: a checkpoint or an exported prior → test metrics.

:func:`few_shot_eval` scores a meta-training checkpoint (the meta-learner's own inner loop,
:func:`~metalr.meta.runner.score_test_set`) or an exported :class:`~metalr.meta.LRPrior` adapted
with metalr's drop-in optimizers (:func:`prior_metrics`, the hand-off path) on the fixed test
tasks of :mod:`metalr.meta.runner`; :func:`ensure_prior_eval` caches the latter for the study
scripts. Example::

    from metalr.meta.evaluation import few_shot_eval
    few_shot_eval(prior="runs/x/prior.safetensors", config_file="configs/sinusoid_metasgd.yaml")
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from metalr.meta.results import (
    RESULTS_FORMAT,
    atomic_write_json,
    config_sha256,
    load_checkpoint,
    provenance,
)
from metalr.meta.run_config import RunConfig, load_config, resolve_config
from metalr.meta.runner import (
    _loss_name,
    _sources,
    build_model,
    fixed_tasks,
    make_learner,
    score_test_set,
)

__all__ = ["ensure_prior_eval", "few_shot_eval", "prior_metrics"]


def prior_metrics(prior: Any, cfg: RunConfig) -> dict[str, Any]:
    """Test metrics when each task is adapted by metalr's drop-in optimizer loaded with ``prior``.

    The hand-off path: ``SGDHD`` (``sgd``/``sgd_hd``) or ``AdamHD`` built with
    :func:`~metalr.meta.param_groups_from_prior`, :func:`~metalr.meta.load_prior` (rates,
    ``hypergrad_lr`` and initial weights), ``foreach=False``, then ``eval.steps`` ordinary
    ``optimizer.step()`` calls on the support loss; an LSLR prior's per-step rates are written
    before each step. Matches the meta-learner's own evaluation up to rounding.
    """
    from metalr.meta.handoff import (
        STEP_RATES_WARNING,
        load_prior,
        load_step_rates,
        param_groups_from_prior,
    )
    from metalr.meta.inner_loop import task_loss
    from metalr.optim import SGDHD, AdamHD

    steps = cfg.eval.steps or cfg.meta.inner_steps
    schedule = prior.rate_schedule
    if schedule is not None and steps > min(len(t) for t in schedule.values()):
        raise ValueError(f"the prior's LSLR schedule has fewer than eval.steps={steps} steps")
    model, loss_name = build_model(cfg), _loss_name(cfg)
    options = {"granularity": prior.granularity, "lr_bounds": cfg.meta.lr_bounds, "foreach": False}
    if prior.inner_rule != "sgd":  # an sgd prior's groups keep its rates fixed (additive, β 0)
        options.update(rule=prior.hypergrad_rule)
    values: dict[str, list[float]] = {"query_loss": [], "pre_adaptation_loss": [], "accuracy": []}
    test_set = _sources(cfg, cfg.eval.k_query)["test"]
    for batch in fixed_tasks(test_set, cfg.eval.num_tasks, cfg.eval.seed, cfg.eval.chunk):
        for sx, sy, qx, qy in zip(*batch):
            groups = param_groups_from_prior(model, prior)
            opt = (AdamHD(groups, betas=cfg.meta.adam_betas, eps=cfg.meta.adam_eps, **options)
                   if prior.inner_rule == "adam_hd" else SGDHD(groups, **options))  # fmt: skip
            with warnings.catch_warnings():  # the per-step rates are written below
                warnings.filterwarnings("ignore", message=re.escape(STEP_RATES_WARNING))
                load_prior(opt, model, prior, load_weights=prior.init_weights is not None)
            with torch.no_grad():
                values["pre_adaptation_loss"].append(float(task_loss(model(qx), qy, loss_name)))
            for t in range(steps):
                if schedule is not None:
                    load_step_rates(opt, model, prior, t)
                opt.zero_grad()
                task_loss(model(sx), sy, loss_name).backward()
                opt.step()
            with torch.no_grad():
                pred = model(qx)
                values["query_loss"].append(float(task_loss(pred, qy, loss_name)))
                values["accuracy"].append(float((pred.argmax(-1) == qy).float().mean()))
    out: dict[str, Any] = {"num_tasks": len(values["query_loss"])}
    for key, v in values.items():
        if key == "accuracy" and loss_name != "cross_entropy":
            continue
        x = torch.tensor(v, dtype=torch.float64)
        out[key] = float(x.mean())
        out[f"{key}_ci95"] = 1.96 * float(x.std()) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    out.update(inner_steps=steps, k_shot=cfg.task.k_shot, k_query=cfg.eval.k_query,
               adapted_with=type(opt).__name__)  # fmt: skip
    return out


def few_shot_eval(
    checkpoint: str | Path | None = None,
    *,
    prior: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] = (),  # type: ignore[assignment]
    smoke: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Adapt to each fixed test task's support set and score its query set (mean, 95% CI).

    With ``checkpoint``: the run's meta-learner (config from the checkpoint unless
    ``config_file``). With ``prior`` (and ``config_file`` for the model and tasks): the exported
    :class:`~metalr.meta.LRPrior` in metalr's optimizers (:func:`prior_metrics`).
    """
    from metalr.meta.prior import LRPrior

    if (checkpoint is None) == (prior is None):
        raise ValueError("pass exactly one of a checkpoint or a prior")
    if prior is not None and config_file is None:
        raise ValueError("evaluating a prior needs --config (the model and the tasks)")
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    if config_file is not None:
        cfg = load_config(config_file, overrides, smoke)
    else:
        cfg = resolve_config(copy.deepcopy(ckpt["config"]), overrides, smoke)  # type: ignore[index]
    tic = time.perf_counter()
    if ckpt is not None:
        learner = make_learner(cfg)
        try:
            learner.load_state_dict(ckpt["learner"])
        except RuntimeError as exc:  # parameter shapes: a different model section
            raise ValueError(f"{checkpoint} does not fit the config's model: {exc}") from None
        metrics = score_test_set(learner, cfg)
    else:
        metrics = prior_metrics(LRPrior.load(prior), cfg)  # type: ignore[arg-type]
    source = Path(checkpoint if checkpoint is not None else prior)  # type: ignore[arg-type]
    results = {
        "format": RESULTS_FORMAT, "name": cfg.name, "kind": "few-shot-eval",
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "prior": str(prior) if prior is not None else None,
        "iteration": int(ckpt["iteration"]) if ckpt is not None else None,
        "test": metrics, "wall_time_s": time.perf_counter() - tic, "seed": cfg.meta.seed,
        "provenance": provenance(cfg.to_dict(), config_file),
    }  # fmt: skip
    default = "few_shot_eval.json" if checkpoint is not None else "prior_eval.json"
    atomic_write_json(results, Path(out) if out is not None else source.parent / default)
    return results


def ensure_prior_eval(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """:func:`prior_metrics` of the prior a finished run exported (cached in the run folder as
    ``prior_eval.json`` for an unchanged config): the hand-off check of the study scripts."""
    from metalr.meta.prior import LRPrior

    run_dir = Path(run_dir)
    sha = config_sha256(cfg.to_dict())
    done = run_dir / "prior_eval.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.get("config_sha256") == sha:
            return cached["test"]
    prior = json.loads((run_dir / "results.json").read_text())["files"]["prior"]
    test = prior_metrics(LRPrior.load(run_dir / prior), cfg)
    atomic_write_json({"config_sha256": sha, "prior": prior, "test": test}, done)
    return test
