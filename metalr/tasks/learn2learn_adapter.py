"""Use a learn2learn ``TaskDataset`` (or anything with ``.sample() -> (x, y)``) as a TaskSampler.

learn2learn is never a dependency of metalr: :func:`from_learn2learn` only calls
``task_dataset.sample()``, so it also accepts any object with that method. Only
:func:`learn2learn_tasks`, which builds the ``TaskDataset`` for you from a map-style dataset,
imports learn2learn (lazily), and says how to install it when it is missing.

A learn2learn task from ``NWays(n) + KShots(k_shot + k_query)`` holds ``n * (k_shot + k_query)``
examples with the original class ids as labels. The adapter groups them by class, relabels the
classes ``0..n-1`` in a random order drawn from the generator, puts ``k_shot`` examples of each
class in the support set and ``k_query`` in the query set, and shuffles both. Which classes and
examples learn2learn picks is decided by its own RNG (Python's ``random``): seed that as well for a
fully reproducible stream.
"""

from __future__ import annotations

from typing import Any

import torch

from metalr.tasks.base import TaskBatch, check_task_batch

__all__ = ["LEARN2LEARN_INSTALL_HINT", "Learn2LearnTasks", "from_learn2learn", "learn2learn_tasks"]

LEARN2LEARN_INSTALL_HINT = (
    "learn2learn is optional and not installed. It has no wheels and needs torchvision "
    "(torch 2.14.1 + torchvision 0.29.1). Install with:\n"
    '  pip install "torch==2.14.1" "torchvision==0.29.1" cython\n'
    "  pip install --no-build-isolation --config-settings=--build-option=build_ext "
    "learn2learn==0.2.0\n"
    "(re-cythonizes its sources, ~85 s; add --no-deps plus torchvision requests scipy gym tqdm "
    "to avoid its qpth/gsutil dependencies)."
)

_LOSSES = ("cross_entropy", "mse")


def _import_learn2learn():
    try:
        import learn2learn
    except ImportError as exc:
        raise ImportError(LEARN2LEARN_INSTALL_HINT) from exc
    return learn2learn


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Learn2LearnTasks:
    """A :class:`~metalr.tasks.TaskSampler` over a learn2learn-style task dataset.

    Build it with :func:`from_learn2learn`. ``sample(n, generator)`` calls
    ``task_dataset.sample()`` ``n`` times and stacks the tasks.
    """

    def __init__(
        self, task_dataset: Any, n_way: int, k_shot: int, k_query: int, loss_name: str
    ) -> None:
        if not callable(getattr(task_dataset, "sample", None)):
            raise TypeError(
                f"task_dataset must have a sample() method returning (x, y); "
                f"got {type(task_dataset).__name__}"
            )
        if loss_name not in _LOSSES:
            raise ValueError(f"loss_name must be one of {_LOSSES}, got {loss_name!r}")
        self.task_dataset = task_dataset
        self.n_way = _positive("n_way", n_way)
        self.k_shot = _positive("k_shot", k_shot)
        self.k_query = _positive("k_query", k_query)
        self.loss_name = loss_name

    def __repr__(self) -> str:
        return (
            f"Learn2LearnTasks({type(self.task_dataset).__name__}, n_way={self.n_way}, "
            f"k_shot={self.k_shot}, k_query={self.k_query}, loss_name={self.loss_name!r})"
        )

    def _one(self, generator: torch.Generator | None) -> TaskBatch:
        task = self.task_dataset.sample()
        try:
            x, y = task[0], task[1]
        except (TypeError, IndexError, KeyError):
            raise ValueError(
                f"task_dataset.sample() must return (x, y), got {type(task).__name__}"
            ) from None
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"a task's x and y need the same leading (example) dimension, got "
                f"x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        n, k, q = self.n_way, self.k_shot, self.k_query
        if self.loss_name == "mse":
            need = n * (k + q)
            if x.shape[0] < need:
                raise ValueError(
                    f"a task has {x.shape[0]} examples, need n_way*(k_shot+k_query)={need}"
                )
            perm = torch.randperm(x.shape[0], generator=generator)
            s, qq = perm[: n * k], perm[n * k : need]
            return TaskBatch(x[s], y[s], x[qq], y[qq])
        if y.dim() != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"classification labels must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}"
            )
        classes, counts = torch.unique(y, return_counts=True)
        if classes.numel() != n:
            raise ValueError(f"a task has {classes.numel()} classes, expected n_way={n}")
        if int(counts.min()) < k + q:
            raise ValueError(
                f"a task's class {int(classes[counts.argmin()])} has {int(counts.min())} examples, "
                f"need k_shot + k_query = {k + q}"
            )
        new_label = torch.randperm(n, generator=generator)  # class i (sorted id) -> new_label[i]
        sx, sy, qx, qy = [], [], [], []
        for i, c in enumerate(classes):
            idx = torch.nonzero(y == c).squeeze(1)
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
            label = int(new_label[i])
            sx.append(x[idx[:k]])
            qx.append(x[idx[k : k + q]])
            sy.append(torch.full((k,), label, dtype=torch.int64))
            qy.append(torch.full((q,), label, dtype=torch.int64))
        sx, sy, qx, qy = torch.cat(sx), torch.cat(sy), torch.cat(qx), torch.cat(qy)
        ps = torch.randperm(n * k, generator=generator)
        pq = torch.randperm(n * q, generator=generator)
        return TaskBatch(sx[ps], sy[ps], qx[pq], qy[pq])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> TaskBatch:
        """Stack ``batch_size`` tasks from ``task_dataset.sample()`` into one :class:`TaskBatch`."""
        _positive("batch_size", batch_size)
        tasks = [self._one(generator) for _ in range(batch_size)]
        batch = TaskBatch(*(torch.stack([t[i] for t in tasks]) for i in range(4)))
        check_task_batch(batch)
        return batch


def from_learn2learn(
    task_dataset: Any,
    n_way: int,
    k_shot: int,
    k_query: int,
    loss_name: str = "cross_entropy",
) -> Learn2LearnTasks:
    """Wrap a learn2learn ``TaskDataset`` (only its ``sample()`` is used) as a TaskSampler.

    For ``"cross_entropy"`` each task must hold ``n_way`` classes with at least
    ``k_shot + k_query`` examples each (learn2learn's ``NWays(n_way)`` + ``KShots(k_shot +
    k_query)``); labels become ``0..n_way-1``. For ``"mse"`` the examples are shuffled and the first
    ``n_way * k_shot`` form the support set, the next ``n_way * k_query`` the query set.
    """
    return Learn2LearnTasks(task_dataset, n_way, k_shot, k_query, loss_name)


def learn2learn_tasks(
    dataset: Any,
    n_way: int,
    k_shot: int,
    k_query: int,
    num_tasks: int = -1,
) -> Learn2LearnTasks:
    """Build learn2learn's ``TaskDataset`` (``NWays``, ``KShots(k_shot + k_query)``, ``LoadData``)
    over a map-style classification ``dataset`` and wrap it. Needs learn2learn installed."""
    l2l = _import_learn2learn()
    meta = l2l.data.MetaDataset(dataset)
    transforms = [
        l2l.data.transforms.NWays(meta, n_way),
        l2l.data.transforms.KShots(meta, k_shot + k_query),
        l2l.data.transforms.LoadData(meta),
    ]
    taskset = l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=num_tasks)
    return from_learn2learn(taskset, n_way, k_shot, k_query, "cross_entropy")
