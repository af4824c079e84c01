"""The workbench's validation stream: observe_validation, ReduceLROnPlateau and early stopping
spend the same draws; spec errors name the key."""

from __future__ import annotations

import pytest
import torch

import metalr
from metalr.optim._base import VALIDATION_KEY
from metalr.workbench import optimizers as O
from metalr.workbench.runner import train
from metalr.workbench.tasks import Task, make_task
from metalr.workbench.validation import ValidationWatcher, build_watcher


def _scripted_task(values: list[float], n_val: int = 40, batch: int = 8) -> Task:
    """A task whose loss is the next scripted value (the model's output only sets the graph)."""
    script = iter(values)
    x, y = torch.randn(n_val, 3), torch.randn(n_val, 1)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out.sum() * 0 + next(script)

    return Task("scripted", "smoke", lambda: torch.nn.Linear(3, 1), (x, y), (x, y), (x, y),
                batch_size=batch, loss=loss)  # fmt: skip


def test_check_is_a_pass_over_a_small_split_at_most_four_draws():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    spec = {"kind": "adam", "validation_data": {"every": 2}, "plateau": {}}
    small = ValidationWatcher(spec, _scripted_task([], n_val=20, batch=8), 0, opt, model, False)
    assert (small.batch, small.per_check) == (8, 3)  # ceil(20 / 8)
    big = ValidationWatcher(spec, _scripted_task([], n_val=400, batch=8), 0, opt, model, False)
    assert big.per_check == 4
    spec["validation_data"] = {"every": 2, "batch": 64, "check": 2}
    given = ValidationWatcher(spec, _scripted_task([], n_val=400, batch=8), 0, opt, model, False)
    assert (given.batch, given.per_check) == (64, 2)


def test_plateau_steps_on_the_mean_of_each_check():
    values = [1.0, 1.0] * 2 + [2.0, 2.0] * 10  # improves once, then never again
    task = _scripted_task(values, n_val=16, batch=8)  # a check = 2 draws
    model = task.model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {"kind": "sgd", "validation_data": {"every": 1}, "plateau": {"patience": 2}}
    watcher = build_watcher(spec, task, 0, opt, model)
    lrs = []
    for step in range(1, 17):
        watcher.after_step(step)
        lrs.append(opt.param_groups[0]["lr"])
    # checks at steps 2, 4 (1.0, 1.0: the first is the best), 6, 8, 10 (2.0): the third bad check
    # in a row (patience 2) cuts the lr at step 8
    assert lrs[:7] == [0.1] * 7 and lrs[7] == pytest.approx(0.01)
    assert watcher.finish()["validation_draws"] == 16


def test_early_stopping_stops_and_restores_the_best_checks_weights():
    values = [3.0, 1.0, 2.0, 2.5, 2.6, 9.0, 9.0]
    task = _scripted_task(values, n_val=8, batch=8)  # a check = 1 draw
    model = task.model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = {"kind": "sgd", "validation_data": {"every": 1}, "early_stopping": {"patience": 3}}
    watcher = build_watcher(spec, task, 0, opt, model)
    weights = []
    for step in range(1, 8):
        with torch.no_grad():
            model.weight.fill_(float(step))  # a different model at every check
        weights.append(model.weight.clone())
        if watcher.after_step(step):
            break
    assert step == 5  # checks 3, 4, 5 did not improve on check 2
    info = watcher.finish()
    assert info["early_stopping_restored"] is True
    assert torch.equal(model.weight, weights[1])


def _train_by_hand(task, model, opt, watcher, steps: int) -> None:
    """The runner's loop, by hand: a training step, then the watcher's turn."""
    batches = task.batches(0)
    for step in range(1, steps + 1):
        x, y = batches()
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
        watcher.after_step(step)


