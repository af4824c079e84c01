r"""The long-horizon signal of the seek rule's tracking phase (``seek={"horizon": μ}``, μ > 0).

Baydin et al.'s hypergradient is greedy: ``∂L(θ_t)/∂ log m = -η m ⟨g_t, d_{t-1}⟩`` asks whether
the *last* step should have been longer. Once the sharp directions of a valley oscillate it is
negative although the flat ones still progress, and a rate that follows it falls far below the
best fixed one (the short-horizon bias of Wu et al. 2018; on an autoencoder, AdamHD's rates fell
from 1.6e-3 to 1e-9 while Adam at 1e-3 kept improving). The forward-mode hypergradient of a rate
applied at every step (Franceschi et al. 2017), discounted by ``μ`` as in MARTHE (Donini et al.
2020), and with each step's Jacobian taken as the identity, compares the gradient with a *trail*
of the steps taken instead::

    Z_t = μ Z_{t-1} + η_t m_t d_t           (η m: the step size applied, d: the rule's direction)
    c_t = cos(g_t, Z_{t-1})                  (per tensor; per element the sign of g·Z)

so steps that oscillate cancel in ``Z`` and steady progress adds up over ~1/(1-μ) steps. ``μ = 0``
is the greedy signal (``Z_{t-1} = η m d_{t-1}``, the same cosine). The trail is extended when
the step reads it (``d_{t-1}`` and the rate it was applied with are at hand then), and only a
finite step keeps the extension. The ramp and the turn still read the greedy group cosine.

State: one tensor per parameter, shaped like it (in the direction's dtype: float32 at least),
in ``optimizer.state[p]['hd_trail']``. In lagged mode the rate a term is weighed with is the one
the step after it applies (at most one rate update apart); :class:`~metalr.HyperLR`'s directions
are the wrapped optimizer's displacements, which already carry its ``lr``, so there each term is
weighed by ``η`` once more (the same factor for every term under a constant ``lr``: the cosine
does not change). The validation option (``observe_validation``) still compares its gradient
with the last step.

Example::

    optimizer = metalr.AdamHD(model.parameters(), lr=1e-3, seek={"horizon": 0.95})
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Key of the trail in ``optimizer.state[p]``.
TRAIL_KEY = "hd_trail"


def trail_dtype(param: Tensor) -> torch.dtype:
    """The dtype of ``param``'s trail: the parameter's if complex, else float32 at least."""
    return param.dtype if param.is_complex() else torch.promote_types(param.dtype, torch.float32)


def initial_trail(param: Tensor) -> Tensor:
    """A zero trail for ``param``: its shape, in :func:`trail_dtype`."""
    return torch.zeros_like(param, dtype=trail_dtype(param), memory_format=torch.preserve_format)


def extend_trails(
    trails: Sequence[Tensor],
    directions: Sequence[Tensor],
    rates: Sequence[Tensor],
    lr: float | Tensor,
    horizon: float,
) -> list[Tensor]:
    """``Z_{t-1} = μ Z_{t-2} + η m d_{t-1}`` per parameter (pure): ``trails`` are ``Z_{t-2}``,
    ``directions`` ``d_{t-1}``, ``rates`` the multipliers ``m`` applied with them (one per
    group/tensor, or per element), ``lr`` the scheduled rate ``η`` and ``horizon`` ``μ``."""
    out = []
    for z, d, rate in zip(trails, directions, rates):
        size = (rate * lr).to(device=d.device, dtype=d.real.dtype if d.is_complex() else d.dtype)
        out.append(z * horizon + d.to(z.dtype) * size)
    return out
