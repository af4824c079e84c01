"""Bad input raises a ValueError that names the problem (matched by regex)."""

from __future__ import annotations

import pytest
import torch
from test_meta_common import mlp, random_regression

from metalr.meta import MetaConfig, MetaLearner, MetaLR
from metalr.tasks import TaskBatch


@pytest.mark.parametrize(
    "options,message",
    [
        ({"inner_rule": "rmsprop"}, r"Invalid inner_rule: 'rmsprop'; expected one of 'sgd', 'sgd_hd', 'adam_hd'"),
        ({"rates": "layer"}, r"Invalid rates: 'layer'; expected one of 'element', 'tensor', 'step_tensor', 'fixed'"),
        ({"algorithm": "anil"}, r"Invalid algorithm: 'anil'; expected one of 'maml', 'reptile'"),
        ({"backend": "jit"}, r"Invalid backend: 'jit'; expected one of 'vmap', 'loop'"),
        ({"hypergrad_rule": "sign"}, r"Invalid hypergrad_rule: 'sign'"),
        ({"hypergrad_granularity": "element"}, r"Invalid hypergrad_granularity: 'element'; expected one of 'tensor', 'group'"),
        ({"hypergrad_transform": "sigmoid"}, r"Invalid hypergrad_transform: 'sigmoid'"),
        ({"inner_steps": 0}, r"Invalid inner_steps value: 0; expected an integer >= 1"),
        ({"inner_steps": 1.5}, r"Invalid inner_steps value: 1.5"),
        ({"meta_batch_size": 0}, r"Invalid meta_batch_size value: 0"),
        ({"inner_lr": 0.0}, r"Invalid inner_lr value: 0.0; expected a finite number > 0"),
        ({"inner_lr": float("nan")}, r"Invalid inner_lr value: nan"),
        ({"meta_lr": -1.0}, r"Invalid meta_lr value: -1.0"),
        ({"meta_grad_clip": 0.0}, r"Invalid meta_grad_clip value: 0.0"),
        ({"first_order": "yes"}, r"Invalid first_order value: 'yes'; expected True or False"),
        ({"lr_bounds": (1.0, 0.5)}, r"Invalid lr_bounds: \(1.0, 0.5\)"),
        ({"adam_betas": (0.9, 1.0)}, r"Invalid adam_betas: \(0.9, 1.0\)"),
        ({"learn_hypergrad_lr": True}, r"inner_rule='sgd' has no hypergrad_lr"),
        ({"inner_rule": "sgd_hd", "hypergrad_lr": 0.0}, r"Invalid hypergrad_lr value: 0.0; expected a finite number > 0"),
        ({"inner_rule": "adam_hd", "rates": "step_tensor"}, r"'step_tensor' needs inner_rule='sgd'"),
        ({"algorithm": "reptile"}, r"use rates='fixed'"),
        ({"algorithm": "reptile", "rates": "fixed", "learn_init": False}, r"Reptile learns the initial weights"),
        ({"learn_init": False, "rates": "fixed"}, r"Nothing to learn"),
    ],
)  # fmt: skip
def test_config_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetaConfig(**options)


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = MetaConfig(inner_rule="adam_hd", rates="tensor", inner_steps=3)
    assert MetaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown MetaConfig option\(s\): inner_lr_decay"):
        MetaConfig.from_dict({"inner_lr_decay": 0.5})


def _learner() -> MetaLearner:
    return MetaLearner(
        mlp((2, 4, 1), dtype=torch.float64), MetaConfig(rates="step_tensor", inner_steps=2)
    )


def test_empty_support_set() -> None:
    learner = _learner()
    batch = random_regression(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"support set is empty"):
        learner.meta_step(
            batch._replace(support_x=batch.support_x[:, :0], support_y=batch.support_y[:, :0])
        )
    with pytest.raises(ValueError, match=r"support set is empty"):
        learner.adapt(
            torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 1, dtype=torch.float64)
        )


def test_mismatched_shapes() -> None:
    learner = _learner()
    batch = random_regression(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"support_x has 3 examples per task but support_y has 2"):
        learner.meta_step(batch._replace(support_y=batch.support_y[:, :2]))
    with pytest.raises(ValueError, match=r"query_y has 1 tasks but support_x has 2"):
        learner.evaluate(batch._replace(query_y=batch.query_y[:1]))
    with pytest.raises(ValueError, match=r"support_x has 3 examples per task but support_y has 4"):
        learner.adapt(batch.support_x[0], torch.zeros(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mse: prediction shape \(3, 1\) != target shape \(3,\)"):
        learner.adapt(batch.support_x[0], batch.support_y[0, :, 0])
    with pytest.raises(ValueError, match=r"support_x must have shape \[tasks, examples, \.\.\.\]"):
        learner.meta_step(TaskBatch(torch.zeros(3), *batch[1:]))


def test_zero_or_too_many_inner_steps() -> None:
    learner = _learner()
    batch = random_regression(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"Invalid inner steps value: 0; expected an integer >= 1"):
        learner.adapt(batch.support_x[0], batch.support_y[0], steps=0)
    with pytest.raises(ValueError, match=r"Invalid inner steps value: 0"):
        learner.evaluate(batch, steps=0)
    with pytest.raises(ValueError, match=r"learned rates for 2 step\(s\); cannot adapt for 3"):
        learner.adapt(batch.support_x[0], batch.support_y[0], steps=3)


def test_unknown_loss_model_or_config_type() -> None:
    with pytest.raises(
        ValueError, match=r"Invalid loss_name: 'hinge'; expected one of 'mse', 'cross_entropy'"
    ):
        MetaLearner(mlp((1, 2, 1)), MetaConfig(), loss_name="hinge")
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        MetaLearner(lambda x: x, MetaConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"config must be a MetaConfig"):
        MetaLearner(mlp((1, 2, 1)), {"rates": "element"})  # type: ignore[arg-type]
    frozen = mlp((1, 2, 1)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters that require grad"):
        MetaLearner(frozen, MetaConfig())


def test_facade_refuses_steps_past_the_learned_table() -> None:
    wrapped = MetaLR(
        mlp((1, 4, 1), dtype=torch.float64), MetaConfig(rates="step_tensor", inner_steps=1)
    )
    learner = wrapped.clone()
    x = torch.randn(5, 1, dtype=torch.float64)
    learner.adapt(learner(x).pow(2).mean())
    with pytest.raises(ValueError, match=r"learned 1 inner step\(s\); there is no rate for step 1"):
        learner.adapt(learner(x).pow(2).mean())
