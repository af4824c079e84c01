"""Transfer-learning tasks: fine-tune a pretrained body with a fresh head on little data (issue 13).

Each task pretrains a model once on one part of an offline dataset (deterministic: a fixed seed,
one thread's worth of work), caches the pretrained weights, and fine-tunes from them on another
part with a freshly initialised head:

* ``animal_transfer``: a two-block CNN pretrained on Animal-MNIST classes 0-4 (all 5,000 images,
  a 5-way head), fine-tuned on classes 5-9 (relabelled 0-4) with 50 training images a class
  (``full``); validation 150 and test 200 images a class, disjoint from training;
* ``text_transfer``: a character GRU over ASCII (a fixed 128-symbol vocabulary, so both texts
  share it) pretrained on CPython standard-library sources and fine-tuned on the first 20,000
  characters of the KJV Bible (validation and test: windows from later in the Bible).
  ``fallback_text=True`` fine-tunes on the tiny built-in text instead (tests only).

The pretrained artefact lives in ``$METALR_CACHE/workbench/pretrained/<task>-<size>-<hash>.pt``
(the hash covers everything that determines it: format, task spec, pretraining options); the
first run that needs it pretrains it under a file lock (other processes wait, then read it).
Every fine-tuning model is ``body (pretrained) + head (fresh, from the run's seed)``: the head is
the module named ``head``, the last layer; :func:`metalr.workbench.layerwise.layer_depths`
numbers the layers from it (head 0, the layer below 1, ...).
"""

from __future__ import annotations

import fcntl
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "metalr.workbench-pretrained/1"  # bump to invalidate every cached pretrained body
Split = tuple[torch.Tensor, torch.Tensor]
Built = tuple[Callable[[], nn.Module], list[Split], "int | None", Callable[..., torch.Tensor]]
VOCAB = 128  # ASCII: both texts share one vocabulary


class TransferCNN(nn.Module):
    """Two conv-ReLU-maxpool blocks (28 → 14 → 7) and a linear ``head``."""

    def __init__(self, c1: int, c2: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


def _ascii_ids(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), VOCAB - 1) for c in text], dtype=torch.long)


# ------------------------------------------------------------------------------------- the data
def animal_splits(spec: dict[str, Any]) -> tuple[Split, list[Split]]:
    """``(pretraining set, [train, val, test])``: classes 0-4 for pretraining; classes 5-9,
    relabelled 0-4, ``shots`` / ``val_per_class`` / ``test_per_class`` images a class."""
    from metalr.workbench.tasks import _animal_mnist

    x, y = _animal_mnist()
    x = x.unsqueeze(1).float() / 255.0
    x = (x - 0.5) / 0.5  # one fixed scale for both parts: the body sees the same inputs
    gen = torch.Generator().manual_seed(0)
    pre = torch.nonzero(y < 5).squeeze(1)
    pre = pre[torch.randperm(len(pre), generator=gen)][: spec["pretrain_examples"]]
    parts: list[list[torch.Tensor]] = [[], [], []]
    counts = (spec["shots"], spec["val_per_class"], spec["test_per_class"])
    for c in range(5, 10):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        a, b = counts[0], counts[0] + counts[1]
        for part, sl in zip(parts, (idx[:a], idx[a:b], idx[b : b + counts[2]])):
            part.append(sl)
    splits = []
    for part in parts:
        idx = torch.cat(part)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        splits.append((x[idx], y[idx] - 5))
    return (x[pre], y[pre]), splits


def text_pretraining(spec: dict[str, Any]) -> Split:
    """The pretraining windows: CPython standard-library sources."""
    from metalr.workbench.heldout_tasks import stdlib_text
    from metalr.workbench.tasks import _windows

    return _windows(_ascii_ids(stdlib_text()[: spec["pretrain_chars"]]), spec["seq"])


