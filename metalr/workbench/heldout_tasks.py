"""Held-out workbench tasks: never used to fit the ``"seek"`` controller's constants.

The controller's defaults (:mod:`metalr.functional._controller`) are fitted by
``experiments/fit_controller.py`` on a training suite of study 1's tasks. These three tasks differ
from that suite in architecture, loss and data, so a study can report how the fitted defaults
transfer (``configs/ablate_study6_one_run.yaml`` reports them apart):

* ``pysrc_transformer``: a character-level causal transformer (pre-norm, learned positions) on the
  sources of a fixed list of CPython standard-library modules (read from the running interpreter's
  ``lib/`` folder: offline, but the text varies slightly with the Python version);
* ``animal_autoencoder``: a ReLU MLP autoencoder (784-256-32-256-784, MSE on pixels in [0, 1]) on
  Animal-MNIST silhouettes;
* ``diabetes_mlp``: regression of sklearn's bundled diabetes progression target (442 patients,
  10 features, standardized) with a 10-64-64-1 ReLU MLP: it overfits within a few hundred steps.

Each builder returns ``(make_model, splits, batch_size, loss)`` for :func:`make_task` (the
shared helpers come from :mod:`metalr.workbench.tasks`, imported when a builder runs).
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: Standard-library modules whose sources make the transformer's text (in this order).
STDLIB_MODULES = (
    "argparse", "difflib", "statistics", "fractions", "calendar", "heapq", "textwrap",
    "shlex", "string", "bisect", "dataclasses", "functools", "inspect", "pathlib",
    "tokenize", "csv", "json/decoder", "json/encoder", "configparser", "enum",
)  # fmt: skip

Split = tuple[torch.Tensor, torch.Tensor]
Built = tuple[Callable[[], nn.Module], list[Split], "int | None", Callable[..., torch.Tensor]]


@functools.cache
def stdlib_text() -> str:
    """The ASCII sources of :data:`STDLIB_MODULES`, concatenated; raises if none is found."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="ignore"))
    if not parts:
        raise FileNotFoundError(f"no standard-library sources under {root} (pysrc_transformer)")
    return "".join(ch for ch in "\n".join(parts) if ch.isascii())


class CharTransformer(nn.Module):
    """A small pre-norm causal transformer over characters (learned positional embeddings)."""

    def __init__(self, vocab: int, seq: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> list[Split]:
    """60/20/20 train/validation/test after a fixed shuffle."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return [(x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])]


def char_windows(text: str, seq: int, eval_windows: int | None) -> tuple[int, list[Split]]:
    """``(vocabulary size, [train, val, test])`` of next-character windows of ``seq`` characters
    of ``text``, split 80/10/10 contiguously (no validation window was trained on); validation
    and test keep their first ``eval_windows`` windows (all when None)."""
    from metalr.workbench.tasks import _windows

    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    x, y = _windows(torch.tensor([lookup[c] for c in text], dtype=torch.long), seq)
    n = len(x)
    a, b = int(0.8 * n), int(0.9 * n)
    c = eval_windows or n
    return len(vocab), [(x[:a], y[:a]), (x[a:b][:c], y[a:b][:c]), (x[b:][:c], y[b:][:c])]


def build_char_transformer(text: str, spec: dict[str, Any]) -> Built:
    """A :class:`CharTransformer` task on ``text`` (``spec``: ``seq``, ``width``, ``layers``,
    ``heads``, ``batch_size``, optional ``eval_windows``)."""
    from metalr.workbench.tasks import _ce

    seq = spec["seq"]
    v, splits = char_windows(text, seq, spec.get("eval_windows"))
    width, layers, heads = spec["width"], spec["layers"], spec["heads"]
    return lambda: CharTransformer(v, seq, width, layers, heads), splits, spec["batch_size"], _ce


def build_pysrc_transformer(spec: dict[str, Any]) -> Built:
    return build_char_transformer(stdlib_text()[: spec["chars"]], spec)


def build_animal_autoencoder(spec: dict[str, Any]) -> Built:
    from metalr.workbench.tasks import _animal_mnist, _mlp

    x, _ = _animal_mnist()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[: spec["examples"]]
    flat = x[order].reshape(len(order), -1).float() / 255.0
    splits = _split(flat, flat)
    widths = [784, *spec["hidden"], 784]
    return lambda: _mlp(widths), splits, spec["batch_size"], F.mse_loss


def build_diabetes_mlp(spec: dict[str, Any]) -> Built:
    from metalr.workbench.tasks import _mlp

    try:
        from sklearn.datasets import load_diabetes
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ImportError(
            'diabetes_mlp needs scikit-learn: pip install "metalr[experiments]"'
        ) from exc
    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32).unsqueeze(1)
    splits = _split(x, y)
    (xt, yt) = splits[0]
    xm, xs, ym, ys = xt.mean(0), xt.std(0), yt.mean(), yt.std()
    splits = [((a - xm) / xs, (b - ym) / ys) for a, b in splits]
    widths = [10, *spec["hidden"], 1]
    return lambda: _mlp(widths), splits, spec["batch_size"], F.mse_loss


HELDOUT_SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "pysrc_transformer": {
        "smoke": {"chars": 20_000, "seq": 32, "width": 32, "layers": 1, "heads": 2,
                  "batch_size": 16, "eval_windows": 64},
        "full": {"chars": 400_000, "seq": 64, "width": 64, "layers": 2, "heads": 4,
                 "batch_size": 32, "eval_windows": 256},
    },
    "animal_autoencoder": {
        "smoke": {"examples": 600, "hidden": [64, 16, 64], "batch_size": 64},
        "full": {"examples": 5000, "hidden": [256, 32, 256], "batch_size": 128},
    },
    "diabetes_mlp": {
        "smoke": {"hidden": [16], "batch_size": None},
        "full": {"hidden": [64, 64], "batch_size": 32},
    },
}  # fmt: skip

BUILDERS: dict[str, Callable[[dict[str, Any]], Built]] = {
    "pysrc_transformer": build_pysrc_transformer,
    "animal_autoencoder": build_animal_autoencoder,
    "diabetes_mlp": build_diabetes_mlp,
}
