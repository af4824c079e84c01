"""Real Omniglot (Lake et al., 2015) from the folders users already have on disk.

The standard layout (as unpacked from ``images_background.zip`` / ``images_evaluation.zip``)::

    root/images_background/<Alphabet>/<character>/<*.png>    # 30 alphabets, 964 characters
    root/images_evaluation/<Alphabet>/<character>/<*.png>    # 20 alphabets, 659 characters

Each PNG is a 105x105 binary drawing (black strokes on white) by one of 20 people. As is common
(MAML, Prototypical Networks), images are resized to 28x28 and inverted so strokes are bright, and
rotating a character by a multiple of 90 degrees can be treated as a new class (``rotations``).
Nothing is downloaded: this module only reads the folders. The loaded arrays can be cached as a
``.npz`` (keyed by the folder's path, file count and sizes) so later runs skip decoding the PNGs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metalr.tasks.base import TaskBatch
from metalr.tasks.episodes import _check_positive, _choose_classes, _episode
from metalr.tasks.glyph_bank import _import_pil

__all__ = ["OmniglotFolder", "OmniglotTasks"]

_SPLIT_DIRS = {"background": "images_background", "evaluation": "images_evaluation"}
_IMAGE_SUFFIXES = (".png", ".PNG")


def _omniglot_cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("METALR_CACHE")
    if env:
        return Path(env) / "omniglot"
    return Path.home() / ".cache" / "metalr" / "omniglot"


class OmniglotFolder:
    """All drawings of one Omniglot split, decoded into memory.

    Args:
        root: the folder holding ``images_background/`` and/or ``images_evaluation/``.
        background: ``True`` for ``images_background`` (meta-training alphabets), ``False`` for
            ``images_evaluation``.
        image_size: side of the stored images (``105`` keeps the originals).
        invert: make strokes bright on a dark background (the usual convention).
        cache_dir: where to cache the decoded arrays (default ``$METALR_CACHE/omniglot`` or
            ``~/.cache/metalr/omniglot``); ``use_cache=False`` neither reads nor writes a cache.

    Attributes:
        images: ``uint8`` tensor ``[num_images, 1, image_size, image_size]``.
        targets: ``int64`` tensor ``[num_images]``, the character class of each image.
        characters: ``"Alphabet/character"`` name of each class (sorted).
        alphabets: sorted alphabet names; ``character_alphabet[c]`` indexes into it.

    Indexing gives ``(image float [1, s, s] in [0, 1], class)``, so the folder also works as a
    map-style dataset (e.g. for learn2learn's ``MetaDataset``).
    """

    def __init__(
        self,
        root: str | Path,
        background: bool = True,
        image_size: int = 28,
        invert: bool = True,
        *,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.background = bool(background)
        self.image_size = _check_positive("image_size", image_size)
        self.invert = bool(invert)
        split_dir = self.root / _SPLIT_DIRS["background" if self.background else "evaluation"]
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"Omniglot folder not found: {split_dir} (root={self.root}). Expected the layout "
                f"root/{split_dir.name}/<Alphabet>/<character>/*.png, as unpacked from Omniglot's "
                f"{split_dir.name}.zip; nothing is downloaded."
            )
        self.split_dir = split_dir
        files: list[tuple[int, Path]] = []
        characters: list[str] = []
        alphabets = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        character_alphabet: list[int] = []
        for a, alphabet in enumerate(alphabets):
            for char_dir in sorted(p for p in (split_dir / alphabet).iterdir() if p.is_dir()):
                pngs = sorted(p for p in char_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES)
                if not pngs:
                    continue
                files += [(len(characters), p) for p in pngs]
                characters.append(f"{alphabet}/{char_dir.name}")
                character_alphabet.append(a)
        if not characters:
            raise FileNotFoundError(
                f"no character folders with PNG files under {split_dir} "
                "(expected <Alphabet>/<character>/*.png)"
            )
        self.characters = characters
        self.alphabets = alphabets
        self.character_alphabet = torch.tensor(character_alphabet, dtype=torch.int64)
        self.targets = torch.tensor([c for c, _ in files], dtype=torch.int64)
        self.files = [p for _, p in files]
        self.loaded_from_cache = False
        cache_path = None
        if use_cache:
            stats = [(str(p.relative_to(split_dir)), p.stat().st_size) for p in self.files]
            key_src = repr((1, str(split_dir.resolve()), self.image_size, self.invert, stats))
            key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
            cache_path = _omniglot_cache_root(cache_dir) / f"{split_dir.name}-{key}.npz"
        self.cache_path = cache_path
        images = None
        if cache_path is not None and cache_path.exists():
            try:
                with np.load(cache_path, allow_pickle=False) as z:
                    images = z["images"]
                self.loaded_from_cache = True
            except (OSError, KeyError, ValueError):
                images = None
        if images is None:
            images = self._decode()
            if cache_path is not None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".npz")
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.savez_compressed(f, images=images)
                    os.replace(tmp, cache_path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        self.images = torch.from_numpy(images).unsqueeze(1)

    def _decode(self) -> np.ndarray:
        Image, _, _ = _import_pil()
        s = self.image_size
        out = np.empty((len(self.files), s, s), dtype=np.uint8)
        for i, path in enumerate(self.files):
            with Image.open(path) as img:
                img = img.convert("L")
                if img.size != (s, s):
                    img = img.resize((s, s), Image.Resampling.LANCZOS)
                arr = np.asarray(img, dtype=np.uint8)
            out[i] = 255 - arr if self.invert else arr
        return out

    @property
    def num_classes(self) -> int:
        """Number of characters."""
        return len(self.characters)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div(255.0), int(self.targets[i])

    def __repr__(self) -> str:
        return (
            f"OmniglotFolder({str(self.split_dir)!r}, alphabets={len(self.alphabets)}, "
            f"characters={self.num_classes}, images={len(self)}, image_size={self.image_size})"
        )


class OmniglotTasks:
    """N-way K-shot episodes from an Omniglot split (same interface as :class:`GlyphTasks`).

    Args:
        root: the Omniglot root folder, or an already loaded :class:`OmniglotFolder`.
        split: ``"background"`` (meta-training) or ``"evaluation"`` (meta-testing).
        n_way, k_shot, k_query: classes per task and drawings per class in support / query; a
            class's ``k_shot + k_query`` drawings are distinct (at most 20 in real Omniglot).
        image_size: side of the images.
        rotations: optional class augmentation, e.g. ``(0, 90, 180, 270)``: every character
            rotated by each angle is a separate class (so 964 characters give 3856 classes).
        cache_dir, use_cache: see :class:`OmniglotFolder`.

    ``sample(n, generator)`` gives ``x [n, N*K, 1, s, s]`` float in ``[0, 1]`` and ``y [n, N*K]``
    long labels in ``[0, N)``, shuffled within the support and query sets.
    """

    loss_name = "cross_entropy"
    #: episodes per draw of a fixed set (``metalr.meta.runner.fixed_tasks``)
    draw_block = 50

    def __init__(
        self,
        root: str | Path | OmniglotFolder,
        split: str = "background",
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        image_size: int = 28,
        rotations: Sequence[int] | None = None,
        *,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
    ) -> None:
        if split not in _SPLIT_DIRS:
            raise ValueError(f"split must be 'background' or 'evaluation', got {split!r}")
        self.split = split
        self.n_way = _check_positive("n_way", n_way)
        self.k_shot = _check_positive("k_shot", k_shot)
        self.k_query = _check_positive("k_query", k_query)
        if isinstance(root, OmniglotFolder):
            folder = root
            if folder.background != (split == "background") or folder.image_size != image_size:
                raise ValueError(
                    f"the OmniglotFolder given holds background={folder.background}, "
                    f"image_size={folder.image_size}; asked for split={split!r}, "
                    f"image_size={image_size}"
                )
        else:
            folder = OmniglotFolder(
                root,
                background=split == "background",
                image_size=image_size,
                cache_dir=cache_dir,
                use_cache=use_cache,
            )
        self.folder = folder
        self.image_size = folder.image_size
        rot = (0,) if rotations is None else tuple(int(r) for r in rotations)
        if not rot or any(r % 90 for r in rot) or len({r % 360 for r in rot}) != len(rot):
            raise ValueError(
                f"rotations must be distinct multiples of 90 degrees, got {rotations!r}"
            )
        self.rotations = rot
        # Drawings of each character as a padded index table [characters, max_drawings].
        counts = torch.bincount(folder.targets, minlength=folder.num_classes)
        need = self.k_shot + self.k_query
        if int(counts.min()) < need:
            worst = folder.characters[int(counts.argmin())]
            raise ValueError(
                f"k_shot + k_query = {need} but character {worst!r} has only "
                f"{int(counts.min())} drawings"
            )
        order = torch.argsort(folder.targets, stable=True)
        table = torch.full((folder.num_classes, int(counts.max())), -1, dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        for c in range(folder.num_classes):
            table[c, : counts[c]] = order[starts[c] : starts[c] + counts[c]]
        self._table = table
        self._counts = counts

    @property
    def num_classes(self) -> int:
        """Characters times rotations."""
        return self.folder.num_classes * len(self.rotations)

    def class_name(self, c: int) -> str:
        """``"Alphabet/character"`` (with ``"@<angle>"`` for a rotated class) of class ``c``."""
        char, r = c % self.folder.num_classes, self.rotations[c // self.folder.num_classes]
        name = self.folder.characters[char]
        return f"{name}@{r}" if len(self.rotations) > 1 else name

    def __repr__(self) -> str:
        return (
            f"OmniglotTasks(split={self.split!r}, n_way={self.n_way}, k_shot={self.k_shot}, "
            f"k_query={self.k_query}, classes={self.num_classes}, rotations={self.rotations})"
        )

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        return_classes: bool = False,
    ) -> TaskBatch | tuple[TaskBatch, Tensor]:
        """Draw ``batch_size`` episodes; ``return_classes=True`` also returns the ``[n, N]`` class
        ids (see :meth:`class_name`) where column ``j`` is label ``j``."""
        _check_positive("batch_size", batch_size)
        classes = _choose_classes(self.num_classes, batch_size, self.n_way, generator)
        chars = classes % self.folder.num_classes
        need = self.k_shot + self.k_query
        # distinct drawings per class: random keys, padding slots sorted last
        rows = self._table[chars]  # [B, N, max_drawings]
        keys = torch.rand(rows.shape, generator=generator).masked_fill_(rows < 0, 2.0)
        picks = rows.gather(2, keys.argsort(dim=2)[:, :, :need])  # [B, N, need]
        x = self.folder.images[picks].float().div_(255.0)  # [B, N, need, 1, s, s]
        if len(self.rotations) > 1:
            quarter = (classes // self.folder.num_classes).tolist()
            turns = torch.tensor([[self.rotations[q] // 90 % 4 for q in row] for row in quarter])
            for t in (1, 2, 3):
                mask = turns == t
                if mask.any():
                    x[mask] = torch.rot90(x[mask], t, dims=(-2, -1))
        batch = _episode(x, self.k_shot, generator)
        return (batch, classes) if return_classes else batch
