"""metalr: learning rates that adapt online by hypergradient descent, and meta-learned priors.

Drop-in optimizers: :class:`SGDHD`, :class:`AdamHD`, :class:`AdamWHD`, and :class:`HyperLR`
around any ``torch.optim.Optimizer``. Pure update rules live in :mod:`metalr.functional`.
"""

from metalr import functional
from metalr.optim.adam_hd import AdamHD, AdamWHD
from metalr.optim.hyper_lr import HyperLR
from metalr.optim.sgd_hd import SGDHD

__version__ = "0.1.0"

from metalr.meta import LRPrior, MetaConfig, MetaLearner, load_prior

__all__ = [  # noqa: RUF022 - plain sorted() order, checked by tests/test_public_api.py
    "AdamHD",
    "AdamWHD",
    "HyperLR",
    "LRPrior",
    "MetaConfig",
    "MetaLearner",
    "SGDHD",
    "__version__",
    "functional",
    "load_prior",
]
