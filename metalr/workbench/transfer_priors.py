"""Meta-learned per-tensor rate priors for the transfer tasks (``prior: task``; issue 13).

Protocol: the prior is meta-trained ONLY on fine-tuning episodes built from the *pretraining*
split, never on the data a run fine-tunes on. An episode is the transfer problem in miniature:
the pretrained body (:func:`metalr.workbench.transfer_tasks.pretrained_body`) with a fresh head,
fine-tuned on a few examples with a freshly permuted labelling and scored on held-in query
examples of the same episode:

* ``animal_transfer``: the 5 pretraining classes (Animal-MNIST 0-4) under a random label
  permutation (the head must be relearned), ``shots`` support and ``query`` query images a class
  from the pretraining images;
* ``text_transfer``: ``shots`` support and ``query`` query windows drawn at random from the
  pretraining text (CPython sources); the GRU runs with the meta-learner's ``loop`` backend
  (``vmap`` does not batch its hidden state).

The meta-learner (:class:`metalr.meta.MetaLearner`) runs the optimizer's own rule in its inner loop
(``adam_hd``: normalized hypergradient rule, β = 0.02 fixed) and learns one rate per tensor
(``rates: tensor``); the initial weights are not learned (``learn_init: false``: the body is the
pretrained one, the head a fixed fresh draw). A fine-tuning run then starts AdamHD at the learned
per-tensor rates and, with the ``"seek"`` rule, tracks from there without a new ramp
(:func:`metalr.meta.load_prior`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from metalr.tasks.base import TaskBatch

_META = {"rates": "tensor", "learn_init": False, "learn_hypergrad_lr": False,
         "hypergrad_lr": 0.02, "inner_lr": 1e-3, "meta_lr": 0.05, "seed": 0}  # fmt: skip
# task → size → {"iterations", "episode": sampler options, "meta": MetaConfig options}
TRANSFER_PRIORS: dict[str, dict[str, dict[str, Any]]] = {
    "animal_transfer": {
        "smoke": {"iterations": 5, "episode": {"shots": 2, "query": 2},
                  "meta": {**_META, "inner_steps": 2, "meta_batch_size": 2}},
        "full": {"iterations": 100, "episode": {"shots": 10, "query": 10},
                 "meta": {**_META, "inner_steps": 10, "meta_batch_size": 4}},
    },
    "text_transfer": {
        "smoke": {"iterations": 3, "episode": {"shots": 2, "query": 2},
                  "meta": {**_META, "inner_steps": 2, "meta_batch_size": 2, "backend": "loop"}},
        "full": {"iterations": 60, "episode": {"shots": 8, "query": 8},
                 "meta": {**_META, "inner_steps": 5, "meta_batch_size": 4, "backend": "loop"}},
    },
}  # fmt: skip


class TextEpisodes:
    """Few-shot episodes of next-character prediction: random windows of a text."""

    loss_name = "cross_entropy"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shots: int, query: int) -> None:
        self.x, self.y, self.shots, self.query = x, y, shots, query

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        idx = torch.randint(len(self.x), (n, self.shots + self.query), generator=generator)
        s, q = idx[:, : self.shots], idx[:, self.shots :]
        return TaskBatch(self.x[s], self.y[s], self.x[q], self.y[q])


def _seq_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a CharGRU) returning logits as ``[batch, vocab, time]``, the layout
    ``cross_entropy`` takes with ``[batch, time]`` targets; same parameter names."""
    from metalr.workbench.tasks import CharGRU

    class SeqLogits(CharGRU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).transpose(1, 2)

    out = SeqLogits(model.embed.num_embeddings, model.embed.embedding_dim, model.gru.hidden_size)
    out.load_state_dict(model.state_dict())
    return out


class PretrainEpisodes:
    """Few-shot episodes from a labelled pretraining set: every class, a random relabelling,
    ``shots`` support and ``query`` query examples a class (``sample(n, generator)``)."""

    loss_name = "cross_entropy"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shots: int, query: int) -> None:
        self.x, self.shots, self.query = x, shots, query
        self.by_class = [torch.nonzero(y == c).squeeze(1) for c in sorted(set(y.tolist()))]

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        out: list[list[torch.Tensor]] = [[], [], [], []]
        k = len(self.by_class)
        for _ in range(n):
            labels = torch.randperm(k, generator=generator)
            sx, sy, qx, qy = [], [], [], []
            for c, idx in enumerate(self.by_class):
                pick = idx[torch.randperm(len(idx), generator=generator)[: self.shots + self.query]]
                sx.append(self.x[pick[: self.shots]])
                qx.append(self.x[pick[self.shots :]])
                sy.append(labels[c].repeat(self.shots))
                qy.append(labels[c].repeat(self.query))
            for part, items in zip(out, (sx, sy, qx, qy)):
                part.append(torch.cat(items))
        return TaskBatch(*(torch.stack(part) for part in out))


def meta_config(task: str, size: str, rule: str) -> tuple[Any, int]:
    from metalr.meta.config import MetaConfig

    entry = TRANSFER_PRIORS[task][size]
    return MetaConfig(inner_rule=rule, **entry["meta"]), entry["iterations"]


def cache_key(task: str, size: str, rule: str) -> dict[str, Any]:
    """What determines the prior (hashed into its cache file name)."""
    from metalr.workbench.transfer_tasks import SPECS, cache_path

    cfg, iterations = meta_config(task, size, rule)
    return {"task_spec": SPECS[task][size], "pretrained": cache_path(task, size).name,
            "episode": TRANSFER_PRIORS[task][size]["episode"], "iterations": iterations,
            "meta": cfg.to_dict()}  # fmt: skip


def meta_train(task: str, size: str, rule: str) -> Any:
    """Meta-train ``task``'s prior on pretraining-split episodes (no cache)."""
    from metalr.meta.learner import MetaLearner
    from metalr.workbench import transfer_tasks as T

    cfg, iterations = meta_config(task, size, rule)
    spec, episode = T.SPECS[task][size], TRANSFER_PRIORS[task][size]["episode"]
    tic = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = T.finetune_model(task, size)
        if task == "animal_transfer":
            episodes: Any = PretrainEpisodes(*T.animal_splits(spec)[0], **episode)
        else:
            episodes, model = TextEpisodes(*T.text_pretraining(spec), **episode), _seq_model(model)
        learner = MetaLearner(model, cfg, loss_name="cross_entropy")
        history = learner.fit(episodes, iterations)
    prior = learner.export_prior()
    tail = [h["meta_loss"] for h in history[-10:] if h["finite"]]
    prior.provenance.update(
        task=task, size=size, iterations=iterations, episode=episode, split="pretraining",
        skipped_steps=learner.skipped_steps, meta_train_s=round(time.perf_counter() - tic, 2),
        first_meta_loss=history[0]["meta_loss"] if history else None,
        final_meta_loss=sum(tail) / len(tail) if tail else None,
    )  # fmt: skip
    return prior
