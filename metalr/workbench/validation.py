"""A validation stream in the workbench: rates that watch it, ReduceLROnPlateau, early stopping.

A spec with ``validation_data`` draws a validation minibatch every ``every`` training steps (from
the task's validation split, its own generator per seed; ``batch`` examples, default the task's
training batch size, the whole split when it is smaller or ``batch`` is ``all``) and gives its
loss to whatever in the spec uses it, so every method that watches the validation loss spends the
same validation data::

    adam_hd_val:   {kind: adam_hd, validation_data: {every: 10}}
    adam_hd_pass:  {kind: adam_hd, validation_data: {every: 20, batch: all, gradient: false}}
    adam_plateau:  {kind: adam, validation_data: {every: 10}, plateau: {factor: 0.1, patience: 3}}
    adam_es:       {kind: adam, validation_data: {every: 10}, early_stopping: {patience: 5}}

* metalr optimizers call ``optimizer.observe_validation(loss)`` at every draw (the validation
  hypergradient, :mod:`metalr.functional.validation`); with ``gradient: false`` the loss is
  computed under ``no_grad`` and observed alone (``hypergradient=False``: the seek rule's hold
  and rewind read it, nothing is backpropagated);
* ``plateau``: torch's ``ReduceLROnPlateau`` (``factor``, ``patience``; torch's other defaults),
  stepped once per *check* with the mean loss of the check's draws; a check is ``check`` draws,
  by default ``min(ceil(validation examples / batch), 4)``: about one pass over a small
  validation split (what a user who evaluates "every epoch" would feed it), and at most 4 draws
  so that a short run still gets checks;
* ``validation: {ray_steps: budget}`` (an optimizer option, :mod:`metalr.functional._ray`): the
  ray ceiling given the run's own step budget (:func:`with_step_budget`), e.g. the recommended
  option ``{kind: adam_hd, validation: {ray_steps: budget}, validation_data: {every: 20}}``,
  or the ray alone on the whole split's gradient ``{kind: adam_hd, validation: {ray_steps:
  budget, hypergrad_lr: 0, hold: 0, ray_clock: 0, ray_gate: 1}, validation_data: {every: 20,
  batch: all}}``;
* ``early_stopping``: stop when ``patience`` checks in a row have not improved on the best check,
  and restore the weights of the best check (the run's final losses are those weights').
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import lr_scheduler as S

if TYPE_CHECKING:
    from metalr.workbench.tasks import Task

#: Spec keys of this module (not optimizer constructor arguments).
VALIDATION_KEYS = ("validation_data", "plateau", "early_stopping")
_DATA_KEYS: dict[str, int | str | bool | None] = {
    "every": 10, "batch": None, "check": None, "gradient": True,
}  # fmt: skip
MAX_CHECK_DRAWS = 4
_PLATEAU_KEYS = {"factor": 0.1, "patience": 3}
_STOPPING_KEYS = {"patience": 5}


def with_step_budget(spec: dict[str, Any], steps: int) -> dict[str, Any]:
    """``spec`` with ``validation: {ray_steps: budget}`` replaced by the run's ``steps`` (the
    ray ceiling needs the step budget ``T``); any other spec as it is."""
    options = spec.get("validation")
    if not isinstance(options, dict) or options.get("ray_steps") != "budget":
        return spec
    return {**spec, "validation": {**options, "ray_steps": float(steps)}}


def check_validation_spec(name: str, spec: dict[str, Any], metalr_kind: bool) -> None:
    """``ValueError`` naming the key when a spec's validation options are malformed."""
    data = spec.get("validation_data")
    for key, allowed in (("validation_data", _DATA_KEYS), ("plateau", _PLATEAU_KEYS),
                         ("early_stopping", _STOPPING_KEYS)):  # fmt: skip
        value = spec.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or set(value) - set(allowed):
            raise ValueError(f"Invalid optimizers.{name}.{key}: {value!r}; expected a mapping "
                             f"with keys from {sorted(allowed)}")  # fmt: skip
        for k, v in value.items():
            if v is None and key == "validation_data" and k in ("batch", "check"):
                continue
            if key == "validation_data" and (k, v) == ("batch", "all"):
                continue
            if key == "validation_data" and k == "gradient":
                if not isinstance(v, bool):
                    raise ValueError(f"Invalid optimizers.{name}.{key}.{k}: {v!r}; expected "
                                     "true or false")  # fmt: skip
                continue
            ok = (isinstance(v, int) and v >= 1) if k != "factor" else (0 < float(v) < 1)
            if not ok:
                rng = "(0, 1)" if k == "factor" else "an integer >= 1"
                raise ValueError(f"Invalid optimizers.{name}.{key}.{k}: {v!r}; expected {rng}")
    uses = [k for k in ("plateau", "early_stopping") if spec.get(k) is not None]
    if uses and data is None:
        raise ValueError(f"Invalid optimizers.{name}: {uses[0]} needs validation_data "
                         "(the validation stream it watches)")  # fmt: skip
    if data is not None and not uses and not metalr_kind:
        raise ValueError(f"Invalid optimizers.{name}.validation_data: kind {spec['kind']!r} "
                         "does not use it without plateau or early_stopping")  # fmt: skip
    if spec.get("plateau") is not None and spec.get("schedule", "none") != "none":
        raise ValueError(f"Invalid optimizers.{name}: plateau replaces schedule; give one")


