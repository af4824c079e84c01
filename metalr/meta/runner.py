"""``metalr meta-train`` as functions: a run config → tasks, model, results.

:func:`meta_train` builds the task sampler (sinusoid, rendered glyphs or an Omniglot folder), the
model (sinusoid: MAML's 1-40-40-1 ReLU MLP; images: MAML's 4-block strided CNN with
``model.channels`` channels) and a :class:`~metalr.meta.MetaLearner` from a
:class:`~metalr.meta.run_config.RunConfig`, then meta-trains with periodic validation on fixed
tasks. A run directory holds:

* ``checkpoint.pt``: ``MetaLearner.state_dict()``, the config and the iteration, written every
  ``train.checkpoint_every`` iterations and at the end (temporary file + ``os.replace``);
  ``resume=True`` continues from it bit-exactly (task generator and RNG states included);
* ``results.json``: test metrics (mean and 95% CI over the fixed test tasks), the validation
  curve, learned-rate summaries and provenance (config and its sha256, git commit, versions);
* the exported :class:`~metalr.meta.LRPrior` (``prior.safetensors``, or ``prior.pt`` without
  safetensors).

``metalr few-shot-eval`` (:func:`metalr.meta.evaluation.few_shot_eval`) scores a checkpoint or an
exported prior on the same fixed test tasks (:func:`fixed_tasks`). The command line lives in
:mod:`metalr.cli`::

    metalr meta-train --config configs/sinusoid_metasgd.yaml task.k_shot=5 --run-dir runs/x
    metalr meta-train --config configs/sinusoid_metasgd.yaml task.k_shot=5 --run-dir runs/x \\
        train.iterations=4000 --resume
    metalr few-shot-eval --checkpoint runs/x/checkpoint.pt eval.num_tasks=600
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalr.meta.learner import MetaLearner
from metalr.meta.results import (
    CHECKPOINT_FORMAT,
    RESULTS_FORMAT,
    atomic_save,
    atomic_write_json,
    config_sha256,
    load_checkpoint,
    pool_chunks,
    provenance,
)
from metalr.meta.run_config import SECTIONS, RunConfig, load_config, resolve_config
from metalr.tasks.base import TaskBatch, TaskSampler

__all__ = [
    "RunConfig",
    "build_model",
    "ensure_run",
    "load_config",
    "make_learner",
    "meta_train",
    "resolve_config",
    "score_test_set",
]


# ------------------------------------------------------------------------------ builders
def build_model(cfg: RunConfig) -> nn.Module:
    """The network, initialised from ``meta.seed``."""
    torch.manual_seed(cfg.meta.seed)
    m = cfg.model
    if m.kind == "mlp":
        widths = [1, *m.hidden, 1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        return nn.Sequential(*layers)
    # MAML's Omniglot CNN (strided 3x3 convolutions) with fewer channels; batch statistics
    # always (as MAML uses them at test time too), so there are no running buffers to mutate.
    layers, c_in, size = [], 1, cfg.task.image_size
    for _ in range(m.blocks):
        layers.append(nn.Conv2d(c_in, m.channels, 3, stride=2, padding=1))
        if m.norm == "batch":
            layers.append(nn.BatchNorm2d(m.channels, track_running_stats=False))
        layers.append(nn.ReLU())
        c_in, size = m.channels, (size + 1) // 2
    layers += [nn.Flatten(), nn.Linear(m.channels * size * size, cfg.task.n_way)]
    return nn.Sequential(*layers)


def _sources(cfg: RunConfig, k_query: int) -> dict[str, Any]:
    """Task samplers for train / val / test splits with ``k_query`` (train uses task.k_query)."""
    t = cfg.task
    if t.source == "sinusoid":
        from metalr.tasks.sinusoid import SinusoidTasks

        return {s: SinusoidTasks(t.k_shot, k_query) for s in ("val", "test")}
    if t.source == "glyphs":
        from metalr.tasks.glyphs import GlyphTasks

        return {s: GlyphTasks(s, t.n_way, t.k_shot, k_query, t.image_size, t.augment,
                              max_scripts=t.max_scripts) for s in ("val", "test")}  # fmt: skip
    from metalr.tasks.omniglot import OmniglotTasks

    # Omniglot has two splits: validation and test tasks both come from images_evaluation
    # (different seeds); the background alphabets are for meta-training only.
    return {s: OmniglotTasks(t.root, "evaluation", t.n_way, t.k_shot, k_query, t.image_size,
                             t.rotations) for s in ("val", "test")}  # fmt: skip


def train_sampler(cfg: RunConfig) -> TaskSampler:
    t = cfg.task
    k_query = t.k_query or t.k_shot
    if t.source == "sinusoid":
        from metalr.tasks.sinusoid import SinusoidTasks

        return SinusoidTasks(t.k_shot, k_query)
    if t.source == "glyphs":
        from metalr.tasks.glyphs import GlyphTasks

        return GlyphTasks("train", t.n_way, t.k_shot, k_query, t.image_size, t.augment,
                          max_scripts=t.max_scripts)  # fmt: skip
    from metalr.tasks.omniglot import OmniglotTasks

    return OmniglotTasks(t.root, "background", t.n_way, t.k_shot, k_query, t.image_size,
                         t.rotations)  # fmt: skip


#: Tasks per draw of a fixed set for samplers that do not name their own ``draw_block``.
DEFAULT_DRAW_BLOCK = 100


def fixed_tasks(sampler: Any, num_tasks: int, seed: int, chunk: int) -> Iterator[TaskBatch]:
    """The same ``num_tasks`` tasks every call, whatever ``chunk``.

    The set is drawn from its own generator (``seed``) in blocks of the sampler's
    ``draw_block`` tasks (:data:`DEFAULT_DRAW_BLOCK` if it names none; ``None``: the whole set
    in one draw), then handed out ``chunk`` at a time: ``chunk`` bounds the memory of the
    vectorised adaptation, the block that of one draw (a draw's temporaries, e.g. the glyph
    augmentation's), and neither changes which tasks are drawn.
    """
    generator = torch.Generator().manual_seed(seed)
    block = getattr(sampler, "draw_block", DEFAULT_DRAW_BLOCK) or num_tasks
    pending: list[TaskBatch] = []
    drawn = handed = 0
    while handed < num_tasks:
        while drawn < min(handed + chunk, num_tasks):
            n = min(block, num_tasks - drawn)
            pending.append(sampler.sample(n, generator))
            drawn += n
        tasks = TaskBatch(*(torch.cat(fields) for fields in zip(*pending)))
        n = min(chunk, num_tasks - handed)
        yield TaskBatch(*(t[:n] for t in tasks))
        pending = [TaskBatch(*(t[n:] for t in tasks))] if drawn > handed + n else []
        handed += n


def evaluate(learner: MetaLearner, batches: Iterator[TaskBatch], steps: int | None) -> dict:
    """Pooled ``learner.evaluate`` over chunks: means and 95% CIs over all tasks."""
    return pool_chunks(learner.evaluate(b, steps) for b in batches)


def _loss_name(cfg: RunConfig) -> str:
    return "mse" if cfg.task.source == "sinusoid" else "cross_entropy"


def make_learner(cfg: RunConfig) -> MetaLearner:
    return MetaLearner(build_model(cfg), cfg.meta, loss_name=_loss_name(cfg))


def _prior_path(run_dir: Path) -> Path:
    return run_dir / (
        "prior.safetensors" if importlib.util.find_spec("safetensors") else "prior.pt"
    )


class _NoBar:
    """Stands in for tqdm when it is not installed or the bar is off."""

    disable = True

    def update(self, n: int) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, initial: int, quiet: bool) -> Any:
    """A tqdm bar on a terminal (``quiet`` or a non-TTY stderr: none, log lines instead)."""
    if quiet or not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="meta-train", unit="it", dynamic_ncols=True)


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ meta-train
def meta_train(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    config_file: str | Path | None = None,
) -> dict[str, Any]:
    """Meta-train ``cfg`` into ``run_dir``; returns the results written to ``results.json``."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    config = cfg.to_dict()
    learner = make_learner(cfg)
    sampler = train_sampler(cfg)
    start, history, val_history, train_seconds = 0, [], [], 0.0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = {**ckpt["config"], "train": {**ckpt["config"]["train"], "iterations": None}}
        ours = {**config, "train": {**config["train"], "iterations": None}}
        if saved != ours:
            differ = [
                f"{s}.{k}" for s in SECTIONS for k in ours[s] if ours[s][k] != saved[s].get(k)
            ]
            raise ValueError(
                f"--resume: {ckpt_path} was made with a different config (differs in: "
                f"{', '.join(differ) or 'name'}); only train.iterations may change"
            )
        learner.load_state_dict(ckpt["learner"])
        start, history = int(ckpt["iteration"]), list(ckpt["history"])
        val_history, train_seconds = list(ckpt["val_history"]), float(ckpt["train_seconds"])
        if start > cfg.train.iterations:
            raise ValueError(
                f"--resume: the checkpoint is at iteration {start}, past train.iterations="
                f"{cfg.train.iterations}"
            )
    elif ckpt_path.exists():
        raise FileExistsError(
            f"{ckpt_path} exists; pass --resume to continue it or choose another --run-dir"
        )
    val_set = _sources(cfg, cfg.eval.k_query)["val"]
    tr = cfg.train

    def validate(iteration: int) -> None:
        batches = fixed_tasks(val_set, tr.val_tasks, tr.val_seed, cfg.eval.chunk)
        val_history.append({"iteration": iteration, **evaluate(learner, batches, cfg.eval.steps)})

    def checkpoint(iteration: int) -> None:
        atomic_save({"format": CHECKPOINT_FORMAT, "iteration": iteration, "config": config,
                     "learner": learner.state_dict(), "history": history,
                     "val_history": val_history, "train_seconds": train_seconds}, ckpt_path)  # fmt: skip

    bar = _progress(tr.iterations, start, quiet)
    tic = time.perf_counter()
    for it in range(start + 1, tr.iterations + 1):
        stats = learner.meta_step(sampler.sample(cfg.meta.meta_batch_size, learner.generator))
        history.append(stats["meta_loss"])
        bar.update(1)
        if it % tr.val_every == 0 or it == tr.iterations:
            validate(it)
            key = "accuracy" if "accuracy" in val_history[-1] else "query_loss"
            bar.set_postfix(meta_loss=f"{stats['meta_loss']:.3f}", **{
                f"val_{key}": f"{val_history[-1][key]:.3f}"})  # fmt: skip
            if bar.disable:
                _log(quiet, f"[{cfg.name}] iteration {it}/{tr.iterations}  meta_loss "
                     f"{stats['meta_loss']:.4f}  val {key} {val_history[-1][key]:.4f}")  # fmt: skip
        if it % tr.checkpoint_every == 0 or it == tr.iterations:
            train_seconds += time.perf_counter() - tic
            tic = time.perf_counter()
            checkpoint(it)
    bar.close()
    if start == tr.iterations and not val_history:
        validate(start)
    train_seconds += time.perf_counter() - tic

    tic = time.perf_counter()
    test = score_test_set(learner, cfg)
    eval_seconds = time.perf_counter() - tic
    prior = learner.export_prior()
    prior.save(_prior_path(run_dir))
    tail = [x for x in history[-100:] if math.isfinite(x)]
    results = {
        "format": RESULTS_FORMAT, "name": cfg.name, "kind": "meta-train",
        "test": test,
        "train": {"iterations": tr.iterations, "skipped_steps": learner.skipped_steps,
                  "meta_loss_last100": sum(tail) / len(tail) if tail else math.nan,
                  "meta_loss_curve": _curve(history), "seconds": train_seconds},
        "validation": val_history,
        "learned": learned_summary(learner),
        "eval_seconds": eval_seconds,
        "wall_time_s": train_seconds + eval_seconds,
        "seed": cfg.meta.seed,
        "files": {"checkpoint": ckpt_path.name, "prior": _prior_path(run_dir).name},
        "provenance": provenance(config, config_file),
    }  # fmt: skip
    atomic_write_json(results, run_dir / "results.json")
    return results


def _curve(history: list[float], points: int = 50) -> dict[str, list]:
    """Mean meta-loss over about ``points`` windows, with each window's last iteration."""
    width = max(1, math.ceil(len(history) / points))
    out: dict[str, list] = {"iteration": [], "meta_loss": []}
    for i in range(0, len(history), width):
        window = [x for x in history[i : i + width] if math.isfinite(x)]
        out["iteration"].append(min(i + width, len(history)))
        out["meta_loss"].append(sum(window) / len(window) if window else None)
    return out


def score_test_set(learner: MetaLearner, cfg: RunConfig) -> dict[str, Any]:
    """Metrics on the fixed test set (``eval.num_tasks`` tasks, ``eval.k_query`` query examples)."""
    test_set = _sources(cfg, cfg.eval.k_query)["test"]
    batches = fixed_tasks(test_set, cfg.eval.num_tasks, cfg.eval.seed, cfg.eval.chunk)
    out = evaluate(learner, batches, cfg.eval.steps)
    out["inner_steps"] = cfg.eval.steps or cfg.meta.inner_steps
    out["k_shot"], out["k_query"] = cfg.task.k_shot, cfg.eval.k_query
    return out


def learned_summary(learner: MetaLearner) -> dict[str, Any]:
    """Geometric-mean learned rate per parameter (per step for LSLR) and learned hypergrad_lr."""
    per_step = learner.config.rates == "step_tensor"
    rates = {}
    for name, r in learner.meta.rate_table().items():
        r = r.detach() if per_step else r.detach().log().mean().exp()
        rates[name] = [round(float(v), 6) for v in r.reshape(-1)]
    hyper = learner.meta.hypergrad_lrs() or {}
    return {
        "rates_geomean": rates,
        "hypergrad_lr": {n: round(float(b.detach()), 6) for n, b in hyper.items()} or None,
    }


# ------------------------------------------------------------------------------ studies
def ensure_run(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    config_file: str | Path | None = None,
    quiet: bool = True,
    keep_checkpoint: bool = True,
) -> dict[str, Any]:
    """Results of ``cfg`` in ``run_dir``: reused when ``results.json`` holds the same config,
    resumed from a checkpoint of the same config, else trained from scratch (the experiment
    scripts call this, so an interrupted study continues where it stopped)."""
    import json

    run_dir = Path(run_dir)
    sha = config_sha256(cfg.to_dict())
    done = run_dir / "results.json"
    if done.is_file():
        results = json.loads(done.read_text())
        if results.get("provenance", {}).get("config_sha256") == sha:
            return results
    ckpt = run_dir / "checkpoint.pt"
    resume = False
    if ckpt.is_file():

        def same(config: dict[str, Any]) -> str:  # every key but train.iterations
            return config_sha256({**config, "train": {**config["train"], "iterations": 0}})

        try:
            saved = load_checkpoint(ckpt)
            resume = same(saved["config"]) == same(cfg.to_dict()) and (
                int(saved["iteration"]) <= cfg.train.iterations
            )
        except (ValueError, RuntimeError, KeyError):
            pass
        if not resume:
            ckpt.unlink()
    results = meta_train(cfg, run_dir, resume=resume, quiet=quiet, config_file=config_file)
    if not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
    return results


_MOVED_TO_EVALUATION = ("few_shot_eval", "prior_metrics", "ensure_prior_eval")


def __getattr__(name: str) -> Any:
    """The few-shot-eval face moved to :mod:`metalr.meta.evaluation`; old imports still work."""
    if name in _MOVED_TO_EVALUATION:
        from metalr.meta import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
