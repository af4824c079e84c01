"""The README's meta-learning snippet runs as printed (with a shorter meta-training run) and
builds exactly the configuration behind the README's sinusoid table
(``configs/sinusoid_sgd_hd.yaml``, 10-shot): a README edit that breaks it fails here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from metalr.meta.run_config import load_config
from metalr.meta.runner import _sources, build_model, fixed_tasks

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Meta-learned rates, handed to the optimizer"
CONFIG = ROOT / "configs" / "sinusoid_sgd_hd.yaml"


def readme_snippet(section: str = SECTION, index: int = 0) -> str:
    """The ``index``-th (from 0) ```python block after the ``section`` heading of README.md."""
    text = (ROOT / "README.md").read_text()
    assert section in text, f"README.md lost its section {section!r}"
    blocks = re.findall(r"```python\n(.*?)```", text[text.index(section) :], re.DOTALL)
    assert len(blocks) > index, f"no python block {index} in README section {section!r}"
    return blocks[index]


@pytest.fixture(scope="module")
def snippet_run(tmp_path_factory) -> tuple[str, dict]:
    code = readme_snippet()
    full_run = "num_iterations=2000"
    assert code.count(full_run) == 1, "the snippet must meta-train with num_iterations=2000"
    short = code.replace(full_run, "num_iterations=3")
    cwd = Path.cwd()
    workdir = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "__readme__"}
    threads = torch.get_num_threads()
    try:
        os.chdir(workdir)  # the snippet saves prior.safetensors in the working directory
        exec(compile(short, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return str(workdir), namespace


def test_snippet_runs_and_defines_everything_it_uses(snippet_run) -> None:
    workdir, ns = snippet_run
    for name in ("model", "new_model", "learner", "prior", "optimizer"):
        assert name in ns, name
    assert ns["learner"].step_count == 3
    assert (Path(workdir) / "prior.safetensors").exists() or (Path(workdir) / "prior.pt").exists()
    loss = torch.nn.functional.mse_loss(ns["new_model"](ns["query_x"]), ns["query_y"])
    assert torch.isfinite(loss)


def test_snippet_is_the_configuration_behind_the_table(snippet_run) -> None:
    """Same MetaConfig, network (and its initial weights), shots, test set and iteration count
    as ``metalr meta-train --config configs/sinusoid_sgd_hd.yaml task.k_shot=10``."""
    _, ns = snippet_run
    cfg = load_config(CONFIG, ["task.k_shot=10"])
    assert ns["learner"].config.to_dict() == cfg.meta.to_dict()
    assert cfg.meta.inner_steps == 2 and cfg.meta.meta_lr == pytest.approx(1e-2)
    reference = build_model(cfg).state_dict()
    ours = ns["model"].state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    code = readme_snippet()
    assert f"num_iterations={cfg.train.iterations}" in code
    assert f"k_shot={cfg.task.k_shot}" in code and cfg.task.k_query is None
    assert (
        f"fixed_test_set(num_tasks={cfg.eval.num_tasks}, k_query={cfg.eval.k_query}, "
        f"seed={cfg.eval.seed})" in code
    )
    assert ns["learner"].loss_name == "mse"
    # the snippet's test set is the one the table was scored on
    (table_tasks,) = fixed_tasks(_sources(cfg, cfg.eval.k_query)["test"], cfg.eval.num_tasks,
                                 cfg.eval.seed, cfg.eval.chunk)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ns["test"], table_tasks))


def test_install_section_names_every_optional_dependency() -> None:
    """Each ``pip install -e ".[extra]"`` line's comment names the packages that extra adds."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    text = (ROOT / "README.md").read_text()
    install = text[text.index("## Install") :]
    install = install[: install.index("```", install.index("```") + 3)]
    for extra, requirements in extras.items():
        if extra in ("test", "dev"):
            continue
        lines = [ln for ln in install.splitlines() if f'".[{extra}]"' in ln]
        assert len(lines) == 1, extra
        comment = lines[0].split("#", 1)[1].lower()
        for requirement in requirements:
            name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0].lower()
            assert name in comment, f"README's [{extra}] install line does not mention {name}"


def test_observe_validation_snippet_runs_and_moves_the_rates() -> None:
    """README's observe_validation loop, on a tiny classifier (its names supplied here)."""
    from metalr.optim._base import VALIDATION_KEY

    code = readme_snippet("## Rates that watch the validation loss")
    opt, model = _run_validation_snippet(code)
    counts = {float(opt.state[p][VALIDATION_KEY][2]) for p in model.parameters()}
    assert counts == {1.0}  # 32 training steps: one observation (step 20) with a last direction
    validation = opt.param_groups[0]["validation"]  # the recommended option: the ray, T = 32
    assert validation["ray_steps"] == 32 and validation["ray_clock"] == 1.0


def test_validation_pass_snippet_observes_the_whole_set_alone(monkeypatch) -> None:
    """README's second loop: the whole validation set's mean loss, observed alone at step 20."""
    import torch.nn.functional as F

    import metalr
    from metalr.functional._validation_state import LOSS_AVG, LOSS_COUNT, VAL_COUNT
    from metalr.optim._base import VALIDATION_KEY

    code = readme_snippet("## Rates that watch the validation loss", index=1)
    seen = []
    observe = metalr.AdamHD.observe_validation

    def spy(self, loss, **kwargs):
        model, (xv, yv) = self._spy_model, self._spy_val
        with torch.no_grad():
            seen.append((float(loss), float(F.cross_entropy(model(xv), yv))))
        return observe(self, loss, **kwargs)

    monkeypatch.setattr(metalr.AdamHD, "observe_validation", spy)
    opt, model = _run_validation_snippet(code, spy=True)
    stats = [opt.state[p][VALIDATION_KEY] for p in model.parameters()]
    assert {(float(s[VAL_COUNT]), float(s[LOSS_COUNT])) for s in stats} == {(0.0, 1.0)}
    ((observed, whole_set),) = seen
    assert observed == pytest.approx(whole_set, rel=1e-6)  # the whole set's mean, at step 20
    assert all(float(s[LOSS_AVG]) == pytest.approx(observed, rel=1e-6) for s in stats)


def _run_validation_snippet(code: str, spy: bool = False):
    """Run a README validation loop on a tiny classifier (its names supplied here; ``spy``: the
    optimizer class is given the model and the validation set, for a spy on it)."""
    import itertools

    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import metalr

    torch.manual_seed(0)
    x, y = torch.randn(160, 5), torch.randint(0, 3, (160,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    namespace = {"torch": torch, "F": F, "itertools": itertools, "metalr": metalr, "model": model,
                 "train_loader": DataLoader(TensorDataset(x[:128], y[:128]), batch_size=4),
                 "val_loader": DataLoader(TensorDataset(x[128:], y[128:]), batch_size=8)}  # fmt: skip
    if spy:
        metalr.AdamHD._spy_model, metalr.AdamHD._spy_val = model, (x[128:], y[128:])
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    finally:
        if spy:
            del metalr.AdamHD._spy_model, metalr.AdamHD._spy_val
    return namespace["optimizer"], model


def test_ray_ceiling_snippet_keeps_the_anchor_and_observes_the_whole_set() -> None:
    """README's ray-ceiling loop: the anchor is the weights before the first step, and the one
    observation (step 20 of 32) reads the ray; past 0.1 T it can no longer act."""
    from metalr.functional._ray import DONE, STREAK
    from metalr.optim._state_keys import RAY_ANCHOR_KEY, RAY_KEY

    code = readme_snippet("## Rates that watch the validation loss", index=2)
    assert '"ray_steps"' in code
    torch.manual_seed(0)  # the draws of _run_validation_snippet before its model
    torch.randn(160, 5), torch.randint(0, 3, (160,))
    start = [p.detach().clone() for p in torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).parameters()]  # fmt: skip
    opt, model = _run_validation_snippet(code)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(opt.state[p][RAY_ANCHOR_KEY], s)
        assert float(opt.state[p][RAY_KEY][DONE]) == 0.0
        assert float(opt.state[p][RAY_KEY][STREAK]) in (0.0, 1.0)  # the one look was read
    assert opt.param_groups[0]["validation"]["ray_steps"] == 32
