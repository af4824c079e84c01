"""Glue between metalr's optimizers and training frameworks and loggers.

Every submodule imports its framework lazily, when it is itself imported, so ``import metalr`` and
``import metalr.integrations`` never need Lightning, transformers or TensorBoard:

* :mod:`metalr.integrations.lightning` — ``EffectiveLRMonitor``, a Lightning ``Callback`` logging
  the effective rates (``pip install "metalr[integrations]"`` or ``lightning``), and
  ``ObserveValidation``, which calls ``optimizer.observe_validation`` every ``k`` steps, and
  ``ObserveValidationLoss``, which hands it the validation loop's logged loss (no backward).
* :mod:`metalr.integrations.huggingface` — ``EffectiveLRCallback`` and
  ``ObserveValidationCallback`` (``add_observe_validation_callback``) for the transformers
  ``Trainer``, and ``ObserveEvalLossCallback`` (each evaluation's loss, observed alone).
* :mod:`metalr.integrations.tensorboard` — ``log_effective_lrs(writer, optimizer, step)``.

:func:`effective_lr_stats` (no framework needed) is what they all log.
"""

from metalr.integrations._stats import effective_lr_stats, group_lrs, unwrap_optimizer

__all__ = ["effective_lr_stats", "group_lrs", "unwrap_optimizer"]