def text_splits(spec: dict[str, Any], fallback_text: bool) -> list[Split]:
    """``[train, val, test]``: the Bible's first ``finetune_chars`` characters for training and
    ``eval_windows`` windows each from its second half."""
    from metalr.workbench.tasks import FALLBACK_TEXT, _windows, bible_text

    seq = spec["seq"]
    text = FALLBACK_TEXT if fallback_text else bible_text()
    n_train, n_eval = spec["finetune_chars"], spec["eval_windows"] * seq + 1
    train = text[:n_train]
    # validation and test from later in the text: no window overlaps the training characters
    rest = text[n_train:] if fallback_text else text[len(text) // 2 :]
    val, test = rest[:n_eval], rest[n_eval : 2 * n_eval]
    if len(test) < n_eval:
        raise ValueError(f"text_transfer: the fine-tuning text is too short ({len(text)} chars)")
    return [_windows(_ascii_ids(t), seq) for t in (train, val, test)]


# --------------------------------------------------------------------------------------- models
def _model(name: str, spec: dict[str, Any], classes: int) -> nn.Module:
    if name == "animal_transfer":
        return TransferCNN(*spec["channels"], classes)
    from metalr.workbench.tasks import CharGRU

    return CharGRU(VOCAB, spec["embed"], spec["hidden"])


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def pretrain(name: str, size: str) -> dict[str, torch.Tensor]:
    """Pretrain task ``name``'s model at ``size`` (no cache); returns the body's state dict
    (every weight but the head's). Deterministic: seeded model, batches and one thread."""
    spec = SPECS[name][size]
    x, y = animal_splits(spec)[0] if name == "animal_transfer" else text_pretraining(spec)
    opts = spec["pretrain"]
    threads = torch.get_num_threads()
    tic = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            torch.manual_seed(opts["seed"])
            model = _model(name, spec, classes=5 if name == "animal_transfer" else VOCAB)
            opt = torch.optim.Adam(model.parameters(), lr=opts["lr"])
            gen = torch.Generator().manual_seed(opts["seed"])
            for _ in range(opts["steps"]):
                idx = torch.randint(len(x), (opts["batch_size"],), generator=gen)
                loss = _loss(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    body = {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("head.")}  # fmt: skip
    body["_pretrain_loss"] = torch.tensor(float(loss.detach()))
    body["_pretrain_s"] = torch.tensor(time.perf_counter() - tic)
    return body


def cache_path(name: str, size: str) -> Path:
    from metalr.meta.results import config_sha256
    from metalr.workbench.tasks import cache_dir

    key = {"format": FORMAT, "task": name, "size": size, "spec": SPECS[name][size]}
    return cache_dir() / "pretrained" / f"{name}-{size}-{config_sha256(key)[:16]}.pt"


@functools.lru_cache(maxsize=8)
def _pretrained(path: Path, name: str, size: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:  # one process pretrains
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    torch.save(pretrain(name, size), tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    return torch.load(path, weights_only=True)


def pretrained_body(name: str, size: str) -> dict[str, torch.Tensor]:
    """The body weights of ``name`` at ``size`` (``_pretrain_*`` entries: its final pretraining
    minibatch loss and seconds): from the cache, else pretrained once and cached."""
    return _pretrained(cache_path(name, size), name, size)


def finetune_model(name: str, size: str) -> nn.Module:
    """The pretrained body with a fresh head (drawn from the global RNG)."""
    spec = SPECS[name][size]
    body = {k: v for k, v in pretrained_body(name, size).items() if not k.startswith("_")}
    model = _model(name, spec, 5 if name == "animal_transfer" else VOCAB)
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"pretrained body does not fit {name}: {missing} {unexpected}")
    return model


def build_transfer(name: str, spec: dict[str, Any], size: str, fallback_text: bool) -> Built:
    """``(make_model, [train, val, test], batch_size, loss)`` of transfer task ``name``."""
    if name == "animal_transfer":
        splits = animal_splits(spec)[1]
    else:
        splits = text_splits(spec, fallback_text)
    pretrained_body(name, size)  # pretrain (once) before any run starts
    return functools.partial(finetune_model, name, size), splits, spec["batch_size"], _loss


SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "animal_transfer": {
        "smoke": {"channels": [8, 16], "pretrain_examples": 1000, "shots": 20,
                  "val_per_class": 40, "test_per_class": 40, "batch_size": 50,
                  "pretrain": {"steps": 30, "batch_size": 64, "lr": 3e-3, "seed": 0}},
        "full": {"channels": [16, 32], "pretrain_examples": 5000, "shots": 50,
                 "val_per_class": 150, "test_per_class": 200, "batch_size": 50,
                 "pretrain": {"steps": 600, "batch_size": 128, "lr": 2e-3, "seed": 0}},
    },
    "text_transfer": {
        "smoke": {"embed": 16, "hidden": 32, "seq": 32, "pretrain_chars": 20_000,
                  "finetune_chars": 2_000, "eval_windows": 16, "batch_size": 16,
                  "pretrain": {"steps": 30, "batch_size": 16, "lr": 3e-3, "seed": 0}},
        "full": {"embed": 32, "hidden": 128, "seq": 64, "pretrain_chars": 400_000,
                 "finetune_chars": 20_000, "eval_windows": 128, "batch_size": 32,
                 "pretrain": {"steps": 1000, "batch_size": 32, "lr": 3e-3, "seed": 0}},
    },
}  # fmt: skip
