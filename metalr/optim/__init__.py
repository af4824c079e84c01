"""Stateful optimizers over metalr's functional update rules."""

from metalr.optim.adam_hd import AdamHD, AdamWHD
from metalr.optim.hyper_lr import HyperLR
from metalr.optim.sgd_hd import SGDHD

__all__ = ["AdamHD", "AdamWHD", "HyperLR", "SGDHD"]  # noqa: RUF022 - plain sorted() order
