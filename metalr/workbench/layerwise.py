"""Layer-wise rates and batch sizes for workbench optimizer specs (issue 13).

Spec keys (in :data:`metalr.workbench.optimizers.META_KEYS`, not constructor arguments)::

    adam_llrd:   {kind: adam, layer_decay: 0.5}        # layer at depth d trains at lr × 0.5^d
    adam_freeze: {kind: adam, freeze_body: 0.3}        # body frozen for the first 30% of steps
    llrd_tuned:  {kind: tuned_adam, search: random, trials: 8, layer_decay_range: [0.1, 1.0]}
    adam_bs256:  {kind: adam, batch_size: 256, epochs: 20}   # 20 passes over the training set
    adam_hd_1e3: {kind: adam_hd, lrs: [1.0e-3]}        # this spec's own initial-lr grid

*Depth* counts layers down from the output: a layer is a module owning parameters directly; the
last one in ``model.named_parameters()`` order (the head) has depth 0, the one before it 1, and
so on (a CNN ``conv1, conv2, head``: 2, 1, 0). ``layer_decay`` is the discriminative fine-tuning
of ULMFiT (Howard & Ruder 2018) and the layer-wise decay of BERT/ViT fine-tuning recipes.
``freeze_body`` (a fraction of the run) trains only the head first (the body's rate is 0, so Adam's
moments of the body still accumulate), then everything at the same rate ("gradual unfreezing" in
one stage). ``batch_size`` replaces the task's; with ``epochs`` the run takes
``round(epochs × training examples / batch_size)`` steps (the same number of examples for every
batch size, as in Goyal et al. 2017), else the study's steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from metalr.functional._common import real_number

GROUP_KEYS = ("layer_decay", "freeze_body")


def layer_names(model: nn.Module) -> list[str]:
    """The modules owning trainable parameters, in ``named_parameters()`` order (head last)."""
    names: list[str] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if owner not in names:
                names.append(owner)
    return names


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name → depth (0 for the parameters of the last layer, the head)."""
    layers = layer_names(model)
    depth = {layer: len(layers) - 1 - i for i, layer in enumerate(layers)}
    return {name: depth[name.rsplit(".", 1)[0] if "." in name else ""]
            for name, p in model.named_parameters() if p.requires_grad}  # fmt: skip


def uses_groups(spec: dict[str, Any]) -> bool:
    return any(spec.get(k) is not None for k in GROUP_KEYS)


