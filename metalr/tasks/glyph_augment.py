"""Random "writer" distortion of glyph images: affine, elastic and stroke-width changes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GlyphAugment"]


@dataclass(frozen=True)
class GlyphAugment:
    """Random "writer" distortion of glyph images (all ranges uniform, all draws from one generator).

    Attributes:
        rotation: max rotation in degrees (either way).
        shear: max horizontal shear (tangent of the shear angle).
        scale: (min, max) overall scale.
        aspect: max log aspect-ratio change.
        translate: max shift as a fraction of the half-width.
        elastic: amplitude of a smooth random displacement field (4x4 control points, bicubic),
            as a fraction of the half-width.
        stroke: (thinnest, thickest) stroke change: ``-1`` is a full 3x3 grey erosion, ``+1`` a
            full 3x3 dilation, values between blend the image with them (``0``: unchanged).
    """

    rotation: float = 12.0
    shear: float = 0.2
    scale: tuple[float, float] = (0.8, 1.05)
    aspect: float = 0.1
    translate: float = 0.08
    elastic: float = 0.04
    stroke: tuple[float, float] = (-0.5, 0.8)

    def __call__(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Distort ``images`` ``[M, 1, H, W]`` (float in ``[0, 1]``, ink bright).

        Draws, in order: ``torch.rand(M, 7)`` (the affine and stroke parameters), then
        ``torch.randn(M, 2, 4, 4)`` (the elastic field's control points).
        """
        m, _, h, w = images.shape
        dtype = images.dtype
        u = torch.rand(m, 7, generator=generator, dtype=dtype)
        noise = torch.randn(m, 2, 4, 4, generator=generator, dtype=dtype)
        sym = lambda v, amax: (2.0 * v - 1.0) * amax
        angle = sym(u[:, 0], math.radians(self.rotation))
        shear = sym(u[:, 1], self.shear)
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 2]
        log_aspect = sym(u[:, 3], self.aspect)
        sx, sy = scale * torch.exp(log_aspect), scale * torch.exp(-log_aspect)
        tx, ty = sym(u[:, 4], self.translate), sym(u[:, 5], self.translate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Forward map (glyph -> image) A = R @ Shear @ diag(sx, sy), then a shift by (tx, ty);
        # grid_sample needs the inverse: source = A^-1 (target - t).
        a11, a12 = cos * sx, (cos * shear - sin) * sy
        a21, a22 = sin * sx, (sin * shear + cos) * sy
        det = a11 * a22 - a12 * a21
        i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
        # Normalised pixel centres, the convention of affine_grid(align_corners=False).
        xs = ((torch.arange(w, dtype=dtype) * 2 + 1) / w - 1).view(1, 1, w)
        ys = ((torch.arange(h, dtype=dtype) * 2 + 1) / h - 1).view(1, h, 1)
        col = lambda v: v.view(m, 1, 1)
        grid = torch.empty(m, h, w, 2, dtype=dtype)
        grid[..., 0] = col(i11) * xs + col(i12) * ys - col(i11 * tx + i12 * ty)
        grid[..., 1] = col(i21) * xs + col(i22) * ys - col(i21 * tx + i22 * ty)
        if self.elastic > 0:
            bh, bw = _smooth_basis(h, dtype), _smooth_basis(w, dtype)
            field = torch.einsum("hi,mcij,wj->mhwc", bh, noise, bw)
            grid.add_(field, alpha=self.elastic)
        out = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        lo, hi = self.stroke
        if lo != 0 or hi != 0:
            amount = (lo + (hi - lo) * u[:, 6]).view(m, 1, 1, 1)
            target = torch.where(amount > 0, _dilate(out), _erode(out))
            out = out + amount.abs() * (target - out)
        return out.clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _smooth_basis(n: int, dtype: torch.dtype) -> Tensor:
    """``[n, 4]``: bicubic interpolation (corners aligned) of 4 control values onto ``n`` points."""
    unit = torch.eye(4, dtype=dtype).view(4, 1, 4, 1).expand(4, 1, 4, 4)
    out = F.interpolate(unit, size=(n, 4), mode="bicubic", align_corners=True)
    return out[:, 0, :, 0].T.contiguous()


def _dilate(x: Tensor) -> Tensor:
    """3x3 grey dilation (separable max; zero padding), ``[M, 1, H, W]``."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def _erode(x: Tensor) -> Tensor:
    """3x3 grey erosion (the dual of :func:`_dilate`)."""
    return -_dilate(-x)
