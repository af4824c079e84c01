"""Parameter-free peers that need more than ``Class(params, lr=...)``: DoG and Mechanic.

* **DoG** (Ivgi, Hinder & Carmon 2023; ``pip install dog-optimizer``) at its defaults
  (``lr=1``, ``reps_rel=1e-6``), evaluated at its polynomial-decay iterate average
  (``dog.PolynomialDecayAverager``, γ = 8), as its README recommends: :class:`AveragedDoG` swaps
  the averaged weights in for evaluation (``eval()``) and back for training (``train()``), like
  schedule-free's optimizers do.
* **Mechanic** (Cutkosky, Defazio & Mehta 2023; ``pip install mechanic-pytorch``) tuning torch's
  Adam at base ``lr=1`` (its scale ``s`` starts at 1e-8 and learns the step size).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

#: kind → (module, pip package)
PACKAGES = {"dog": ("dog", "dog-optimizer"), "mechanic": ("mechanic_pytorch", "mechanic-pytorch")}


def build_dog(model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """DoG over ``model`` at its defaults, with its iterate average for evaluation."""
    dog = importlib.import_module("dog")

    class AveragedDoG(dog.DoG):
        """DoG that keeps a polynomial-decay average of the weights and evaluates at it."""

        def __init__(self, model: nn.Module, **kw: Any) -> None:
            super().__init__(model.parameters(), **kw)
            self._averager = dog.PolynomialDecayAverager(model)
            self._model = model
            self._saved: list[torch.Tensor] | None = None

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = super().step(closure)
            self._averager.step()
            return loss

        @torch.no_grad()
        def eval(self) -> None:
            """Swap the averaged weights into the model."""
            if self._saved is not None:
                return
            params = list(self._model.parameters())
            self._saved = [p.detach().clone() for p in params]
            for p, a in zip(params, self._averager.averaged_model.parameters()):
                p.copy_(a)

        @torch.no_grad()
        def train(self) -> None:
            """Put the training iterate back."""
            if self._saved is None:
                return
            for p, s in zip(self._model.parameters(), self._saved):
                p.copy_(s)
            self._saved = None

    return AveragedDoG(model, **kwargs)


def build_mechanic(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """Mechanic tuning torch's Adam at base lr 1 (its recommended use)."""
    mechanize = importlib.import_module("mechanic_pytorch").mechanize
    return mechanize(torch.optim.Adam)(params, lr=1.0, **kwargs)


def swaps_weights(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` evaluates at other weights than it trains (schedule-free, averaged DoG)."""
    return type(opt).__module__.startswith("schedulefree") or type(opt).__name__ == "AveragedDoG"
