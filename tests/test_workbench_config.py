"""Study configs: type checks, unknown keys named, optimizer specs validated, the default study."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalr.workbench import default_study, load_study, resolve_study
from metalr.workbench.config import default_study_text
from metalr.workbench.runner import expand, resolve_device

ROOT = Path(__file__).resolve().parents[1]
RAW = {"tasks": ["digits_mlp"], "lrs": [0.1], "seeds": [0],
       "optimizers": {"adam": {"kind": "adam"}}, "smoke": {"steps": 7}}  # fmt: skip


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("stepz=3", "Unknown config key stepz"),
        ("steps=abc", "Invalid value for steps"),
        ("steps=0", "Invalid value for steps"),
        ("lrs=[0.1, -1]", "Invalid value for lrs"),
        ("tasks=[cifar]", "Invalid value for tasks: 'cifar'"),
        ("size=huge", "Invalid value for size"),
        ("device=tpu", "Invalid value for device"),
        ("optimizers.adam.betaz=[0.9, 0.99]", "unexpected keyword argument 'betaz'"),
        ("optimizers.nope.lr=1", "no optimizer named 'nope'"),
        ("optimizers.x={kind: lion}", "Invalid value for optimizers.x.kind: 'lion'"),
        ("optimizers.x={kind: adam, schedule: warp}", "Unknown schedule 'warp'"),
        ("optimizers.x={kind: adam, schedule: cosine, schedule_args: {foo: 1}}", "foo"),
        ("optimizers.x={kind: hyperlr, base: lbfgs}", "Invalid base for hyperlr"),
        ("optimizers.x={kind: tuned_adam, search: annealing}", "optimizers.x.search"),
        ("workers=two", "Invalid value for workers"),
        ("executor=dask", "Invalid value for executor: 'dask'; expected local or ray"),
        ("ray_address=[1]", "Invalid value for ray_address"),
        ("tensorboard=maybe", "Invalid value for tensorboard"),
    ],
)
def test_invalid_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        resolve_study(RAW, [override])


def test_overrides_and_smoke_apply():
    cfg = resolve_study(RAW, ["seeds=[1, 2]", "optimizers.adam.betas=[0.8, 0.9]",
                              "optimizers.hd={kind: adam_hd, granularity: element}"])  # fmt: skip
    assert cfg.seeds == [1, 2] and cfg.optimizers["adam"]["betas"] == [0.8, 0.9]
    assert cfg.optimizers["hd"]["granularity"] == "element" and cfg.steps == 300
    assert resolve_study(RAW, ["smoke=true"]).steps == 7
    assert resolve_study(RAW, ["steps=9"], smoke=True).steps == 9  # overrides after smoke
    assert len(expand(cfg)) == 4
    ray = resolve_study(RAW, ["executor=ray", "workers=2", "ray_address=auto", "tensorboard=true"])
    assert (ray.executor, ray.workers, ray.ray_address, ray.tensorboard) == ("ray", 2, "auto", True)
    assert [c["id"] for c in expand(ray)] == [c["id"] for c in expand(resolve_study(RAW))]


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("tasks: [digits_mlp]\nlearning_rates: [0.1]\n")
    with pytest.raises(ValueError, match="Unknown config key learning_rates"):
        load_study(path)


def test_embedded_default_study_is_the_config_file():
    assert default_study_text() == (ROOT / "configs" / "ablate_default.yaml").read_text()
    cfg = default_study()
    assert cfg.name == "ablate_default" and len(cfg.lrs) >= 5 and len(cfg.seeds) >= 2
    assert {s["kind"] for s in cfg.optimizers.values()} == {"adam", "adam_hd", "sgd", "sgd_hd"}
    assert load_study(ROOT / "configs" / "ablate_default.yaml").to_dict() == cfg.to_dict()


def test_every_shipped_study_config_loads():
    for path in sorted((ROOT / "configs").glob("ablate_*.yaml")):
        load_study(path)
        load_study(path, smoke=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_an_error():
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_task_steps_give_each_task_its_own_budget():
    raw = {**RAW, "tasks": ["digits_mlp", "digits_logreg"], "steps": 40}
    cfg = resolve_study(raw, ["task_steps.digits_logreg=7"])
    assert cfg.task_steps == {"digits_logreg": 7}
    steps = {c["task"]: c["steps"] for c in expand(cfg)}
    assert steps == {"digits_mlp": 40, "digits_logreg": 7}
    cfg = resolve_study({**raw, "task_steps": {"digits_mlp": 9}})
    assert {c["task"]: c["steps"] for c in expand(cfg)} == {"digits_mlp": 9, "digits_logreg": 40}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("task_steps.mnist1d_mlp=5", "Invalid key of task_steps: 'mnist1d_mlp'"),
        ("task_steps.digits_mlp=0", r"Invalid value for task_steps.digits_mlp: 0"),
        ("task_steps.digits_mlp=many", r"Invalid value for task_steps.digits_mlp: 'many'"),
        ("task_steps=[1, 2]", "Invalid value for task_steps"),
    ],
)
def test_task_steps_errors_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        resolve_study(RAW, [override])
