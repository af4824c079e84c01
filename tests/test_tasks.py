"""Few-shot task sources: sinusoid, rendered glyphs, Omniglot folders, the learn2learn adapter.

The glyph tests need Debian's Noto fonts (``apt-get install -y fonts-noto-core``); without them
they fail with that command in the message (they are not skipped). They render small subsets
(``max_scripts``) into a temporary cache so the whole module stays fast.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metalr.tasks import (
    GlyphAugment,
    GlyphTasks,
    OmniglotFolder,
    OmniglotTasks,
    SinusoidTasks,
    TaskBatch,
    TaskSampler,
    check_task_batch,
    from_learn2learn,
    glyph_scripts,
    learn2learn_tasks,
    load_glyph_bank,
)
from metalr.tasks import glyphs as glyph_module


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_batches_equal(a: TaskBatch, b: TaskBatch) -> None:
    for ta, tb in zip(a, b):
        assert ta.dtype == tb.dtype and torch.equal(ta, tb)


def _assert_classification_batch(batch: TaskBatch, tasks: int, n: int, k: int, q: int, size: int):
    check_task_batch(batch)
    assert batch.support_x.shape == (tasks, n * k, 1, size, size)
    assert batch.query_x.shape == (tasks, n * q, 1, size, size)
    assert batch.support_y.shape == (tasks, n * k) and batch.query_y.shape == (tasks, n * q)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert batch.query_y.dtype == torch.int64
    for x in (batch.support_x, batch.query_x):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    for y, per in ((batch.support_y, k), (batch.query_y, q)):
        counts = torch.stack([torch.bincount(row, minlength=n) for row in y])
        assert torch.all(counts == per), counts


# ---------------------------------------------------------------------------------------------
# Sinusoid
# ---------------------------------------------------------------------------------------------


def test_sinusoid_shapes_and_protocol() -> None:
    tasks = SinusoidTasks(k_shot=10)
    assert isinstance(tasks, TaskSampler) and tasks.loss_name == "mse"
    batch = tasks.sample(25, _gen(0))
    check_task_batch(batch)
    assert batch.support_x.shape == (25, 10, 1) and batch.support_y.shape == (25, 10, 1)
    assert batch.query_x.shape == (25, 10, 1), "MAML meta-training: K query points by default"
    assert all(t.dtype == torch.float32 for t in batch)
    assert SinusoidTasks(5, k_query=7).sample(3, _gen(0)).query_y.shape == (3, 7, 1)
    assert SinusoidTasks(5, dtype=torch.float64).sample(2, _gen(0)).support_x.dtype == torch.float64


def test_sinusoid_is_maml_task_family() -> None:
    tasks = SinusoidTasks(k_shot=5, k_query=50)
    batch, params = tasks.sample(2000, _gen(1), return_params=True)
    amp, phase = params.amplitude, params.phase
    assert amp.shape == phase.shape == (2000,)
    assert float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
    assert float(phase.min()) >= 0.0 and float(phase.max()) <= math.pi
    assert float(amp.max()) > 4.9 and float(amp.min()) < 0.2  # covers the range
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
        expected = amp[:, None, None] * torch.sin(x - phase[:, None, None])
        assert torch.equal(y, expected)
        # and against float64 math: y = A sin(x - phi) up to float32 rounding
        exact = amp.double()[:, None, None] * torch.sin(x.double() - phase.double()[:, None, None])
        torch.testing.assert_close(y.double(), exact, atol=1e-5, rtol=1e-5)
    # support and query are different points of the same task
    assert not torch.equal(batch.support_x, batch.query_x[:, :5])


def test_sinusoid_determinism() -> None:
    tasks = SinusoidTasks(k_shot=10)
    _assert_batches_equal(tasks.sample(8, _gen(3)), tasks.sample(8, _gen(3)))
    assert not torch.equal(tasks.sample(8, _gen(3)).support_x, tasks.sample(8, _gen(4)).support_x)
    g = _gen(5)
    first, second = tasks.sample(8, g), tasks.sample(8, g)
    assert not torch.equal(first.support_y, second.support_y)  # the generator advances


def test_sinusoid_fixed_test_set() -> None:
    tasks = SinusoidTasks(k_shot=5)
    test = tasks.fixed_test_set()
    assert test.support_x.shape == (600, 5, 1) and test.query_x.shape == (600, 100, 1)
    _assert_batches_equal(test, tasks.fixed_test_set())
    assert not torch.equal(test.query_x, tasks.fixed_test_set(seed=1).query_x)
    small, params = tasks.fixed_test_set(10, k_query=20, seed=2, return_params=True)
    assert small.query_y.shape == (10, 20, 1) and params.amplitude.shape == (10,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_shot": 0},
        {"k_shot": 5, "k_query": 0},
        {"k_shot": 5, "amplitude": (5.0, 0.1)},
        {"k_shot": 5, "x_range": (0.0, float("inf"))},
        {"k_shot": 5, "dtype": torch.int64},
    ],
)
def test_sinusoid_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        SinusoidTasks(**kwargs)


# ---------------------------------------------------------------------------------------------
# check_task_batch
# ---------------------------------------------------------------------------------------------


def test_check_task_batch_rejects_malformed_batches() -> None:
    good = SinusoidTasks(k_shot=4, k_query=6).sample(3, _gen(0))
    check_task_batch(good)
    sx, sy, qx, qy = good
    with pytest.raises(ValueError, match="support set is empty"):
        check_task_batch(TaskBatch(sx[:, :0], sy[:, :0], qx, qy))
    with pytest.raises(ValueError, match="query set is empty"):
        check_task_batch(TaskBatch(sx, sy, qx[:, :0], qy[:, :0]))
    with pytest.raises(ValueError, match="support_y has 3"):
        check_task_batch(TaskBatch(sx, sy[:, :3], qx, qy))
    with pytest.raises(ValueError, match="query_x has 6 examples per task but query_y has 5"):
        check_task_batch(TaskBatch(sx, sy, qx, qy[:, :5]))
    with pytest.raises(ValueError, match="query_y has 2 tasks"):
        check_task_batch(TaskBatch(sx, sy, qx, qy[:2]))
    with pytest.raises(ValueError, match="support_x must be a tensor"):
        check_task_batch(TaskBatch(sx.tolist(), sy, qx, qy))
    with pytest.raises(ValueError, match=r"support_y must have shape \[tasks, examples"):
        check_task_batch(TaskBatch(sx, sy[:, 0, 0], qx, qy))


# ---------------------------------------------------------------------------------------------
# Glyphs (rendered from Noto fonts)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(scope="module")
def glyph_splits(glyph_cache) -> dict[str, GlyphTasks]:
    # Fails (with the apt-get command) rather than skipping when fonts-noto-core is missing.
    return {
        split: GlyphTasks(split, n_way=5, k_shot=2, k_query=3, max_scripts=3, cache_dir=glyph_cache)
        for split in ("train", "val", "test")
    }


def test_glyph_fonts_cover_many_scripts_and_classes() -> None:
    splits = glyph_scripts()
    names = [s for split in splits.values() for s in split]
    assert len(names) == len(set(names)) >= 30
    assert {"Latin", "Greek", "Cyrillic", "Armenian", "Devanagari"} <= set(names)
    assert len(splits["train"]) > len(splits["test"]) > 0 and len(splits["val"]) > 0
    # candidate classes (letters, before rendering): at most 60 per script
    catalog = glyph_module._script_catalog(glyph_module.DEFAULT_FONT_DIR)
    per_script = [min(60, len(glyph_module._script_letters(s))) for s in catalog]
    assert sum(per_script) >= 1000


def test_script_split_is_fixed_and_disjoint() -> None:
    names = [f"Script{i}" for i in range(40)]
    split = glyph_module.script_split(names, seed=0)
    assert split == glyph_module.script_split(list(reversed(names)), seed=0)
    assert split != glyph_module.script_split(names, seed=1)
    parts = [set(split[s]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 40 and set.union(*parts) == set(names)
    assert [len(p) for p in parts] == [24, 6, 10]


def test_glyph_batches(glyph_splits) -> None:
    tasks = glyph_splits["train"]
    assert isinstance(tasks, TaskSampler) and tasks.loss_name == "cross_entropy"
    batch, classes = tasks.sample(4, _gen(0), return_classes=True)
    _assert_classification_batch(batch, 4, 5, 2, 3, 28)
    assert classes.shape == (4, 5)
    for row in classes:
        assert len(set(row.tolist())) == 5, "a task's classes must be distinct"
        assert {tasks.class_scripts[c] for c in row.tolist()} <= set(tasks.scripts)
    # ink is bright on a dark background
    assert float(batch.support_x.mean()) < 0.35


def test_glyph_determinism(glyph_splits) -> None:
    tasks = glyph_splits["val"]
    _assert_batches_equal(tasks.sample(3, _gen(7)), tasks.sample(3, _gen(7)))
    a, b = tasks.sample(3, _gen(7)), tasks.sample(3, _gen(8))
    assert not torch.equal(a.support_x, b.support_x)


def test_glyph_splits_are_disjoint(glyph_splits) -> None:
    full = glyph_scripts()
    classes = {}
    for split, tasks in glyph_splits.items():
        assert tasks.scripts and set(tasks.scripts) <= set(full[split])
        assert tasks.num_classes >= 5
        classes[split] = set(zip(tasks.class_scripts, tasks.class_codepoints))
        assert len(classes[split]) == tasks.num_classes
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(glyph_splits[a].scripts) & set(glyph_splits[b].scripts)
        assert not {cp for _, cp in classes[a]} & {cp for _, cp in classes[b]}


def test_glyph_augmentation_makes_distinct_writers(glyph_cache) -> None:
    kwargs = {"n_way": 3, "k_shot": 4, "k_query": 1, "max_scripts": 3, "cache_dir": glyph_cache}
    augmented = GlyphTasks("test", **kwargs).sample(2, _gen(0))
    plain = GlyphTasks("test", augment=False, **kwargs).sample(2, _gen(0))
    for batch, distinct in ((augmented, True), (plain, False)):
        for t in range(2):
            for label in range(3):
                imgs = batch.support_x[t][batch.support_y[t] == label]
                same = all(torch.equal(imgs[0], imgs[i]) for i in range(1, len(imgs)))
                assert same != distinct
    custom = GlyphTasks("test", augment=GlyphAugment(rotation=0, elastic=0), **kwargs)
    _assert_classification_batch(custom.sample(2, _gen(0)), 2, 3, 4, 1, 28)


def test_glyph_augment_is_identity_with_zero_ranges() -> None:
    x = torch.rand(6, 1, 20, 20)
    identity = GlyphAugment(
        rotation=0, shear=0, scale=(1, 1), aspect=0, translate=0, elastic=0, stroke=(0, 0)
    )
    torch.testing.assert_close(identity(x, _gen(0)), x, atol=1e-5, rtol=0)


def test_glyph_bank_cache_and_image_size(glyph_cache, glyph_splits) -> None:
    scripts = glyph_splits["train"].scripts
    start = time.perf_counter()
    bank = load_glyph_bank(scripts, cache_dir=glyph_cache)
    assert bank.loaded_from_cache and time.perf_counter() - start < 1.0
    assert bank.path is not None and bank.path.parent == glyph_cache
    assert bank.images.dtype == np.uint8 and bank.images.shape[1:] == (56, 56)
    assert bank.num_classes == sum(bank.classes_per_script().values())
    rebuilt = load_glyph_bank(scripts, cache_dir=glyph_cache, rebuild=True)
    assert not rebuilt.loaded_from_cache and np.array_equal(rebuilt.images, bank.images)
    small = GlyphTasks(
        "train", n_way=2, k_shot=1, k_query=1, image_size=14, max_scripts=3, cache_dir=glyph_cache
    )
    _assert_classification_batch(small.sample(2, _gen(0)), 2, 2, 1, 1, 14)


def test_glyph_cache_dir_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("METALR_CACHE", str(tmp_path))
    assert glyph_module._cache_root(None) == tmp_path / "glyphs"
    monkeypatch.delenv("METALR_CACHE")
    assert glyph_module._cache_root(None) == Path.home() / ".cache" / "metalr" / "glyphs"


def test_glyph_missing_fonts_name_the_install_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y fonts-noto-core"):
        GlyphTasks("train", font_dir=tmp_path / "no-fonts", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install -y fonts-noto-core"):
        load_glyph_bank(font_dir=tmp_path / "empty", cache_dir=tmp_path)


def test_glyph_rejects_bad_arguments(glyph_cache) -> None:
    with pytest.raises(ValueError, match="split"):
        GlyphTasks("training", cache_dir=glyph_cache)
    with pytest.raises(ValueError, match="n_way"):
        GlyphTasks("val", n_way=0, cache_dir=glyph_cache)
    with pytest.raises(ValueError, match="unknown scripts"):
        load_glyph_bank(["Klingon"], cache_dir=glyph_cache)


def test_cmap_parser_matches_fonttools() -> None:
    ttlib = pytest.importorskip("fontTools.ttLib")
    catalog = {s.name: s.font for s in glyph_module._script_catalog(glyph_module.DEFAULT_FONT_DIR)}
    for name in ("Latin", "Armenian", "Egyptian Hieroglyphs"):
        expected = set(ttlib.TTFont(catalog[name]).getBestCmap())
        assert glyph_module._cmap_codepoints(catalog[name]) == expected


# ---------------------------------------------------------------------------------------------
# Omniglot folders (a generated fixture: nothing is downloaded)
# ---------------------------------------------------------------------------------------------

_FIXTURE = {
    "images_background": {"Alpha_A": 3, "Beta_B": 3, "Gamma_C": 2},
    "images_evaluation": {"Delta_D": 3, "Eps_E": 3},
}


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("omniglot")
    rng = random.Random(0)
    code = 0
    for split, alphabets in _FIXTURE.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(n_chars):
                folder = root / split / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                code += 1
                for d in range(20):
                    img = Image.new("L", (105, 105), 255)  # black strokes on white, like Omniglot
                    draw = ImageDraw.Draw(img)
                    # the class is a fixed bar pattern (its code in binary); drawers jitter it
                    for bit in range(5):
                        if code >> bit & 1:
                            y = 12 + 18 * bit + rng.randint(-2, 2)
                            draw.line([(15, y), (90, y + rng.randint(-3, 3))], fill=0, width=6)
                    draw.line([(10, 10), (10, 95)], fill=0, width=4)  # breaks rotation symmetry
                    draw.rectangle([(14 + 4 * d, 98), (17 + 4 * d, 103)], fill=0)  # the drawer
                    img.convert("1").save(folder / f"{code:04d}_{d + 1:02d}.png")
    return root


def test_omniglot_folder_loads_layout(omniglot_root) -> None:
    folder = OmniglotFolder(omniglot_root, background=True, use_cache=False)
    assert folder.alphabets == ["Alpha_A", "Beta_B", "Gamma_C"]
    assert folder.num_classes == 8 and len(folder) == 160
    assert folder.images.shape == (160, 1, 28, 28) and folder.images.dtype == torch.uint8
    assert folder.characters[0] == "Alpha_A/character01"
    assert torch.equal(torch.bincount(folder.targets), torch.full((8,), 20))
    # inverted: background dark, strokes bright
    assert float(folder.images.float().mean()) < 100 and int(folder.images.max()) > 200
    x, y = folder[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 0
    evaluation = OmniglotFolder(omniglot_root, background=False, use_cache=False)
    assert evaluation.alphabets == ["Delta_D", "Eps_E"] and evaluation.num_classes == 6


def test_omniglot_tasks_sample_from_the_requested_split(omniglot_root) -> None:
    for split, n_classes in (("background", 8), ("evaluation", 6)):
        tasks = OmniglotTasks(omniglot_root, split, n_way=4, k_shot=2, k_query=3, use_cache=False)
        assert isinstance(tasks, TaskSampler) and tasks.num_classes == n_classes
        batch, classes = tasks.sample(5, _gen(0), return_classes=True)
        _assert_classification_batch(batch, 5, 4, 2, 3, 28)
        folder = tasks.folder
        alphabets = set(_FIXTURE[f"images_{split}"])
        for t in range(5):
            assert len(set(classes[t].tolist())) == 4
            for label, c in enumerate(classes[t].tolist()):
                assert tasks.class_name(c).split("/")[0] in alphabets
                own = folder.images[folder.targets == c].float() / 255
                for x in (batch.support_x, batch.query_x):
                    ys = batch.support_y if x is batch.support_x else batch.query_y
                    for img in x[t][ys[t] == label]:
                        assert any(torch.equal(img, o) for o in own), "image not from its class"
                # the K + Q drawings of a class are distinct drawings
                sup = batch.support_x[t][batch.support_y[t] == label]
                qry = batch.query_x[t][batch.query_y[t] == label]
                both = torch.cat([sup, qry]).flatten(1)
                assert torch.unique(both, dim=0).shape[0] == 5


def test_omniglot_determinism(omniglot_root) -> None:
    tasks = OmniglotTasks(omniglot_root, n_way=3, k_shot=1, k_query=2, use_cache=False)
    _assert_batches_equal(tasks.sample(4, _gen(11)), tasks.sample(4, _gen(11)))
    assert not torch.equal(tasks.sample(4, _gen(11)).query_x, tasks.sample(4, _gen(12)).query_x)


def test_omniglot_rotations_are_new_classes(omniglot_root) -> None:
    folder = OmniglotFolder(omniglot_root, use_cache=False)
    tasks = OmniglotTasks(folder, n_way=5, k_shot=1, k_query=1, rotations=(0, 90, 180, 270))
    assert tasks.num_classes == 32 and tasks.class_name(8) == "Alpha_A/character01@90"
    batch, classes = tasks.sample(6, _gen(0), return_classes=True)
    _assert_classification_batch(batch, 6, 5, 1, 1, 28)
    for t in range(6):
        for label, c in enumerate(classes[t].tolist()):
            img = batch.support_x[t][batch.support_y[t] == label][0]
            turns = tasks.rotations[c // 8] // 90
            own = folder.images[folder.targets == c % 8].float() / 255
            assert any(torch.equal(img, torch.rot90(o, turns, dims=(-2, -1))) for o in own)
    with pytest.raises(ValueError, match="multiples of 90"):
        OmniglotTasks(folder, rotations=(0, 45))


def test_omniglot_cache_roundtrip(omniglot_root, tmp_path) -> None:
    first = OmniglotFolder(omniglot_root, background=False, cache_dir=tmp_path)
    second = OmniglotFolder(omniglot_root, background=False, cache_dir=tmp_path)
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert torch.equal(first.images, second.images) and list(tmp_path.glob("*.npz"))


def test_omniglot_errors(omniglot_root, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="images_background"):
        OmniglotTasks(tmp_path / "nowhere", use_cache=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "images_evaluation")):
        OmniglotFolder(tmp_path / "nowhere", background=False, use_cache=False)
    with pytest.raises(ValueError, match="only 20 drawings"):
        OmniglotTasks(omniglot_root, k_shot=5, k_query=16, use_cache=False)
    with pytest.raises(ValueError, match="split"):
        OmniglotTasks(omniglot_root, split="train", use_cache=False)
    with pytest.raises(ValueError, match="only 6 classes"):
        OmniglotTasks(omniglot_root, "evaluation", n_way=7, use_cache=False).sample(1, _gen(0))


# ---------------------------------------------------------------------------------------------
# learn2learn adapter (a duck-typed fake TaskDataset: learn2learn is not installed here)
# ---------------------------------------------------------------------------------------------


class FakeTaskDataset:
    """Like learn2learn's ``TaskDataset`` with NWays/KShots/LoadData: ``sample() -> [x, y]``,
    examples grouped by class, labels are the original class ids; ``x`` encodes its class."""

    def __init__(self, n_way: int, shots: int, num_classes: int = 20, seed: int = 0) -> None:
        self.n_way, self.shots, self.num_classes = n_way, shots, num_classes
        self.rng = random.Random(seed)

    def sample(self):
        classes = self.rng.sample(range(self.num_classes), self.n_way)
        y = torch.tensor([100 + c for c in classes for _ in range(self.shots)])
        x = torch.stack(
            [torch.tensor([float(c), float(i), 0.5]) for c in classes for i in range(self.shots)]
        )
        return [x, y]


def test_learn2learn_adapter_splits_and_relabels() -> None:
    sampler = from_learn2learn(
        FakeTaskDataset(5, 3 + 4), n_way=5, k_shot=3, k_query=4, loss_name="cross_entropy"
    )
    assert isinstance(sampler, TaskSampler) and sampler.loss_name == "cross_entropy"
    batch = sampler.sample(6, _gen(0))
    check_task_batch(batch)
    assert batch.support_x.shape == (6, 15, 3) and batch.query_x.shape == (6, 20, 3)
    for y, per in ((batch.support_y, 3), (batch.query_y, 4)):
        assert y.dtype == torch.int64
        assert all(
            torch.equal(torch.bincount(row, minlength=5), torch.full((5,), per)) for row in y
        )
    for t in range(6):
        for label in range(5):
            sup = batch.support_x[t][batch.support_y[t] == label]
            qry = batch.query_x[t][batch.query_y[t] == label]
            origin = torch.cat([sup, qry])[:, 0]
            assert torch.all(origin == origin[0]), "one label must be one original class"
            drawn = torch.cat([sup, qry])[:, 1]
            assert len(set(drawn.tolist())) == 7, "support and query examples are distinct"


def test_learn2learn_adapter_determinism_given_the_task_stream() -> None:
    def run(seed: int) -> TaskBatch:
        sampler = from_learn2learn(FakeTaskDataset(3, 4, seed=0), 3, 2, 2)
        return sampler.sample(4, _gen(seed))

    _assert_batches_equal(run(1), run(1))
    assert not torch.equal(run(1).support_y, run(2).support_y)


def test_learn2learn_adapter_regression_and_errors() -> None:
    class Regression:
        def sample(self):
            x = torch.linspace(-1, 1, 30).unsqueeze(1)
            return x, 2 * x

    batch = from_learn2learn(Regression(), 1, 10, 20, loss_name="mse").sample(2, _gen(0))
    assert batch.support_x.shape == (2, 10, 1) and batch.query_y.shape == (2, 20, 1)
    torch.testing.assert_close(batch.support_y, 2 * batch.support_x)
    with pytest.raises(ValueError, match="expected n_way=4"):
        from_learn2learn(FakeTaskDataset(3, 4), 4, 2, 2).sample(1, _gen(0))
    with pytest.raises(ValueError, match="need k_shot \\+ k_query = 5"):
        from_learn2learn(FakeTaskDataset(3, 4), 3, 2, 3).sample(1, _gen(0))
    with pytest.raises(TypeError, match="sample"):
        from_learn2learn(object(), 3, 1, 1)
    with pytest.raises(ValueError, match="loss_name"):
        from_learn2learn(FakeTaskDataset(3, 4), 3, 1, 1, loss_name="nll")


def test_learn2learn_missing_gives_install_recipe(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # import fails even if installed
    with pytest.raises(ImportError, match="no-build-isolation") as info:
        learn2learn_tasks([(torch.zeros(1), 0)], n_way=1, k_shot=1, k_query=1)
    assert "learn2learn==0.2.0" in str(info.value)