def param_groups(model: nn.Module, lr: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """One param group per layer, at ``lr × layer_decay ** depth``; each group records its
    ``depth`` and ``lr_scale`` (for the freeze schedule and the reports)."""
    depths = layer_depths(model)
    named = dict(model.named_parameters())
    groups: dict[int, dict[str, Any]] = {}
    for name, d in depths.items():
        g = groups.setdefault(d, {"params": [], "depth": d, "lr_scale": layer_decay**d})
        g["params"].append(named[name])
    out = sorted(groups.values(), key=lambda g: -g["depth"])
    for g in out:
        g["lr"] = lr * g["lr_scale"]
    return out


def freeze_schedule(opt: torch.optim.Optimizer, fraction: float, steps: int) -> Any:
    """A LambdaLR holding every group of depth > 0 at rate 0 for ``round(fraction × steps)``
    optimizer steps, then at its own rate."""
    frozen = round(fraction * steps)
    lambdas = [
        (lambda s: 1.0) if g.get("depth", 0) == 0 else (lambda s: 0.0 if s < frozen else 1.0)
        for g in opt.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def check(name: str, spec: dict[str, Any]) -> None:
    """Raise ValueError for a malformed layer-wise or batch-size key of spec ``name``."""
    where = f"optimizers.{name}"
    decay = spec.get("layer_decay")
    if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
        raise ValueError(f"Invalid value for {where}.layer_decay: {decay!r} (expected 0 < γ <= 1)")
    frac = spec.get("freeze_body")
    if frac is not None and not (isinstance(frac, (int, float)) and 0 < frac < 1):
        raise ValueError(f"Invalid value for {where}.freeze_body: {frac!r} (expected a fraction "
                         "of the run in (0, 1))")  # fmt: skip
    if frac is not None and spec.get("plateau") is not None:
        raise ValueError(f"Invalid {where}: freeze_body is a schedule; plateau replaces it")
    if frac is not None and spec.get("schedule", "none") != "none":
        raise ValueError(f"Invalid {where}: freeze_body is a schedule; it cannot be combined with "
                         f"schedule {spec['schedule']!r}")  # fmt: skip
    if uses_groups(spec) and spec.get("prior") is not None:
        raise ValueError(f"Invalid {where}: a prior sets its own per-tensor rates; layer_decay "
                         "and freeze_body are for specs without one")  # fmt: skip
    rng = spec.get("layer_decay_range")
    if rng is not None:
        if spec["kind"] != "tuned_adam" or spec.get("search", "grid") == "grid":
            raise ValueError(f"Invalid {where}.layer_decay_range: only for kind tuned_adam with "
                             "search random or bayes")  # fmt: skip
        if not (isinstance(rng, list) and len(rng) == 2 and 0 < rng[0] <= rng[1] <= 1):
            raise ValueError(f"Invalid value for {where}.layer_decay_range: {rng!r} (expected "
                             "[low, high] with 0 < low <= high <= 1)")  # fmt: skip
        if decay is not None:
            raise ValueError(f"Invalid {where}: layer_decay and layer_decay_range both given")
    for key in ("batch_size", "epochs"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (key == "batch_size" and not isinstance(v, int))):  # fmt: skip
            raise ValueError(f"Invalid value for {where}.{key}: {v!r} (expected a positive "
                             f"{'integer' if key == 'batch_size' else 'number'})")  # fmt: skip
    if spec.get("epochs") is not None and spec.get("batch_size") is None:
        raise ValueError(f"Invalid {where}: epochs needs batch_size")
    lrs = spec.get("lrs")
    if isinstance(lrs, list):  # YAML 1.1 reads 1e-3 (no dot) as a string, as at the top level
        spec["lrs"] = lrs = [_number(x) for x in lrs]
    if lrs is not None and (not isinstance(lrs, list) or not lrs or any(
            not (isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf)
            for x in lrs)):  # fmt: skip
        raise ValueError(
            f"Invalid value for {where}.lrs: {lrs!r} (expected positive, finite rates)"
        )
    if lrs is not None and len(set(lrs)) != len(lrs):
        raise ValueError(f"Invalid value for {where}.lrs: {lrs!r} (repeated entries)")


def _number(value: Any) -> Any:
    """A string that spells a number, as that number (else ``value`` as it is)."""
    number = real_number(value) if isinstance(value, str) else None
    return value if number is None else number


def run_steps(spec: dict[str, Any], train_examples: int, steps: int) -> int:
    """The step budget of a run of ``spec``: from ``epochs`` when given, else ``steps``."""
    if spec.get("epochs") is None:
        return steps
    return max(1, round(spec["epochs"] * train_examples / spec["batch_size"]))


def lr_geomean(opt: torch.optim.Optimizer) -> float:
    """The size-weighted geometric mean of the effective rates over all parameter elements
    (metalr: ``lr × multiplier``, a per-tensor rate counting once per element of its tensor;
    others: each group's ``lr``). 0 when any rate is 0 (e.g. a frozen body)."""
    pairs: list[tuple[torch.Tensor, int]] = []  # (log-rates, weight of each)
    if hasattr(opt, "effective_lrs"):
        for p, rate in opt.effective_lrs().items():
            r = rate.detach().double().reshape(-1).cpu()
            pairs.append((r, p.numel() if r.numel() == 1 else 1))
    else:
        for g in opt.param_groups:
            pairs.append((torch.tensor([float(g["lr"])], dtype=torch.float64),
                          sum(p.numel() for p in g["params"])))  # fmt: skip
    if any(bool((r <= 0).any()) for r, _ in pairs):
        return 0.0
    logs = sum(float(r.log().sum()) * w for r, w in pairs)
    total = sum(r.numel() * w for r, w in pairs)
    return math.exp(logs / total)
