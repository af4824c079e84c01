"""Pure functional forms of metalr's update rules (one copy of the math).

The optimizers call the in-place forms (:func:`sgd_hd`, :func:`adam_hd`) without grad; the
meta-learner calls the pure steps (:func:`sgd_hd_step`, :func:`adam_hd_step`) with grad and
under ``torch.func.vmap``. The ``"seek"`` rule's controller (the default rule of the optimizers)
is :func:`seek_update` over the signals :func:`seek_adapt_rates` reads from the hypergradient.
"""

from metalr.functional._controller import (
    CONTROLLER_SIZE,
    DEFAULT_SEEK_HYPERGRAD_LR,
    DEFAULT_SGD_SEEK_HYPERGRAD_LR,
    SEEK_DEFAULTS,
    SGD_SEEK_DEFAULTS,
    initial_controller,
    resolve_seek,
    seek_update,
)
from metalr.functional._hypergrad import (
    DEFAULT_NORMALIZED_HYPERGRAD_LR,
    clamp_rates,
    initial_rate,
    seek_adapt_rates,
    update_rates,
)
from metalr.functional._seek_constants import (
    ROUND7_SEEK,
    TRIAL11_SEEK,
    TRIAL11_SEEK_HYPERGRAD_LR,
)
from metalr.functional._sgd_common import SGDHDState
from metalr.functional._signals import (
    GRANULARITIES,
    RULES,
    hypergradient,
    inner_products,
    rate_dtype,
)
from metalr.functional.adam_rule import AdamHDState, adam_direction, adam_hd, adam_hd_step
from metalr.functional.sgd_rule import sgd_hd, sgd_hd_step

__all__ = [  # noqa: RUF022 - plain sorted() order, checked by tests/test_public_api.py
    "AdamHDState",
    "CONTROLLER_SIZE",
    "DEFAULT_NORMALIZED_HYPERGRAD_LR",
    "DEFAULT_SEEK_HYPERGRAD_LR",
    "DEFAULT_SGD_SEEK_HYPERGRAD_LR",
    "GRANULARITIES",
    "ROUND7_SEEK",
    "RULES",
    "SEEK_DEFAULTS",
    "SGDHDState",
    "SGD_SEEK_DEFAULTS",
    "TRIAL11_SEEK",
    "TRIAL11_SEEK_HYPERGRAD_LR",
    "adam_direction",
    "adam_hd",
    "adam_hd_step",
    "clamp_rates",
    "hypergradient",
    "initial_controller",
    "initial_rate",
    "inner_products",
    "rate_dtype",
    "resolve_seek",
    "seek_adapt_rates",
    "seek_update",
    "sgd_hd",
    "sgd_hd_step",
    "update_rates",
]
