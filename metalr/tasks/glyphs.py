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

import functools
import hashlib
import math
import os
import re
import struct
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metalr.tasks.base import TaskBatch

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

DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/noto")
FONT_INSTALL_HINT = "apt-get install -y fonts-noto-core"
_PILLOW_HINT = 'pip install pillow  (or: pip install "metalr[meta]")'
_BANK_FORMAT = 1
_SPLITS = ("train", "val", "test")
_SPLIT_FRACTIONS = (0.60, 0.15, 0.25)
_LETTER_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo"})

# Families that are not a writing system of their own, or a second style of a script whose
# ``Noto{Sans,Serif}<Script>`` font is already used.
_EXCLUDED_FAMILIES = frozenset(
    {
        "Display",
        "IndicSiyaqNumbers",
        "Math",
        "MayanNumerals",
        "Mono",
        "Music",
        "SignWriting",
        "Symbols",
        "Symbols2",
        "TamilSupplement",
        "TamilSlanted",
        "AdlamUnjoined",
    }
)
_FONT_RE = re.compile(r"^Noto(Sans|Serif)([A-Za-z0-9]*)-Regular\.(?:ttf|otf)$")
# NotoSans-Regular (Latin, Greek, Cyrillic) is split by the first word of the Unicode names.
_LGC_SCRIPTS = (("Cyrillic", "CYRILLIC"), ("Greek", "GREEK"), ("Latin", "LATIN"))


# --------------------------------------------------------------------------------------------
# Fonts and their character maps
# --------------------------------------------------------------------------------------------


def _font_error(font_dir: Path, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Noto fonts not found ({detail}) in {font_dir}. The glyph tasks render letters from "
        f"Debian's Noto fonts; install them with:  {FONT_INSTALL_HINT}  "
        "(or pass font_dir= pointing at a folder of Noto*-Regular.ttf files)."
    )


def _cmap_codepoints(path: Path) -> frozenset[int]:
    """The code points a TrueType/OpenType font maps to a real glyph (cmap formats 4 and 12)."""
    data = path.read_bytes()
    if data[:4] == b"ttcf":
        raise ValueError(f"font collections are not supported: {path}")
    (num_tables,) = struct.unpack_from(">H", data, 4)
    cmap_offset = None
    for i in range(num_tables):
        tag, _, offset, _ = struct.unpack_from(">4sIII", data, 12 + 16 * i)
        if tag == b"cmap":
            cmap_offset = offset
            break
    if cmap_offset is None:
        raise ValueError(f"font has no cmap table: {path}")
    _, n_sub = struct.unpack_from(">HH", data, cmap_offset)
    subtables: dict[int, int] = {}
    for i in range(n_sub):
        platform, encoding, offset = struct.unpack_from(">HHI", data, cmap_offset + 4 + 8 * i)
        if platform == 0 or (platform == 3 and encoding in (1, 10)):
            start = cmap_offset + offset
            (fmt,) = struct.unpack_from(">H", data, start)
            subtables.setdefault(fmt, start)
    points: set[int] = set()
    if 12 in subtables:
        start = subtables[12]
        (n_groups,) = struct.unpack_from(">I", data, start + 12)
        for g in range(n_groups):
            lo, hi, gid = struct.unpack_from(">III", data, start + 16 + 12 * g)
            points.update(c for c in range(lo, hi + 1) if gid + (c - lo) != 0)
    elif 4 in subtables:
        start = subtables[4]
        (seg_x2,) = struct.unpack_from(">H", data, start + 6)
        seg = seg_x2 // 2
        ends = struct.unpack_from(f">{seg}H", data, start + 14)
        starts = struct.unpack_from(f">{seg}H", data, start + 16 + seg_x2)
        deltas = struct.unpack_from(f">{seg}h", data, start + 16 + 2 * seg_x2)
        range_base = start + 16 + 3 * seg_x2
        range_offsets = struct.unpack_from(f">{seg}H", data, range_base)
        for i in range(seg):
            for c in range(starts[i], ends[i] + 1):
                if c == 0xFFFF:
                    continue
                if range_offsets[i] == 0:
                    gid = (c + deltas[i]) & 0xFFFF
                else:
                    at = range_base + 2 * i + range_offsets[i] + 2 * (c - starts[i])
                    (gid,) = struct.unpack_from(">H", data, at)
                    if gid:
                        gid = (gid + deltas[i]) & 0xFFFF
                if gid:
                    points.add(c)
    else:
        raise ValueError(f"font has no Unicode cmap of format 4 or 12: {path}")
    return frozenset(points)


@dataclass(frozen=True)
class _Script:
    name: str
    font: Path
    word: str | None  # required first word of the Unicode name; None: the font's most common


def _split_camel(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)


