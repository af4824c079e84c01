"""Data-parallel meta-training (2 gloo processes): each rank meta-trains on its own tasks, the
meta-gradients are averaged, and the result equals one process meta-training on all the tasks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks

from metalr import MetaConfig, MetaLearner
from metalr.tasks import TaskBatch
from metalr.tasks.sinusoid import SinusoidTasks

STEPS = 3
CONFIGS = {
    "meta-sgd": {"inner_rule": "sgd", "rates": "element"},
    "adam_hd": {"inner_rule": "adam_hd", "rates": "tensor", "inner_steps": 2},
    "reptile": {"algorithm": "reptile", "rates": "fixed", "inner_steps": 2},
}


def _learner(name: str, process_group=None) -> MetaLearner:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    config = MetaConfig(meta_batch_size=8, meta_lr=1e-2, **CONFIGS[name])
    return MetaLearner(model.double(), config, process_group=process_group)


def _batches() -> list[TaskBatch]:
    tasks = SinusoidTasks(k_shot=5)
    gen = torch.Generator().manual_seed(7)
    return [TaskBatch(*(t.double() for t in tasks.sample(8, gen))) for _ in range(STEPS)]


def _meta_rank(rank: int) -> dict:
    results = {}
    for name in CONFIGS:
        learner = _learner(name, dist.group.WORLD)
        for batch in _batches():
            learner.meta_step(TaskBatch(*(t[rank * 4 : rank * 4 + 4] for t in batch)))
        results[name] = [p.detach().clone() for p in learner.meta.learned_parameters()]
    return results


@pytest.fixture(scope="module")
def parallel_results():
    return run_ranks(_meta_rank)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_data_parallel_meta_training_equals_one_process(parallel_results, name):
    learner = _learner(name)
    start = [p.detach().clone() for p in learner.meta.learned_parameters()]
    for batch in _batches():
        learner.meta_step(batch)
    single = list(learner.meta.learned_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, single)), "meta-params never moved"
    for rank_result in parallel_results:
        for p, q in zip(rank_result[name], single):
            torch.testing.assert_close(p, q.detach(), rtol=1e-9, atol=1e-12)
