"""Meta-learning of learning rates: MAML, Meta-SGD, MAML++ LSLR and Reptile over metalr's rules.

The learner differentiates through unrolled inner loops built from the same functional steps the
optimizers run (:func:`metalr.functional.sgd_hd_step`, :func:`metalr.functional.adam_hd_step`)
and exports an :class:`LRPrior` that :func:`load_prior` writes into :class:`metalr.SGDHD`,
:class:`metalr.AdamHD` or :class:`metalr.HyperLR`::

    learner = MetaLearner(model, MetaConfig(rates="element"), loss_name="mse")
    learner.fit(sampler, num_iterations=1000)
    prior = learner.export_prior()
    optimizer = metalr.SGDHD(model.parameters(), granularity="element")
    load_prior(optimizer, model, prior)

``metalr.meta.higher_backend`` (optional, ``pip install "metalr[meta]"``) registers the optimizers
with ``higher``.
"""

from metalr.meta.config import MetaConfig
from metalr.meta.facade import AdaptedModel, MetaLR
from metalr.meta.handoff import load_prior, load_step_rates, param_groups_from_prior
from metalr.meta.inner_loop import InnerRule, make_forward, make_loss, unroll
from metalr.meta.learner import MetaLearner
from metalr.meta.parametrize import MetaParameters
from metalr.meta.prior import LRPrior

__all__ = [
    "AdaptedModel",
    "InnerRule",
    "LRPrior",
    "MetaConfig",
    "MetaLR",
    "MetaLearner",
    "MetaParameters",
    "load_prior",
    "load_step_rates",
    "make_forward",
    "make_loss",
    "param_groups_from_prior",
    "unroll",
]