def _script_catalog(font_dir: Path) -> list[_Script]:
    if not font_dir.is_dir():
        raise _font_error(font_dir, "the folder does not exist")
    chosen: dict[str, tuple[int, Path]] = {}
    for path in sorted(font_dir.iterdir()):
        match = _FONT_RE.match(path.name)
        if not match:
            continue
        style, family = match.groups()
        if family in _EXCLUDED_FAMILIES or (family.startswith("Tifinagh") and family != "Tifinagh"):
            continue  # the Tifinagh* fonts are regional styles of the same code points
        rank = 0 if style == "Sans" else 1
        if family not in chosen or rank < chosen[family][0]:
            chosen[family] = (rank, path)
    if "" not in chosen or len(chosen) < 2:
        raise _font_error(font_dir, "no NotoSans-Regular.ttf / NotoSans<Script>-Regular.ttf files")
    scripts = [_Script(name, chosen[""][1], word) for name, word in _LGC_SCRIPTS]
    scripts += [_Script(_split_camel(f), p, None) for f, (_, p) in chosen.items() if f]
    return sorted(scripts, key=lambda s: s.name)


def _script_letters(script: _Script) -> list[int]:
    letters: dict[int, str] = {}
    for cp in sorted(_cmap_codepoints(script.font)):
        ch = chr(cp)
        if unicodedata.category(ch) not in _LETTER_CATEGORIES or unicodedata.decomposition(ch):
            continue
        name = unicodedata.name(ch, "")
        if name:
            letters[cp] = name.split(" ", 1)[0]
    word = script.word
    if word is None:
        words = sorted(letters.values())
        if not words:
            return []
        word = max(set(words), key=lambda w: (words.count(w), w))
    return [cp for cp, w in letters.items() if w == word]


def _evenly_spaced(items: Sequence[int], k: int) -> list[int]:
    if len(items) <= k:
        return list(items)
    idx = np.floor(np.arange(k) * (len(items) / k)).astype(int)
    return [items[i] for i in idx]


def _hash_order(names: Sequence[str], seed: int) -> list[str]:
    key = lambda n: hashlib.sha256(f"metalr-glyphs:{seed}:{n}".encode()).hexdigest()
    return sorted(names, key=key)


def script_split(names: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
    """Assign script names to ``"train"`` / ``"val"`` / ``"test"`` (60/15/25%, by seeded hash).

    Deterministic and independent of platform, Python version and the order of ``names``; every
    split gets at least one script when there are three or more.
    """
    order = _hash_order(sorted(set(names)), seed)
    n = len(order)
    n_val = max(1, round(n * _SPLIT_FRACTIONS[1])) if n >= 3 else 0
    n_test = max(1, round(n * _SPLIT_FRACTIONS[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def glyph_scripts(font_dir: str | Path | None = None, seed: int = 0) -> dict[str, list[str]]:
    """The script names of each split for the fonts in ``font_dir`` (no rendering)."""
    font_dir = Path(font_dir) if font_dir is not None else DEFAULT_FONT_DIR
    return script_split([s.name for s in _script_catalog(font_dir)], seed)


# --------------------------------------------------------------------------------------------
# Rendering and the cached bank
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Episodes (shared with the Omniglot loader) and writer augmentation
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _choose_classes(num_classes: int, batch_size: int, n_way: int, generator) -> Tensor:
    """``[batch_size, n_way]`` distinct class ids per task (uniform, without replacement)."""
    if n_way > num_classes:
        raise ValueError(f"n_way={n_way} but the split has only {num_classes} classes")
    keys = torch.rand(batch_size, num_classes, generator=generator)
    return keys.argsort(dim=1)[:, :n_way]


def _episode(instances: Tensor, k_shot: int, generator) -> TaskBatch:
    """Turn ``[tasks, n_way, k_shot + k_query, *x]`` class-major examples into a shuffled batch.

    Class ``j`` of each task gets label ``j``; support and query are shuffled independently.
    """
    b, n, _m = instances.shape[:3]
    x_shape = instances.shape[3:]
    out = []
    for part in (instances[:, :, :k_shot], instances[:, :, k_shot:]):
        per = part.shape[2]
        x = part.reshape(b, n * per, *x_shape)
        y = torch.arange(n).repeat_interleave(per).expand(b, n * per)
        perm = torch.rand(b, n * per, generator=generator).argsort(dim=1)
        x = x[torch.arange(b)[:, None], perm]
        y = y.gather(1, perm)
        out += [x.contiguous(), y.contiguous()]
    return TaskBatch(out[0], out[1], out[2], out[3])


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
            order) and render only those: small, fast banks for tests.
        font_dir, cache_dir, base_size, max_per_script: passed to :func:`load_glyph_bank`.
        split_seed: seed of the script split (:func:`script_split`).

    ``sample(n, generator)`` returns ``support_x [n, N*K, 1, s, s]`` float in ``[0, 1]``,
    ``support_y [n, N*K]`` long in ``[0, N)`` (each label ``K`` times, order shuffled) and the
    same for the query set with ``k_query``.
    """

    loss_name = "cross_entropy"

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