class ValidationWatcher:
    """Draws the validation stream of one run and feeds it to the spec's users."""

    def __init__(self, spec: dict[str, Any], task: Task, seed: int, opt: torch.optim.Optimizer,
                 model: torch.nn.Module, observe: bool) -> None:  # fmt: skip
        data = {**_DATA_KEYS, **spec["validation_data"]}
        self.every, self.model, self.task, self.opt = data["every"], model, task, opt
        x, y = task.splits(seed)[1]
        batch = len(x) if data["batch"] == "all" else data["batch"] or task.batch_size or len(x)
        self.x, self.y, self.batch = x, y, min(batch, len(x))
        self.gradient = bool(data["gradient"])
        self.generator = torch.Generator().manual_seed(20_000 + seed)
        self.observe = observe
        self.per_check = data["check"] or min(math.ceil(len(x) / self.batch), MAX_CHECK_DRAWS)
        self.window: list[float] = []
        plateau = spec.get("plateau")
        self.plateau = None if plateau is None else S.ReduceLROnPlateau(
            opt, factor=float(plateau.get("factor", _PLATEAU_KEYS["factor"])),
            patience=int(plateau.get("patience", _PLATEAU_KEYS["patience"])))  # fmt: skip
        stopping = spec.get("early_stopping")
        self.patience = None if stopping is None else int(stopping.get("patience", 5))
        self.best, self.best_state, self.bad_checks = math.inf, None, 0
        self.draws = 0

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= len(self.x):
            return self.x, self.y
        idx = torch.randperm(len(self.x), generator=self.generator)[: self.batch]
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def after_step(self, step: int) -> bool:
        """Call after optimizer step ``step`` (from 1); returns True when the run should stop."""
        if step % self.every:
            return False
        x, y = self._draw()
        self.draws += 1
        was_training = self.model.training
        self.model.eval()
        try:
            if self.observe and self.gradient:
                with torch.enable_grad():
                    value = float(self.opt.observe_validation(self.task.loss(self.model(x), y)))
            else:
                with torch.no_grad():
                    loss = self.task.loss(self.model(x), y)
                if self.observe:  # the loss alone (gradient: false)
                    loss = self.opt.observe_validation(loss, hypergradient=False)
                value = float(loss)
        finally:
            self.model.train(was_training)
        self.window.append(value if math.isfinite(value) else math.inf)
        if len(self.window) < self.per_check:
            return False
        check, self.window = sum(self.window) / len(self.window), []
        if self.plateau is not None:
            self.plateau.step(check)
        if self.patience is None:
            return False
        if check < self.best:
            self.best, self.bad_checks = check, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return False
        self.bad_checks += 1
        return self.bad_checks >= self.patience

    def finish(self) -> dict[str, Any]:
        """Restore early stopping's best weights (if any); what the record keeps of the stream."""
        restored = self.best_state is not None
        if restored:
            self.model.load_state_dict(self.best_state)
        return {"validation_draws": self.draws, "validation_batch": self.batch,
                "validation_examples": self.draws * self.batch,
                "early_stopping_restored": restored if self.patience is not None else None}  # fmt: skip


def build_watcher(spec: dict[str, Any], task: Task, seed: int, opt: torch.optim.Optimizer,
                  model: torch.nn.Module) -> ValidationWatcher | None:  # fmt: skip
    """The run's watcher, or None when the spec has no ``validation_data``."""
    if spec.get("validation_data") is None:
        return None
    return ValidationWatcher(spec, task, seed, opt, model,
                             observe=hasattr(opt, "observe_validation"))  # fmt: skip
