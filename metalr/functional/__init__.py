"""Pure functional forms of metalr's update rules (one copy of the math).

The optimizers call the in-place forms (:func:`sgd_hd`, :func:`adam_hd`) without grad; the
meta-learner calls the pure steps (:func:`sgd_hd_step`, :func:`adam_hd_step`) with grad and
under ``torch.func.vmap``.
"""

from metalr.functional._hypergrad import (
    DEFAULT_NORMALIZED_HYPERGRAD_LR,
    GRANULARITIES,
    RULES,
    clamp_rates,
    hypergradient,
    initial_rate,
    inner_products,
    rate_dtype,
    update_rates,
)
from metalr.functional.adam_rule import AdamHDState, adam_direction, adam_hd, adam_hd_step
from metalr.functional.sgd_rule import SGDHDState, sgd_hd, sgd_hd_step

__all__ = [  # noqa: RUF022 - plain sorted() order, checked by tests/test_public_api.py
    "AdamHDState",
    "DEFAULT_NORMALIZED_HYPERGRAD_LR",
    "GRANULARITIES",
    "RULES",
    "SGDHDState",
    "adam_direction",
    "adam_hd",
    "adam_hd_step",
    "clamp_rates",
    "hypergradient",
    "initial_rate",
    "inner_products",
    "rate_dtype",
    "sgd_hd",
    "sgd_hd_step",
    "update_rates",
]
