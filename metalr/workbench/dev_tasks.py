"""Development tasks: for diagnosing a failure without spending a held-out task on it.

Study 1 scores the ``"seek"`` controller on its six tasks and, apart, on three held-out ones
(:mod:`metalr.workbench.heldout_tasks`) that no fit or selection may read. When a held-out task
shows a failure (the character-level transformer settles its rate ~10× below the best fixed Adam
rate), diagnosing it *on that task* would make it a training task. A development task reproduces
the failure on other data, so the diagnosis and any candidate's development runs use it instead:

* ``kjv_transformer``: the held-out transformer's model (:class:`~metalr.workbench.heldout_tasks.
  CharTransformer`, pre-norm, learned positions, no warm-up) on the King James Bible from
  character 1,000,000 on (``charlm_gru`` reads the first 1,000,000), 400 steps of 32 windows of 64
  characters. It shares the held-out task's architecture family: after a change chosen on it, the
  held-out transformer still has unseen data, but not an unseen kind of model — reports say so.

It is in no study's grid that a goal is scored on; ``configs/dev_transformer.yaml`` runs its own
lr grid (``python -m metalr.workbench.cli run configs/dev_transformer.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metalr.workbench.heldout_tasks import CharTransformer

Split = tuple[torch.Tensor, torch.Tensor]
Built = tuple[Callable[[], nn.Module], list[Split], "int | None", Callable[..., torch.Tensor]]


def build_kjv_transformer(spec: dict[str, Any], fallback_text: bool) -> Built:
    """``(make_model, [train, val, test], batch_size, loss)`` of ``kjv_transformer``: windows of
    ``seq`` characters from ``spec["chars"]`` characters of the KJV text starting at
    ``spec["offset"]`` (the short built-in text from its start with ``fallback_text``), split
    80/10/10 contiguously (no validation window was trained on)."""
    from metalr.workbench.tasks import FALLBACK_TEXT, _ce, bible_text

    source = FALLBACK_TEXT if fallback_text else bible_text()[spec["offset"] :]
    text = source[: spec["chars"]]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    seq = spec["seq"]
    n = (len(ids) - 1) // seq
    x, y = ids[: n * seq].reshape(n, seq), ids[1 : n * seq + 1].reshape(n, seq)
    a, b = int(0.8 * n), int(0.9 * n)
    c = spec.get("eval_windows") or n
    splits = [(x[:a], y[:a]), (x[a:b][:c], y[a:b][:c]), (x[b:][:c], y[b:][:c])]
    v, width, layers, heads = len(vocab), spec["width"], spec["layers"], spec["heads"]
    return lambda: CharTransformer(v, seq, width, layers, heads), splits, spec["batch_size"], _ce


DEV_SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "kjv_transformer": {
        "smoke": {"offset": 1_000_000, "chars": 20_000, "seq": 32, "width": 32, "layers": 1,
                  "heads": 2, "batch_size": 16, "eval_windows": 64},
        "full": {"offset": 1_000_000, "chars": 400_000, "seq": 64, "width": 64, "layers": 2,
                 "heads": 4, "batch_size": 32, "eval_windows": 256},
    },
}  # fmt: skip

BUILDERS: dict[str, Callable[[dict[str, Any], bool], Built]] = {
    "kjv_transformer": build_kjv_transformer,
}
