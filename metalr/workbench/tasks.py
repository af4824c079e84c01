"""Training tasks of the ablation workbench, each in a ``smoke`` (seconds) and a ``full`` size.

Every task uses offline data only and caches its preparation (``$METALR_CACHE``, default
``~/.cache/metalr/workbench``):

* ``digits_logreg`` / ``digits_mlp``: sklearn's bundled 8×8 digits (1797 images), softmax
  regression / ReLU MLP;
* ``mnist1d_mlp``: mnist1d (``pip install mnist1d``; generated locally with
  ``make_dataset(get_dataset_args())``, never downloaded), ReLU MLP;
* ``charlm_gru``: a character-level GRU language model on the King James Bible
  (``apt-get install -y bible-kjv``; read with ``bible -f 'Gen1:1-Rev22:21'``).
  ``fallback_text=True`` uses a tiny built-in text instead (tests only).

A :class:`Task` builds a fresh model from a seed, draws training batches from its own generator
(seeded per run: init and batch order vary with the seed, the data split does not) and scores a
model on the fixed validation (and test) split.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SIZES = ("smoke", "full")
BIBLE_INSTALL = "apt-get install -y bible-kjv"
MNIST1D_INSTALL = 'pip install "torch==2.13.0" mnist1d'

FALLBACK_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face "
    "of the waters. And God said, Let there be light: and there was light. And God saw the light, "
    "that it was good: and God divided the light from the darkness. And God called the light Day, "
    "and the darkness he called Night. And the evening and the morning were the first day.\n"
) * 40


def cache_dir() -> Path:
    root = Path(os.environ.get("METALR_CACHE", Path.home() / ".cache" / "metalr")) / "workbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Task:
    """A prepared task: data on ``device``, a model factory and the batch/loss functions."""

    name: str
    size: str
    make_model: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    batch_size: int | None  # None: full batch
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def model(self, seed: int, device: str | torch.device = "cpu") -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model().to(device)

    def batches(self, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """A function returning the next training batch (its own generator from ``seed``)."""
        x, y = self.train
        if self.batch_size is None or self.batch_size >= len(x):
            return lambda: (x, y)
        gen = torch.Generator().manual_seed(10_000 + seed)
        n, bs = len(x), self.batch_size
        state = {"perm": torch.randperm(n, generator=gen), "pos": 0}

        def nxt() -> tuple[torch.Tensor, torch.Tensor]:
            if state["pos"] + bs > n:
                state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
            idx = state["perm"][state["pos"] : state["pos"] + bs].to(x.device)
            state["pos"] += bs
            return x[idx], y[idx]

        return nxt

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val") -> float:
        x, y = getattr(self, split)
        loss = float(self.loss(model(x), y))
        return loss if math.isfinite(loss) else float("inf")


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _split(x: torch.Tensor, y: torch.Tensor, fractions=(0.6, 0.2), seed: int = 0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = int(fractions[0] * len(x)), int((fractions[0] + fractions[1]) * len(x))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _standardize(train, *others):
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    return [((x - mean) / std, y) for x, y in (train, *others)]


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ImportError(
            'digits tasks need scikit-learn: pip install "metalr[experiments]"'
        ) from exc
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


@functools.cache
def _mnist1d() -> tuple[torch.Tensor, torch.Tensor]:
    path = cache_dir() / "mnist1d.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(f"the mnist1d task needs the mnist1d package: {MNIST1D_INSTALL}") from exc
    d = make_dataset(get_dataset_args())  # generated locally; no download
    x = torch.cat([torch.as_tensor(d["x"]), torch.as_tensor(d["x_test"])]).float()
    y = torch.cat([torch.as_tensor(d["y"]), torch.as_tensor(d["y_test"])]).long()
    from metalr.meta.results import atomic_save

    atomic_save({"x": x, "y": y}, path)
    return x, y


def bible_text() -> str:
    """The KJV Bible as plain text (cached); raises naming the install command when missing."""
    path = cache_dir() / "kjv.txt"
    if path.is_file():
        return path.read_text()
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            f"the charlm_gru task needs the KJV text: {BIBLE_INSTALL} (provides the `bible` "
            "command), or pass fallback_text=True for a tiny built-in text (tests only)"
        )
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True, timeout=300).stdout  # fmt: skip
    if len(out) < 100_000:
        raise FileNotFoundError(f"`bible -f` returned only {len(out)} characters; reinstall: "
                                f"{BIBLE_INSTALL}")  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(out)
    os.replace(tmp, path)
    return out


class CharGRU(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0])


def _windows(ids: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1 : n * seq + 1].reshape(n, seq)
    return x, y


# size → options; "full" sizes are for real studies, "smoke" ones train in seconds.
SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "digits_logreg": {"smoke": {"hidden": [], "batch_size": None},
                      "full": {"hidden": [], "batch_size": 128}},
    "digits_mlp": {"smoke": {"hidden": [64], "batch_size": None},
                   "full": {"hidden": [128, 128], "batch_size": 128}},
    "mnist1d_mlp": {"smoke": {"hidden": [64], "batch_size": 256, "examples": 1500},
                    "full": {"hidden": [256, 256], "batch_size": 128, "examples": None}},
    "charlm_gru": {"smoke": {"chars": 30_000, "seq": 64, "embed": 16, "hidden": 64,
                             "batch_size": 32},
                   "full": {"chars": 2_000_000, "seq": 128, "embed": 64, "hidden": 256,
                            "batch_size": 64}},
}  # fmt: skip
TASKS = tuple(SPECS)


def make_task(
    name: str, size: str = "smoke", device: str | torch.device = "cpu", *,
    fallback_text: bool = False,
) -> Task:  # fmt: skip
    """Prepare task ``name`` at ``size`` with its data on ``device``."""
    if name not in SPECS:
        raise ValueError(f"Unknown task {name!r}; expected one of {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"Invalid task size {size!r}; expected one of {SIZES}")
    spec = SPECS[name][size]
    if name.startswith(("digits", "mnist1d")):
        x, y = _digits() if name.startswith("digits") else _mnist1d()
        if spec.get("examples"):
            x, y = x[: spec["examples"]], y[: spec["examples"]]
        splits = _standardize(*_split(x, y))
        widths = [x.shape[1], *spec["hidden"], 10]
        make_model: Callable[[], nn.Module] = lambda: _mlp(widths)
    else:
        text = FALLBACK_TEXT if fallback_text else bible_text()
        text = text[: spec["chars"]]
        vocab = sorted(set(text))
        lookup = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        x, y = _windows(ids, spec["seq"])
        # contiguous split (no window of the validation text was seen in training)
        a, b = int(0.8 * len(x)), int(0.9 * len(x))
        splits = [(x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])]
        v, e, h = len(vocab), spec["embed"], spec["hidden"]
        make_model = lambda: CharGRU(v, e, h)
    splits = [(xs.to(device), ys.to(device)) for xs, ys in splits]
    return Task(name, size, make_model, *splits, batch_size=spec["batch_size"], loss=_ce)
