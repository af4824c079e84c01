"""Meta-learned priors for workbench optimizers: ``prior: task`` or ``prior: <file>`` in a spec.

A prior (:class:`~metalr.meta.LRPrior`) holds per-tensor learned rates, ``hypergrad_lr`` and
optionally learned initial weights. ``prior: <file>`` reads one written by ``metalr meta-train``;
``prior: task`` uses the task's own, meta-trained here once by :func:`task_prior` with metalr's
:class:`~metalr.meta.MetaLearner` and cached in ``$METALR_CACHE/workbench/priors`` under the
SHA-256 of everything that determines it (task, size, meta-config, iterations).

The transfer tasks' priors (``animal_transfer``) are meta-trained on fine-tuning episodes of their
pretraining split: :mod:`metalr.workbench.transfer_priors`. Of the others, only
``fewshot_sinusoid`` has a task prior (:data:`TASK_PRIORS`): MAML's sinusoid distribution,
K support and K query points per task, the same 1-40-40-1 MLP, per-tensor rates, learned
initial weights. Its inner rule is the optimizer's (``sgd_hd`` for ``sgd_hd`` and
``hyperlr`` on SGD, ``adam_hd`` for ``adam_hd``, ``adamw_hd`` and ``hyperlr`` on Adam). The
held-out sinusoid a run fine-tunes on is drawn from its own generator, independent of the
meta-training stream.

``hypergrad_lr`` is not meta-learned (``learn_hypergrad_lr=False``, fixed at 0.02): a learned
one (up to 0.65, 1000 × 25 tasks × 5 steps) drove the rates up after the 5 steps it was trained
for; fine-tuning on 10 held-out sinusoids was at mean val MSE 0.98 after 30 steps (worst 8.3)
and non-finite after 300. With the fixed one the priors stay stable over 300 fine-tuning steps.
Mean val MSE on the held-out sinusoids of seeds 0-4 (``metalr.workbench.runner.train``)::

    full size,         prior: task         no prior: the best of lr 1e-3, 1e-2, 1e-1
    after steps        5 / 30 / 300        (at each step count) 5 / 30 / 300
    sgd_hd             0.13 / 0.08 / 0.06  2.12 / 1.22 / 0.64
    adam_hd            0.28 / 0.25 / 0.16  2.16 / 1.30 / 0.39

Without its weights (``prior_weights: false``) a prior's rates alone do about as well as the best
grid lr, with no grid (sgd_hd 2.19 / 2.07 / 0.70, adam_hd 1.99 / 1.67 / 0.36): the rates were
learned for the learned initialisation.

Meta-training time on one CPU thread of a shared 2-core box: smoke (150 meta-iterations × 10
tasks × 3 inner steps) 3.0 s for ``sgd_hd``, 3.1 s for ``adam_hd``; full (600 × 20 × 5) 16.5 s
and 24.7 s. Each is paid once per cache folder.
"""

from __future__ import annotations

import fcntl
import functools
import os
import time
from pathlib import Path
from typing import Any

import torch

from metalr.meta.config import MetaConfig
from metalr.meta.prior import LRPrior
from metalr.meta.results import config_sha256
from metalr.workbench.transfer_priors import TRANSFER_PRIORS

FORMAT = "metalr.workbench-task-prior/1"  # bump to invalidate every cached prior
_META = {"rates": "tensor", "learn_init": True, "learn_hypergrad_lr": False,
         "hypergrad_lr": 0.02, "inner_lr": 0.01, "meta_lr": 0.01, "seed": 0}  # fmt: skip
# task → size → {"iterations": meta-steps, "meta": MetaConfig options}
TASK_PRIORS: dict[str, dict[str, dict[str, Any]]] = {
    "fewshot_sinusoid": {
        "smoke": {"iterations": 150, "meta": {**_META, "inner_steps": 3, "meta_batch_size": 10}},
        "full": {"iterations": 600, "meta": {**_META, "inner_steps": 5, "meta_batch_size": 20}},
    },
}

TASK_PRIORS.update(TRANSFER_PRIORS)


def inner_rule(spec: dict[str, Any]) -> str:
    """The meta-learner's inner rule whose rates the optimizer of ``spec`` runs."""
    kind = spec["kind"]
    if kind == "hyperlr":
        base = spec.get("base", "sgd")
        if base not in ("sgd", "adam"):
            raise ValueError(f"prior needs hyperlr on base sgd or adam (the meta-learner's "
                             f"rules), not {base!r}")  # fmt: skip
        return {"sgd": "sgd_hd", "adam": "adam_hd"}[base]
    rules = {"sgd_hd": "sgd_hd", "adam_hd": "adam_hd", "adamw_hd": "adam_hd"}
    if kind not in rules:
        raise ValueError(f"prior is only for metalr kinds (sgd_hd, adam_hd, adamw_hd, hyperlr), "
                         f"not {kind!r}")  # fmt: skip
    return rules[kind]


