"""The rendered glyph bank: Noto letters drawn with Pillow, deduplicated, cached as ``.npz``.

Renders each script's letters (from :mod:`metalr.tasks.glyph_fonts`) into ``base_size`` squares,
drops blank, ``.notdef`` and near-duplicate glyphs, and caches the result under a key that hashes
the fonts, the parameters and the Pillow version (see :mod:`metalr.tasks.glyphs` for the steps).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metalr.tasks.glyph_fonts import (
    DEFAULT_FONT_DIR,
    _evenly_spaced,
    _Script,
    _script_catalog,
    _script_letters,
)

__all__ = ["GlyphBank", "load_glyph_bank"]

_PILLOW_HINT = 'pip install pillow  (or: pip install "metalr[meta]")'
_BANK_FORMAT = 1


def _import_pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"rendering glyphs needs Pillow: {_PILLOW_HINT}") from exc
    return Image, ImageDraw, ImageFont


def _render(font, ch: str, base_size: int, margin: int, Image, ImageDraw) -> np.ndarray | None:
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        return None
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    w, h = glyph.size
    inner = base_size - 2 * margin
    scale = inner / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    glyph = glyph.resize((nw, nh), Image.Resampling.LANCZOS)
    out = Image.new("L", (base_size, base_size), 0)
    out.paste(glyph, ((base_size - nw) // 2, (base_size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def _notdef(font, base_size: int, margin: int, Image, ImageDraw) -> np.ndarray | None:
    # U+10FFFF is a noncharacter: every font draws its .notdef box (or nothing) for it.
    return _render(font, "\U0010ffff", base_size, margin, Image, ImageDraw)


def _dedupe(images: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy in order: keep a glyph unless it is within ``threshold`` of one already kept."""
    if len(images) == 0:
        return np.zeros(0, dtype=bool)
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    small = F.adaptive_avg_pool2d(x, 16).flatten(1)
    small = small / small.norm(dim=1, keepdim=True).clamp_min(1e-8)
    # cosine similarity of 16x16 thumbnails, in row blocks to bound memory
    close = np.concatenate([(blk @ small.T > 1.0 - threshold).numpy() for blk in small.split(1024)])
    keep = np.zeros(len(images), dtype=bool)
    dropped = np.zeros(len(images), dtype=bool)
    for i in range(len(images)):
        if dropped[i]:
            continue
        keep[i] = True
        dropped |= close[i]
    return keep


@dataclass
class GlyphBank:
    """Rendered base glyphs: one ``base_size`` x ``base_size`` uint8 image per character class.

    Attributes:
        images: ``uint8`` array ``[classes, base_size, base_size]``, ink bright (255) on black.
        script_index: ``[classes]`` index into ``scripts`` of each class.
        codepoints: ``[classes]`` Unicode code point of each class.
        scripts: script names (sorted).
        render_seconds: wall time of the rendering when the bank was built.
        path: the cache file it was loaded from or saved to (``None`` if not cached).
    """

    images: np.ndarray
    script_index: np.ndarray
    codepoints: np.ndarray
    scripts: list[str]
    render_seconds: float
    path: Path | None = None
    loaded_from_cache: bool = field(default=False)

    @property
    def num_classes(self) -> int:
        """Number of character classes."""
        return int(self.images.shape[0])

    def class_script(self, i: int) -> str:
        """Script name of class ``i``."""
        return self.scripts[int(self.script_index[i])]

    def classes_per_script(self) -> dict[str, int]:
        """``{script: number of classes}``."""
        counts = np.bincount(self.script_index, minlength=len(self.scripts))
        return {s: int(c) for s, c in zip(self.scripts, counts)}


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("METALR_CACHE")
    if env:
        return Path(env) / "glyphs"
    return Path.home() / ".cache" / "metalr" / "glyphs"


