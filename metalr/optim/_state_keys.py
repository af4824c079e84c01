"""Where metalr's optimizers keep their own entries in ``optimizer.state[p]``."""

#: Key of the learned multiplier in ``optimizer.state[p]``.
RATE_KEY = "lr_multiplier"
#: Key of the ``"seek"`` rule's controller vector in ``optimizer.state[p]``.
CONTROLLER_KEY = "hd_controller"
#: Key of the validation statistics in ``optimizer.state[p]`` (created at the parameter's first
#: step; before 2026-12-05, by the first observation, so their presence meant the group followed
#: the validation signal: :data:`FOLLOWS_VALIDATION` says it now).
VALIDATION_KEY = "hd_validation"
#: Key of the loss-spike guard's statistics in ``optimizer.state[p]`` (``p``: the group's first
#: parameter; created at its first step, or by the first loss a guarded group sees if that
#: parameter has not stepped).
SPIKE_KEY = "hd_spike_guard"
#: Key of a per-parameter flag (a Python bool) in ``optimizer.state[p]``: whether the parameter's
#: group has observed a finite validation loss, so its rates follow the validation signal (a
#: group follows it when any of its parameters has the flag). It is per-parameter state, not a
#: param-group entry, because wrappers such as ``ZeroRedundancyOptimizer`` copy their own groups
#: over the inner optimizer's before every step. Checkpoints from before it meant "observed"
#: by the validation statistics' presence (then created by the first observation).
FOLLOWS_VALIDATION = "hd_follows_validation"
#: Key of the rewind's snapshot in ``optimizer.state[p]`` (``validation={"rewind": 1}``): the
#: parameter's value at the validation loss's best running average, a tensor like ``p`` created
#: by the first observation with the rewind on.
SNAPSHOT_KEY = "hd_best_params"
#: Key of the rewind's pending flag in ``optimizer.state[p]`` (a 0-d bool tensor, created by the
#: first observation with the rewind on): true from an observation that decided to move ``p``
#: back to its snapshot until the end of the next ``step()``, which does it.
REWIND_DUE_KEY = "hd_rewind_due"
#: Key of the ray ceiling's anchor in ``optimizer.state[p]`` (``validation={"ray_steps": T}``):
#: the parameter's value at its first step, ``θ_0`` of the ray cosine
#: (:mod:`metalr.functional._ray`), a tensor like ``p``.
RAY_ANCHOR_KEY = "hd_ray_anchor"
#: Key of the ray ceiling's state in ``optimizer.state[p]``: its group's streak of observations
#: above the threshold, whether it has acted and whether a snapshot was kept (3 floats).
RAY_KEY = "hd_ray"