def check_compatible(spec: dict[str, Any], prior: LRPrior) -> None:
    """Raise when ``prior`` was learned with a rule the optimizer of ``spec`` does not run."""
    rule = inner_rule(spec)
    family = {"sgd": "sgd_hd", "sgd_hd": "sgd_hd", "adam_hd": "adam_hd"}[prior.inner_rule]
    if family != rule:
        raise ValueError(f"prior learned with inner_rule={prior.inner_rule!r} does not fit "
                         f"kind {spec['kind']!r} (needs {rule!r} rates)")  # fmt: skip
    if spec.get("granularity", prior.granularity) != prior.granularity:
        raise ValueError(f"prior has {prior.granularity!r} rates but the spec sets "
                         f"granularity={spec['granularity']!r}")  # fmt: skip


def meta_config(task: str, size: str, rule: str) -> tuple[MetaConfig, int]:
    """The :class:`MetaConfig` and meta-iterations of ``task``'s prior for inner rule ``rule``."""
    if task not in TASK_PRIORS:
        raise ValueError(f"task {task!r} has no meta-learned prior (prior: task); tasks with "
                         f"one: {', '.join(TASK_PRIORS)}")  # fmt: skip
    entry = TASK_PRIORS[task][size]
    return MetaConfig(inner_rule=rule, **entry["meta"]), entry["iterations"]


def meta_train(task: str, size: str, rule: str) -> LRPrior:
    """Meta-train ``task``'s prior (no cache); the global RNG state is left as it was."""
    from metalr.meta.learner import MetaLearner
    from metalr.tasks.sinusoid import SinusoidTasks
    from metalr.workbench.tasks import SPECS, _mlp

    if task in TRANSFER_PRIORS:
        from metalr.workbench import transfer_priors

        return transfer_priors.meta_train(task, size, rule)
    cfg, iterations = meta_config(task, size, rule)
    spec = SPECS[task][size]
    tic = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        learner = MetaLearner(_mlp([1, *spec["hidden"], 1]), cfg, loss_name="mse")
        history = learner.fit(SinusoidTasks(spec["k_shot"]), iterations)
    prior = learner.export_prior()
    tail = [h["meta_loss"] for h in history[-20:] if h["finite"]]
    prior.provenance.update(
        task=task, size=size, iterations=iterations, k_shot=spec["k_shot"],
        skipped_steps=learner.skipped_steps, meta_train_s=round(time.perf_counter() - tic, 2),
        final_meta_loss=sum(tail) / len(tail) if tail else None,
    )  # fmt: skip
    return prior


def cache_path(task: str, size: str, rule: str) -> Path:
    from metalr.workbench.tasks import SPECS, cache_dir

    cfg, iterations = meta_config(task, size, rule)
    key = {"format": FORMAT, "task": task, "size": size, "task_spec": SPECS[task][size],
           "iterations": iterations, "meta": cfg.to_dict()}  # fmt: skip
    if task in TRANSFER_PRIORS:
        from metalr.workbench.transfer_priors import cache_key

        key = {"format": FORMAT, "task": task, "size": size, **cache_key(task, size, rule)}
    # the inner optimizers' default constants shape the prior too: a change to them must not
    # be masked by a prior cached under the old ones (it was, for the seek rule's rounds 7-11)
    key["inner_defaults"] = _inner_defaults()
    return cache_dir() / "priors" / f"{task}-{size}-{rule}-{config_sha256(key)[:16]}.pt"


def _inner_defaults() -> dict[str, Any]:
    from metalr.functional._seek_constants import FAMILIES
    from metalr.functional.validation import VALIDATION_DEFAULTS

    return {"seek": {f: [dict(c), b] for f, (c, b) in FAMILIES.items()},
            "validation": dict(VALIDATION_DEFAULTS)}  # fmt: skip


@functools.lru_cache(maxsize=16)
def _cached(path: Path, task: str, size: str, rule: str) -> LRPrior:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # one process meta-trains; the others wait on the lock, then read its file
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    meta_train(task, size, rule).save(tmp, format="torch")
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    return LRPrior.load(path)


def task_prior(task: str, size: str, rule: str) -> LRPrior:
    """``task``'s meta-learned prior for ``rule``: from the cache, else meta-trained once."""
    return _cached(cache_path(task, size, rule), task, size, rule)


def prior_for_spec(spec: dict[str, Any], task: str, size: str) -> LRPrior:
    """The prior named by ``spec['prior']`` (``"task"`` or a file) for a run of ``task``."""
    value = spec["prior"]
    if value == "task":
        return task_prior(task, size, inner_rule(spec))
    prior = LRPrior.load(value)
    check_compatible(spec, prior)
    return prior