def load_glyph_bank(
    scripts: Sequence[str] | None = None,
    *,
    font_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    base_size: int = 56,
    max_per_script: int = 60,
    dedupe_threshold: float = 0.04,
    rebuild: bool = False,
) -> GlyphBank:
    """Load (or render once and cache) the glyph bank for ``scripts`` (default: all scripts).

    Raises ``FileNotFoundError`` with the install command when the Noto fonts are missing, and
    ``ValueError`` naming unknown scripts.
    """
    font_dir = Path(font_dir) if font_dir is not None else DEFAULT_FONT_DIR
    catalog = {s.name: s for s in _script_catalog(font_dir)}
    if scripts is None:
        names = sorted(catalog)
    else:
        names = sorted(set(scripts))
        unknown = [n for n in names if n not in catalog]
        if unknown:
            raise ValueError(f"unknown scripts {unknown}; available: {sorted(catalog)}")
    if base_size < 8 or max_per_script < 1:
        raise ValueError("base_size must be >= 8 and max_per_script >= 1")
    _, _, _ImageFont = _import_pil()
    import PIL

    fonts = sorted({catalog[n].font for n in names})
    key_src = repr(
        (
            _BANK_FORMAT,
            names,
            [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in fonts],
            base_size,
            max_per_script,
            dedupe_threshold,
            PIL.__version__,
            unicodedata.unidata_version,
        )
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = _cache_root(cache_dir) / f"glyphs-{key}.npz"
    if path.exists() and not rebuild:
        try:
            with np.load(path, allow_pickle=False) as z:
                return GlyphBank(
                    images=z["images"],
                    script_index=z["script_index"],
                    codepoints=z["codepoints"],
                    scripts=[str(s) for s in z["scripts"]],
                    render_seconds=float(z["render_seconds"]),
                    path=path,
                    loaded_from_cache=True,
                )
        except (OSError, KeyError, ValueError):
            pass  # a torn or stale file: render again below
    bank = _render_bank([catalog[n] for n in names], base_size, max_per_script, dedupe_threshold)
    bank.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".glyphs-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f,
                images=bank.images,
                script_index=bank.script_index,
                codepoints=bank.codepoints,
                scripts=np.array(bank.scripts),
                render_seconds=np.float64(bank.render_seconds),
            )
        os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return bank


def _render_bank(
    scripts: list[_Script], base_size: int, max_per_script: int, dedupe_threshold: float
) -> GlyphBank:
    Image, ImageDraw, ImageFont = _import_pil()
    start = time.perf_counter()
    margin = max(1, round(base_size * 0.1))
    font_px = 4 * base_size
    fonts: dict[Path, object] = {}
    images, script_index, codepoints = [], [], []
    for si, script in enumerate(scripts):
        if script.font not in fonts:
            fonts[script.font] = ImageFont.truetype(
                str(script.font), font_px, layout_engine=ImageFont.Layout.BASIC
            )
        font = fonts[script.font]
        notdef = _notdef(font, base_size, margin, Image, ImageDraw)
        seen: set[bytes] = set()
        for cp in _evenly_spaced(_script_letters(script), max_per_script):
            img = _render(font, chr(cp), base_size, margin, Image, ImageDraw)
            if (
                img is None
                or int(img.max()) < 128
                or (notdef is not None and np.array_equal(img, notdef))
            ):
                continue
            digest = img.tobytes()
            if digest in seen:
                continue
            seen.add(digest)
            images.append(img)
            script_index.append(si)
            codepoints.append(cp)
    stack = np.stack(images) if images else np.zeros((0, base_size, base_size), np.uint8)
    keep = _dedupe(stack, dedupe_threshold)
    script_index_arr = np.asarray(script_index, dtype=np.int64)[keep]
    used = sorted(set(script_index_arr.tolist()))
    remap = {old: new for new, old in enumerate(used)}
    return GlyphBank(
        images=np.ascontiguousarray(stack[keep]),
        script_index=np.asarray([remap[i] for i in script_index_arr], dtype=np.int64),
        codepoints=np.asarray(codepoints, dtype=np.int64)[keep],
        scripts=[scripts[i].name for i in used],
        render_seconds=time.perf_counter() - start,
    )