def test_metalr_optimizers_observe_every_draw():
    task = make_task("digits_logreg", "smoke")
    spec = {"kind": "adam_hd", "validation_data": {"every": 3}}
    out = train(task, spec, 1e-3, 0, 10, 5, 1e3, "cpu")
    assert out["validation_stream"]["validation_draws"] == 3
    # the runner's optimizer is internal: rerun the same steps by hand and compare the count
    model = task.model(0)
    opt = O.build_for_model(spec, model, 1e-3, task)
    watcher = build_watcher(spec, task, 0, opt, model)
    _train_by_hand(task, model, opt, watcher, 10)
    assert isinstance(opt, metalr.AdamHD)
    counts = {float(opt.state[p][VALIDATION_KEY][2]) for p in model.parameters()}
    assert counts == {3.0}
    assert out["final_val_loss"] == pytest.approx(task.evaluate(model, "val", 0), rel=1e-6)


def test_a_pass_observed_alone_feeds_the_whole_split_without_grad(monkeypatch):
    """``batch: all`` draws the whole validation split each time; ``gradient: false`` observes
    its loss alone (``hypergradient=False``), computed without autograd."""
    task = make_task("digits_logreg", "smoke")
    spec = {"kind": "adam_hd", "validation_data": {"every": 3, "batch": "all", "gradient": False},
            "validation": {"loss_decay": 0.0, "rewind": 1.0}}  # fmt: skip
    model = task.model(0)
    opt = O.build_for_model(spec, model, 1e-3, task)
    watcher = build_watcher(spec, task, 0, opt, model)
    assert watcher.batch == len(task.splits(0)[1][0])
    seen = []
    observe = opt.observe_validation

    def spy(loss, **kwargs):
        seen.append((loss.requires_grad, torch.is_grad_enabled(), kwargs))
        return observe(loss, **kwargs)

    monkeypatch.setattr(opt, "observe_validation", spy)
    _train_by_hand(task, model, opt, watcher, 9)
    assert seen == [(False, True, {"hypergradient": False})] * 3
    stats = {tuple(opt.state[p][VALIDATION_KEY][[2, 3, 6]].tolist()) for p in model.parameters()}
    full = task.evaluate(model, "val", 0)  # the last observation was the whole split's loss
    assert len(stats) == 1
    count, last, losses = next(iter(stats))
    assert count == 0 and losses == 3  # no signal observed; three losses
    assert last == pytest.approx(full, rel=1e-5)  # loss_decay 0: the last pass itself
    out = train(task, spec, 1e-3, 0, 9, 3, 1e3, "cpu")
    assert out["validation_stream"]["validation_examples"] == 3 * watcher.batch


def test_early_stopped_run_reports_the_restored_weights():
    task = make_task("digits_logreg", "smoke")
    spec = {"kind": "adam", "validation_data": {"every": 1, "check": 1},
            "early_stopping": {"patience": 1}}  # fmt: skip
    out = train(task, spec, 50.0, 0, 200, 5, 1e9, "cpu")  # a rate so large val soon worsens
    assert out["status"] == "stopped early" and out["steps_done"] < 200
    assert out["validation_stream"]["early_stopping_restored"] is True
    assert out["final_val_loss"] <= min(out["curves"]["val_loss"][1:]) + 1e-6


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "adam", "plateau": {}}, "plateau needs validation_data"),
        ({"kind": "adam", "validation_data": {"every": 5}}, "does not use it"),
        ({"kind": "adam_hd", "validation_data": {"every": 0}}, r"validation_data.every: 0"),
        ({"kind": "adam_hd", "validation_data": {"often": 5}}, "expected a mapping with keys"),
        ({"kind": "adam_hd", "validation_data": {"gradient": 0}}, r"gradient: 0; expected true"),
        ({"kind": "adam_hd", "validation_data": {"batch": "half"}}, r"batch: 'half'"),
        ({"kind": "adam", "validation_data": {}, "plateau": {"factor": 2}}, r"plateau.factor"),
        (
            {"kind": "adam", "validation_data": {}, "plateau": {}, "schedule": "cosine"},
            "plateau replaces schedule",
        ),
    ],
)
def test_spec_errors_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        O.check_spec("x", spec)
