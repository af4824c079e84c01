"""An Omniglot-like few-shot set rendered offline from the Noto fonts (Debian ``fonts-noto-core``).

Real Omniglot cannot be downloaded everywhere; this module builds a stand-in of the same shape:
letters of many writing systems ("scripts" play the role of Omniglot's alphabets), each letter a
class, and many "writers" per class obtained by random affine/elastic distortion and stroke-width
changes applied on the fly.

Preparation (deterministic, cached):

1. Enumerate ``Noto{Sans,Serif}<Script>-Regular.ttf`` in the font folder (one font per script, Sans
   preferred; symbol, math, numeral and duplicate-style families are left out). ``NotoSans-Regular``
   contributes three scripts: Latin, Greek and Cyrillic.
2. Read each font's ``cmap`` (a small parser below: no fontTools needed) and keep the code points
   that are letters (Unicode category ``Lu``/``Ll``/``Lt``/``Lo``), carry no canonical or
   compatibility decomposition (no precomposed accented forms) and whose Unicode name begins with
   the script's word (so a script font's stray Latin letters are not counted twice).
3. Take at most ``max_per_script`` of them, evenly spaced in code-point order.
4. Render each with Pillow (basic layout, no shaping), crop to the ink, fit it into a
   ``base_size`` square with a margin, and drop blank glyphs, glyphs identical to the font's
   ``.notdef`` box, and near-duplicates of glyphs already kept (across all scripts of the bank:
   Latin ``A``, Greek ``Alpha`` and Cyrillic ``A`` become one class, not three identical ones).

The bank is saved as a compressed ``.npz`` in the cache folder (``cache_dir`` argument, else
``$METALR_CACHE/glyphs``, else ``~/.cache/metalr/glyphs``) under a name that hashes the font files,
the parameters and the Pillow version, so later runs load it in well under a second.

Splits are by script: the scripts are ordered by a seeded hash of their names and the first 60% are
``"train"``, the next 15% ``"val"`` and the rest ``"test"`` (fixed, independent of which fonts the
other splits use). :class:`GlyphTasks` samples N-way K-shot episodes from one split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The private helpers marked F401 lived here before the split and stay importable (tests use them).
from metalr.tasks.base import TaskBatch
from metalr.tasks.episodes import _check_positive, _choose_classes, _episode
from metalr.tasks.glyph_augment import GlyphAugment
from metalr.tasks.glyph_bank import GlyphBank, _cache_root, load_glyph_bank  # noqa: F401
from metalr.tasks.glyph_fonts import (
    _SPLITS,
    DEFAULT_FONT_DIR,
    FONT_INSTALL_HINT,
    _cmap_codepoints,  # noqa: F401
    _hash_order,
    _script_catalog,
    _script_letters,  # noqa: F401
    glyph_scripts,
    script_split,
)

__all__ = [
    "DEFAULT_FONT_DIR",
    "FONT_INSTALL_HINT",
    "GlyphAugment",
    "GlyphBank",
    "GlyphTasks",
    "glyph_scripts",
    "load_glyph_bank",
    "script_split",
]


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


class GlyphTasks:
    """N-way K-shot classification of rendered letters, split by script (see the module notes).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint scripts, hence disjoint classes).
        n_way, k_shot, k_query: classes per task, support and query examples per class.
        image_size: side of the returned images (glyphs are rendered at ``base_size``,
            area-downsampled to ``image_size`` and distorted there).
        augment: ``True`` for the default :class:`GlyphAugment`, ``False`` for the clean glyph
            (every example of a class identical), or a :class:`GlyphAugment`.
        max_scripts: use only the first ``max_scripts`` scripts of the split (in the split's seeded
            order) and render only those: small, fast banks for tests. Near-duplicate glyphs
            across splits are then removed within the rendered subset only, so a test class can
            resemble a training one (a Latin A and a Carian letter): for smoke and development
            runs, not for results.
        font_dir, cache_dir, base_size, max_per_script: passed to :func:`load_glyph_bank`.
        split_seed: seed of the script split (:func:`script_split`).

    ``sample(n, generator)`` returns ``support_x [n, N*K, 1, s, s]`` float in ``[0, 1]``,
    ``support_y [n, N*K]`` long in ``[0, N)`` (each label ``K`` times, order shuffled) and the
    same for the query set with ``k_query``.
    """

    loss_name = "cross_entropy"
    #: episodes per draw of a fixed set (``metalr.meta.runner.fixed_tasks``): bounds the
    #: rendering's temporaries (~190 MiB per 50 five-shot episodes)
    draw_block = 50

    def __init__(
        self,
        split: str = "train",
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        image_size: int = 28,
        augment: bool | GlyphAugment = True,
        *,
        max_scripts: int | None = None,
        font_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        base_size: int = 56,
        max_per_script: int = 60,
        split_seed: int = 0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.split = split
        self.n_way = _check_positive("n_way", n_way)
        self.k_shot = _check_positive("k_shot", k_shot)
        self.k_query = _check_positive("k_query", k_query)
        self.image_size = _check_positive("image_size", image_size)
        if augment is True:
            augment = GlyphAugment()
        self.augment: GlyphAugment | None = augment or None
        font_dir = Path(font_dir) if font_dir is not None else DEFAULT_FONT_DIR
        names = script_split([s.name for s in _script_catalog(font_dir)], split_seed)[split]
        subset = None
        if max_scripts is not None:
            _check_positive("max_scripts", max_scripts)
            names = sorted(_hash_order(names, split_seed)[:max_scripts])
            subset = names
        bank = load_glyph_bank(
            subset,
            font_dir=font_dir,
            cache_dir=cache_dir,
            base_size=base_size,
            max_per_script=max_per_script,
        )
        self.bank = bank
        wanted = [i for i, s in enumerate(bank.scripts) if s in set(names)]
        mask = np.isin(bank.script_index, wanted)
        self.class_index = np.flatnonzero(mask)  # rows of bank.images used by this split
        self.class_scripts = [bank.class_script(i) for i in self.class_index]
        self.class_codepoints = bank.codepoints[self.class_index].tolist()
        self.scripts = sorted(set(self.class_scripts))
        # area-downsampled once; distortions are applied at the output resolution
        glyphs = torch.from_numpy(bank.images[self.class_index]).unsqueeze(1)
        self._images = _resize(glyphs.float().div_(255.0), self.image_size).contiguous()
        if len(self.class_index) < self.n_way:
            raise ValueError(
                f"split {split!r} has {len(self.class_index)} classes, fewer than n_way={n_way}"
            )

    @property
    def num_classes(self) -> int:
        """Number of character classes in this split."""
        return len(self.class_index)

    def __repr__(self) -> str:
        return (
            f"GlyphTasks(split={self.split!r}, n_way={self.n_way}, k_shot={self.k_shot}, "
            f"k_query={self.k_query}, scripts={len(self.scripts)}, classes={self.num_classes})"
        )

    def class_images(self, classes: Tensor, per_class: int, generator) -> Tensor:
        """``[*classes.shape, per_class, 1, s, s]`` examples (distorted if augmenting)."""
        s = self.image_size
        base = self._images[classes.reshape(-1)]  # [C, 1, s, s]
        x = base[:, None].expand(-1, per_class, 1, s, s).reshape(-1, 1, s, s)
        if self.augment is not None:
            x = self.augment(x, generator)
        else:
            x = x.clone()
        return x.reshape(*classes.shape, per_class, 1, s, s)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        return_classes: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, Tensor]:
        """Draw ``batch_size`` episodes; ``return_classes=True`` also returns ``[n, N]`` class ids
        (indices into ``class_scripts`` / ``class_codepoints``) where column ``j`` is label ``j``."""
        _check_positive("batch_size", batch_size)
        classes = _choose_classes(self.num_classes, batch_size, self.n_way, generator)
        x = self.class_images(classes, self.k_shot + self.k_query, generator)
        batch = _episode(x, self.k_shot, generator)
        return (batch, classes) if return_classes else batch
