"""Noto font discovery for the glyph tasks: which scripts exist, which letters each has, splits.

Enumerates ``Noto{Sans,Serif}<Script>-Regular`` fonts, reads their ``cmap`` tables (a small parser:
no fontTools needed), picks each script's letters, and assigns scripts to ``"train"`` / ``"val"`` /
``"test"`` by a seeded hash. No rendering here: see :mod:`metalr.tasks.glyph_bank`.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_FONT_DIR", "FONT_INSTALL_HINT", "glyph_scripts", "script_split"]

DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/noto")
FONT_INSTALL_HINT = "apt-get install -y fonts-noto-core"
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
