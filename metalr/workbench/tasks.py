"""Training tasks of the ablation workbench, each in a ``smoke`` (seconds) and a ``full`` size.

Every task uses offline data only and caches its preparation (``$METALR_CACHE``, default
``~/.cache/metalr/workbench``):

* ``digits_logreg`` / ``digits_mlp``: sklearn's bundled 8×8 digits (1797 images), softmax
  regression / ReLU MLP;
* ``mnist1d_mlp``: mnist1d (``pip install mnist1d``; generated locally with
  ``make_dataset(get_dataset_args())``, never downloaded), ReLU MLP;
* ``animal_cnn``: Animal-MNIST (``pip install --no-deps animal-mnist``; 10,000 real 28×28 animal
  silhouettes, 10 classes; its two gzip pickles are read directly, its TensorFlow loader is never
  imported), a two-block CNN;
* ``charlm_gru``: a character-level GRU language model on the King James Bible
  (``apt-get install -y bible-kjv``; read with ``bible -f 'Gen1:1-Rev22:21'``).
  ``fallback_text=True`` uses a tiny built-in text instead (tests only);
* ``fewshot_sinusoid``: fine-tune MAML's sinusoid regressor (1-40-40-1 ReLU MLP, MSE) on one
  held-out sinusoid: train on its ``K`` support points (full batch), validate and test on 100
  query points each. Its meta-learned prior (``prior: task`` in an optimizer spec) is
  :mod:`metalr.workbench.priors`.

The held-out tasks (:mod:`metalr.workbench.heldout_tasks`), the transfer tasks
(:mod:`metalr.workbench.transfer_tasks`) and the development task ``kjv_transformer``
(:mod:`metalr.workbench.dev_tasks`: the held-out transformer's failure reproduced on other text)
are built by their own modules.

A :class:`Task` builds a fresh model from a seed, draws training batches from its own generator
(seeded per run: init and batch order vary with the seed) and scores a model on the validation
(and test) split. The splits are fixed, except for a task with ``splits_for_seed``
(``fewshot_sinusoid``): it draws its data per seed, so that runs from a learned initialisation
(identical across seeds) still see different tasks; pass ``seed`` to :meth:`Task.evaluate`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from metalr.workbench.dev_tasks import BUILDERS as DEV_BUILDERS
from metalr.workbench.dev_tasks import DEV_SPECS
from metalr.workbench.heldout_tasks import BUILDERS as HELDOUT_BUILDERS
from metalr.workbench.heldout_tasks import HELDOUT_SPECS, char_windows
from metalr.workbench.transfer_tasks import SPECS as TRANSFER_SPECS
from metalr.workbench.transfer_tasks import build_transfer

SIZES = ("smoke", "full")
BIBLE_INSTALL = "apt-get install -y bible-kjv"
MNIST1D_INSTALL = 'pip install "torch==2.13.0" mnist1d'
# --no-deps: its declared dependencies include TensorFlow (~1.9 GB), which this task never imports
ANIMAL_INSTALL = "pip install --no-deps animal-mnist==0.4"

FALLBACK_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face "
    "of the waters. And God said, Let there be light: and there was light. And God saw the light, "
    "that it was good: and God divided the light from the darkness. And God called the light Day, "
    "and the darkness he called Night. And the evening and the morning were the first day.\n"
) * 40


def cache_dir() -> Path:
    root = Path(os.environ.get("METALR_CACHE", Path.home() / ".cache" / "metalr")) / "workbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Task:
    """A prepared task: data on ``device``, a model factory and the batch/loss functions.

    ``splits_for_seed(seed) -> (train, val, test)``, when set, replaces the fixed splits for the
    run of that seed (``train``/``val``/``test`` then hold seed 0's, for inspection only).
    """

    name: str
    size: str
    make_model: Callable[[], nn.Module]
    train: Split
    val: Split
    test: Split
    batch_size: int | None  # None: full batch
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    splits_for_seed: Callable[[int], tuple[Split, Split, Split]] | None = None

    def model(self, seed: int, device: str | torch.device = "cpu") -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model().to(device)

    def splits(self, seed: int | None = None) -> tuple[Split, Split, Split]:
        """``(train, val, test)`` of the run with ``seed`` (the fixed splits for most tasks)."""
        if self.splits_for_seed is None:
            return self.train, self.val, self.test
        if seed is None:
            raise ValueError(f"task {self.name} draws its data per seed: pass seed")
        return self.splits_for_seed(seed)

    def batches(self, seed: int) -> Callable[[], Split]:
        """A function returning the next training batch (its own generator from ``seed``)."""
        x, y = self.splits(seed)[0]
        if self.batch_size is None or self.batch_size >= len(x):
            return lambda: (x, y)
        gen = torch.Generator().manual_seed(10_000 + seed)
        n, bs = len(x), self.batch_size
        state = {"perm": torch.randperm(n, generator=gen), "pos": 0}

        def nxt() -> Split:
            if state["pos"] + bs > n:
                state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
            idx = state["perm"][state["pos"] : state["pos"] + bs].to(x.device)
            state["pos"] += bs
            return x[idx], y[idx]

        return nxt

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val", seed: int | None = None) -> float:
        """Loss of ``model`` on ``split`` (``"train"``, ``"val"``, ``"test"``) of run ``seed``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"Invalid split {split!r}; expected 'train', 'val' or 'test'")
        x, y = self.splits(seed)[("train", "val", "test").index(split)]
        loss = float(self.loss(model(x), y))
        return loss if math.isfinite(loss) else float("inf")


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _split(x: torch.Tensor, y: torch.Tensor, fractions=(0.6, 0.2), seed: int = 0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = int(fractions[0] * len(x)), int((fractions[0] + fractions[1]) * len(x))
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _standardize(train, *others):
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    return [((x - mean) / std, y) for x, y in (train, *others)]


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise ImportError(
            'digits tasks need scikit-learn: pip install "metalr[experiments]"'
        ) from exc
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def _cached_arrays(
    name: str, prepare: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels from ``<cache>/<name>.pt``; prepared (and saved atomically) once."""
    path = cache_dir() / f"{name}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    x, y = prepare()
    from metalr.meta.results import atomic_save

    atomic_save({"x": x, "y": y}, path)
    return x, y


@functools.cache
def _mnist1d() -> tuple[torch.Tensor, torch.Tensor]:
    return _cached_arrays("mnist1d", _prepare_mnist1d)


def _prepare_mnist1d() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(f"the mnist1d task needs the mnist1d package: {MNIST1D_INSTALL}") from exc
    d = make_dataset(get_dataset_args())  # generated locally; no download
    x = torch.cat([torch.as_tensor(d["x"]), torch.as_tensor(d["x_test"])]).float()
    y = torch.cat([torch.as_tensor(d["y"]), torch.as_tensor(d["y_test"])]).long()
    return x, y


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no other callable can run)."""

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
            return core.multiarray._reconstruct
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


@functools.cache
def _animal_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Animal-MNIST's 10,000 images (uint8, ``[N, 28, 28]``) and labels, cached as tensors."""
    return _cached_arrays("animal_mnist", _read_animal_mnist)


def _read_animal_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    # find_spec does not import the package (its loader imports TensorFlow)
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the animal_cnn task needs the animal-mnist package's data files: "
                          f"{ANIMAL_INSTALL} (--no-deps: it declares TensorFlow, ~1.9 GB, as a "
                          "dependency; this task only reads its two data files)")  # fmt: skip
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; reinstall: {ANIMAL_INSTALL}")
        with gzip.open(folder / name, "rb") as f:
            arrays.append(_ArrayUnpickler(f).load())
    x, y = torch.as_tensor(arrays[0], dtype=torch.uint8), torch.as_tensor(arrays[1]).long()
    if x.shape != (10_000, 28, 28) or y.shape != (10_000,):
        raise ValueError(f"unexpected animal-mnist arrays {tuple(x.shape)}, {tuple(y.shape)}")
    return x, y


def _cnn(c1: int, c2: int) -> nn.Sequential:
    """Two conv-ReLU-maxpool blocks (28 → 14 → 7) and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
    )  # fmt: skip


HELD_OUT_SEED = 7_000_000  # the held-out sinusoids' generators (meta-training uses its own)


def _sinusoid_splits(k_shot: int, seed: int, device: str | torch.device):
    """One sinusoid per seed: ``k_shot`` training points, 100 validation, 100 test points."""
    from metalr.tasks.sinusoid import SinusoidTasks

    gen = torch.Generator().manual_seed(HELD_OUT_SEED + seed)
    sx, sy, qx, qy = (t[0].to(device) for t in SinusoidTasks(k_shot, 200).sample(1, gen))
    return (sx, sy), (qx[:100], qy[:100]), (qx[100:], qy[100:])


def bible_text() -> str:
    """The KJV Bible as plain text (cached); raises naming the install command when missing."""
    path = cache_dir() / "kjv.txt"
    if path.is_file():
        return path.read_text()
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            f"the charlm_gru task needs the KJV text: {BIBLE_INSTALL} (provides the `bible` "
            "command), or pass fallback_text=True for a tiny built-in text (tests only)"
        )
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True, timeout=300).stdout  # fmt: skip
    if len(out) < 100_000:
        raise FileNotFoundError(f"`bible -f` returned only {len(out)} characters; reinstall: "
                                f"{BIBLE_INSTALL}")  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(out)
    os.replace(tmp, path)
    return out


class CharGRU(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0])


def _windows(ids: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1 : n * seq + 1].reshape(n, seq)
    return x, y


# size → options; "full" sizes are for real studies, "smoke" ones train in seconds.
SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "digits_logreg": {"smoke": {"hidden": [], "batch_size": None},
                      "full": {"hidden": [], "batch_size": 128}},
    "digits_mlp": {"smoke": {"hidden": [64], "batch_size": None},
                   "full": {"hidden": [128, 128], "batch_size": 128}},
    "mnist1d_mlp": {"smoke": {"hidden": [64], "batch_size": 256, "examples": 1500},
                    "full": {"hidden": [256, 256], "batch_size": 128, "examples": None}},
    "animal_cnn": {"smoke": {"channels": [8, 16], "batch_size": 128, "examples": 2000},
                   "full": {"channels": [16, 32], "batch_size": 128, "examples": None}},
    "charlm_gru": {"smoke": {"chars": 30_000, "seq": 64, "embed": 16, "hidden": 64,
                             "batch_size": 32},
                   "full": {"chars": 1_000_000, "seq": 64, "embed": 32, "hidden": 128,
                            "batch_size": 32, "eval_windows": 256}},
    # the sizes differ only in the budget of the meta-learned prior (metalr.workbench.priors)
    "fewshot_sinusoid": {"smoke": {"k_shot": 10, "hidden": [40, 40], "batch_size": None},
                         "full": {"k_shot": 10, "hidden": [40, 40], "batch_size": None}},
}  # fmt: skip
SPECS.update(HELDOUT_SPECS)  # never used to fit the "seek" controller (see heldout_tasks)
SPECS.update(TRANSFER_SPECS)  # pretrained body + fresh head (see transfer_tasks)
SPECS.update(DEV_SPECS)  # development tasks: diagnosis without a held-out task (see dev_tasks)
TASKS = tuple(SPECS)


def make_task(
    name: str, size: str = "smoke", device: str | torch.device = "cpu", *,
    fallback_text: bool = False,
) -> Task:  # fmt: skip
    """Prepare task ``name`` at ``size`` with its data on ``device``."""
    if name not in SPECS:
        raise ValueError(f"Unknown task {name!r}; expected one of {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"Invalid task size {size!r}; expected one of {SIZES}")
    spec = SPECS[name][size]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _ce
    splits_for_seed = None
    if name in TRANSFER_SPECS:
        make_model, splits, batch_size, loss = build_transfer(name, spec, size, fallback_text)
        splits = [(xs.to(device), ys.to(device)) for xs, ys in splits]
        return Task(name, size, make_model, *splits, batch_size=batch_size, loss=loss)
    if name in HELDOUT_BUILDERS or name in DEV_BUILDERS:
        built = (HELDOUT_BUILDERS[name](spec) if name in HELDOUT_BUILDERS
                 else DEV_BUILDERS[name](spec, fallback_text))  # fmt: skip
        make_model, splits, batch_size, loss = built
        splits = [(xs.to(device), ys.to(device)) for xs, ys in splits]
        return Task(name, size, make_model, *splits, batch_size=batch_size, loss=loss)
    if name.startswith(("digits", "mnist1d")):
        x, y = _digits() if name.startswith("digits") else _mnist1d()
        if spec.get("examples"):
            x, y = x[: spec["examples"]], y[: spec["examples"]]
        splits = _standardize(*_split(x, y))
        widths = [x.shape[1], *spec["hidden"], 10]
        make_model: Callable[[], nn.Module] = lambda: _mlp(widths)
    elif name == "animal_cnn":
        x, y = _animal_mnist()
        # the files are sorted by class: shuffle before taking a subset
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        order = order[: spec["examples"]] if spec["examples"] else order
        splits = _split(x[order].unsqueeze(1).float() / 255.0, y[order])
        mean, std = splits[0][0].mean(), splits[0][0].std()  # one scalar: pixels share a scale
        splits = [((xs - mean) / std, ys) for xs, ys in splits]
        c1, c2 = spec["channels"]
        make_model = lambda: _cnn(c1, c2)
    elif name == "fewshot_sinusoid":
        k, widths = spec["k_shot"], [1, *spec["hidden"], 1]
        splits_for_seed = functools.lru_cache(maxsize=16)(
            lambda seed: _sinusoid_splits(k, seed, device)
        )
        splits = list(splits_for_seed(0))
        make_model = lambda: _mlp(widths)  # the meta-learner's model (parameter names match)
        loss = F.mse_loss
    else:
        text = FALLBACK_TEXT if fallback_text else bible_text()
        v, splits = char_windows(text[: spec["chars"]], spec["seq"], spec.get("eval_windows"))
        e, h = spec["embed"], spec["hidden"]
        make_model = lambda: CharGRU(v, e, h)
    splits = [(xs.to(device), ys.to(device)) for xs, ys in splits]
    return Task(name, size, make_model, *splits, batch_size=spec["batch_size"], loss=loss,
                splits_for_seed=splits_for_seed)  # fmt: skip
