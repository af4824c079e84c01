"""A learn2learn-style ``clone()`` / ``adapt(loss)`` facade over the same functional core.

``MetaLR`` wraps a model like learn2learn's ``MetaSGD``; its parameters are the model's own
weights (the initial weights θ₀), the log-rates and, for ``sgd_hd``/``adam_hd``, the raw
``hypergrad_lr``. ``clone()`` returns an :class:`AdaptedModel` that holds its weights as a dict
of tensors and applies them with ``torch.func.functional_call``: nothing is ever written into
``module._parameters``. Each ``adapt(loss)`` is one step of
:func:`metalr.meta.inner_loop.inner_step` (the same ``sgd_hd_step`` / ``adam_hd_step`` the
optimizers run)::

    wrapped = MetaLR(model, MetaConfig(rates="element", inner_lr=0.01))
    meta_opt = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    for sx, sy, qx, qy in tasks:
        learner = wrapped.clone()
        learner.adapt(F.mse_loss(learner(sx), sy))
        F.mse_loss(learner(qx), qy).backward()     # reaches weights, rates (and hypergrad_lr)
    meta_opt.step()

Clip the meta-gradient (``torch.nn.utils.clip_grad_norm_``) before ``meta_opt.step()`` when
unrolling several steps; :class:`metalr.meta.MetaLearner` does this for you.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metalr.meta.config import MetaConfig
from metalr.meta.inner_loop import (
    InnerRule,
    InnerState,
    Params,
    init_state,
    inner_step,
    make_forward,
)
from metalr.meta.parametrize import MetaParameters


class MetaLR(nn.Module):
    """Wrap ``model`` so its rates (and initial weights) can be meta-learned with ``clone/adapt``.

    Args:
        model: the network; its parameters are used in place as the initial weights.
        config: a :class:`MetaConfig`; ``algorithm``, ``backend`` and the ``meta_*`` options are
            ignored here (the user writes the outer loop) (default: ``MetaConfig()``).

    ``wrapped(x)`` applies the initial weights; ``wrapped.rates()`` gives the current rates.
    """

    def __init__(self, model: nn.Module, config: MetaConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else MetaConfig()
        self.module = model
        self.meta = MetaParameters(model, self.config, share_init=True)
        self.rule = InnerRule.from_config(self.config)
        self._forward = make_forward(model)

    def forward(self, x: Tensor) -> Tensor:
        """The model with its initial weights."""
        return self._forward(self.meta.init_params(), x)

    def rates(self, step: int = 0) -> dict[str, Tensor]:
        """Current rates by parameter name (positive by construction)."""
        return self.meta.rates(step)

    def clone(self) -> AdaptedModel:
        """A fresh learner starting at the initial weights, in the graph of this module."""
        return AdaptedModel(self)


class AdaptedModel:
    """A task-specific copy: weights as tensors, advanced by :meth:`adapt`.

    Calling it runs the wrapped module with the adapted weights via ``functional_call``.
    """

    def __init__(self, parent: MetaLR) -> None:
        self.parent = parent
        meta = parent.meta
        # Constants (learn_init=False) get a leaf that requires grad so autograd.grad can
        # differentiate the support loss with respect to them.
        params = {
            n: p if p.requires_grad else p.detach().requires_grad_()
            for n, p in meta.init_params().items()
        }
        self.state: InnerState = init_state(params, meta.rates(0), parent.rule)
        self.steps_taken = 0
        hyper = meta.hypergrad_lrs()
        self._beta = [hyper[n] for n in params] if hyper is not None else parent.config.hypergrad_lr

    @property
    def params(self) -> Params:
        """The current (adapted) weights by name."""
        return self.state.params

    def __call__(self, x: Tensor) -> Tensor:
        return self.parent._forward(self.state.params, x)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One inner step on ``loss`` (computed with this learner's outputs).

        ``first_order`` overrides the config's: the inner gradient is then a constant (FOMAML).
        """
        rule = self.parent.rule
        first_order = rule.first_order if first_order is None else first_order
        if rule.per_step_rates:
            rates = self.parent.meta.rates(self.steps_taken)  # raises past the learned steps
            self.state = self.state._replace(rates=[rates[n] for n in self.state.params])
        grads = torch.autograd.grad(
            loss, list(self.state.params.values()), create_graph=not first_order,
            retain_graph=True, materialize_grads=True,
        )  # fmt: skip
        self.state = inner_step(self.state, list(grads), rule, self._beta)
        self.steps_taken += 1
