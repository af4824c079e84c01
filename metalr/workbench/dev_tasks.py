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
lr grid (``metalr ablate --config configs/dev_transformer.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metalr.workbench.heldout_tasks import Built, build_char_transformer


def build_kjv_transformer(spec: dict[str, Any], fallback_text: bool) -> Built:
    """``(make_model, [train, val, test], batch_size, loss)`` of ``kjv_transformer``: the held-out
    transformer's task (:func:`~metalr.workbench.heldout_tasks.build_char_transformer`) on
    ``spec["chars"]`` characters of the KJV text from ``spec["offset"]`` on (the short built-in
    text from its start with ``fallback_text``)."""
    from metalr.workbench.tasks import FALLBACK_TEXT, bible_text

    source = FALLBACK_TEXT if fallback_text else bible_text()[spec["offset"] :]
    return build_char_transformer(source[: spec["chars"]], spec)


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
