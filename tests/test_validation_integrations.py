"""The validation-observing callbacks of the integrations, on tiny CPU models.

* Lightning ``ObserveValidation``: a fit with the callback (every 2 steps, batches drawn in turn
  from the trainer's validation dataloader, restarted when it runs out) gives the weights, rates
  and validation statistics of a hand-written loop that calls ``observe_validation`` at the same
  steps with the same batches; the loss is computed in eval mode (the model has BatchNorm, whose
  running statistics validation batches must not touch) and every module's mode comes back;
  ``.grad`` is untouched and Lightning's validation loop logs what the final weights give.

(The transformers callbacks: ``test_validation_integrations_hf.py``.)

Lightning is skipped when it is not installed (``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import pytest
import torch
from _integration_checks import loss_statistics, observation_counts, state_copies
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.integrations import unwrap_optimizer
from metalr.optim._base import RATE_KEY, VALIDATION_KEY

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


def test_batch_cycle_restarts_and_resumes() -> None:
    """Batches in turn, the next pass after the last; a resumed cycle continues where ``n``
    draws had left off (loading only ``n % len`` batches when the data has a length)."""
    from metalr.integrations._observe import BatchCycle

    loads: list[int] = []

    class Data:
        def __init__(self, sized: bool) -> None:
            self.sized = sized

        def __iter__(self):
            for i in range(3):
                loads.append(i)
                yield i

        def __len__(self) -> int:
            if not self.sized:
                raise TypeError("no length")
            return 3

    for sized, expected_loads in ((True, [0, 1, 2, 0]), (False, [0, 1, 2] * 3 + [0])):
        data = Data(sized)
        cycle = BatchCycle(lambda data=data: data)
        assert [cycle.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
        loads.clear()
        resumed = BatchCycle(lambda data=data: data)
        resumed.skip(7)
        assert [resumed.next() for _ in range(3)] == [1, 2, 0] and resumed.drawn == 10
        assert loads == expected_loads
    with pytest.raises(ValueError, match="no batch"):
        BatchCycle(list).next()


# ----------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="needs lightning")


def _regression_data(n: int, seed: int, shift: float = 0.0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x.sum(-1, keepdim=True)) + shift * x[:, :1])


def _loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    train = torch.utils.data.DataLoader(_regression_data(40, 1), batch_size=8)  # 5 batches
    val = torch.utils.data.DataLoader(_regression_data(24, 2, shift=0.5), batch_size=8)  # 3
    return train, val


def _module(L, rule: str, optimizer: str = "metalr", with_validation_step: bool = True):
    class ValRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
            self.loss_modes: list[bool] = []  # self.training at each validation_loss call
            self.transfer_stages: list[str] = []  # the trainer's stage at each batch transfer

        def on_after_batch_transfer(self, batch, dataloader_idx):
            self.transfer_stages.append(self.trainer.state.stage.value)
            return batch

        def validation_loss(self, batch):
            self.loss_modes.append(self.training)
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        if with_validation_step:  # without it Lightning sets up no validation loop at all

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_loss", F.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            if optimizer == "torch":
                return torch.optim.Adam(self.parameters(), lr=1e-2)
            seek = {"init_scale": 0.5, "turn_threshold": 0.99} if rule == "seek" else None
            opt = metalr.AdamHD(self.parameters(), lr=1e-2, rule=rule, seek=seek)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=10)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ValRegression()


def _trainer(L, tmp_path, **kwargs):
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path), "log_every_n_steps": 1, "max_epochs": 2,
    }  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _manual_run(L, rule: str, every: int, observe: bool = True):
    """What ObserveValidation must do, by hand: Lightning's order is step, scheduler, then
    ``on_train_batch_end``; validation batches are taken in turn, restarting after the last."""
    L.seed_everything(0, verbose=False)
    module = _module(L, rule)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    train, val = _loaders()
    val_batches = list(val)
    step = 0
    for _ in range(2):
        for batch_idx, batch in enumerate(train):
            module.train()
            opt.zero_grad()
            module.training_step(batch, batch_idx).backward()
            opt.step()
            sched.step()
            step += 1
            if observe and step % every == 0:
                module.eval()
                opt.observe_validation(module.validation_loss(val_batches[(step // every - 1) % 3]))
                module.train()
    return module, opt


@pytest.mark.parametrize("rule", ["normalized", "seek"])
def test_lightning_observe_validation_matches_manual_loop(tmp_path, rule) -> None:
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    grads: dict[int, list[torch.Tensor | None]] = {}

    class GradsBefore(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads[trainer.global_step] = [p.grad.clone() for p in pl_module.parameters()]

    class GradsAfter(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = [p.grad for p in pl_module.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(grads[trainer.global_step], after))
            assert pl_module.training and all(m.training for m in pl_module.modules())
            assert trainer.training

    L.seed_everything(0, verbose=False)
    module = _module(L, rule)
    callback = ObserveValidation(every_n_steps=2)
    trainer = _trainer(L, tmp_path, callbacks=[GradsBefore(), callback, GradsAfter()])
    train, val = _loaders()
    trainer.fit(module, train, val)

    assert trainer.global_step == 10 and sorted(grads) == list(range(1, 11))
    assert callback.observations == 5 and module.loss_modes == [False] * 5  # eval mode
    # Batch transfers: 10 training batches; 5 observed and 2 x 3 by Lightning's validation loop,
    # all seen by the module's hooks as validation batches.
    stages = module.transfer_stages
    assert (stages.count("train"), stages.count("validate"), len(stages)) == (10, 11, 21)
    opt = unwrap_optimizer(trainer.optimizers[0])
    assert observation_counts(opt) == {5}
    ref_module, ref_opt = _manual_run(L, rule, every=2)
    assert observation_counts(ref_opt) == {5}
    for key in (RATE_KEY, VALIDATION_KEY):
        for a, b in zip(state_copies(opt, key), state_copies(ref_opt, key), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    for name, tensor in ref_module.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)
    # The observations changed the training: without them the rates differ.
    _, plain = _manual_run(L, rule, every=2, observe=False)
    assert any(
        not torch.allclose(a, b)
        for a, b in zip(state_copies(opt, RATE_KEY), state_copies(plain, RATE_KEY))
    )
    # Lightning's validation loop ran at each epoch's end and logged what the final weights give.
    assert set(trainer.callback_metrics) == {"val_loss"}
    module.eval()
    with torch.no_grad():
        expected = torch.stack([F.mse_loss(module.net(x), y) for x, y in val]).mean()
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], expected)


@pytest.mark.parametrize("check_val_every_n_epoch", [1, 5])
def test_lightning_observe_validation_without_validation_step(tmp_path, check_val_every_n_epoch):
    """The class's own example: a module with ``validation_loss`` but no ``validation_step``
    (Lightning then sets up no validation loop, and ``trainer.val_dataloaders`` stays None), or
    one whose validation has not run yet: the callback draws from the loader given to ``fit``,
    as in the manual loop (it crashed ``every_n_steps`` steps into training)."""
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    L.seed_everything(0, verbose=False)
    module = _module(L, "seek", with_validation_step=check_val_every_n_epoch == 1)
    callback = ObserveValidation(every_n_steps=2)
    trainer = _trainer(L, tmp_path, callbacks=[callback],
                       check_val_every_n_epoch=check_val_every_n_epoch)  # fmt: skip
    train, val = _loaders()
    trainer.fit(module, train, val)
    assert callback.observations == 5
    ref_module, _ = _manual_run(L, "seek", every=2)
    for name, tensor in ref_module.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)


def test_lightning_observe_validation_without_any_validation_data_fails_before_training(
    tmp_path,
) -> None:
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    module = _module(L, "seek", with_validation_step=False)
    trainer = _trainer(L, tmp_path, callbacks=[ObserveValidation(every_n_steps=2)])
    train, _ = _loaders()
    with pytest.raises(ValueError, match="found no validation dataloader"):
        trainer.fit(module, train)
    assert trainer.global_step == 0, "refused before the first step"


@pytest.mark.parametrize("own", [False, True], ids=["trainers", "dataloader="])
def test_lightning_observe_validation_with_an_empty_loader_fails_before_training(
    tmp_path, own
) -> None:
    """An empty validation set is refused at the start (it failed at the first observation,
    every_n_steps steps into training)."""
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    empty = torch.utils.data.DataLoader(_regression_data(0, 2), batch_size=8)
    callback = ObserveValidation(every_n_steps=2, dataloader=empty if own else None)
    trainer = _trainer(L, tmp_path, callbacks=[callback])
    train, _ = _loaders()
    with pytest.raises(ValueError, match="validation dataloader has no batches"):
        trainer.fit(_module(L, "seek"), train, None if own else empty)
    assert trainer.global_step == 0, "refused before the first step"


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_lightning_observe_validation_accumulation_and_loss_fn(tmp_path) -> None:
    """Once per optimizer step with gradient accumulation; a loss function and a dataloader of
    one's own (a list of batches); the callback's state goes into checkpoints."""
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    L.seed_everything(0, verbose=False)
    module = _module(L, "normalized")
    seen: list[int] = []

    def loss_fn(pl_module, batch):
        seen.append(len(batch[0]))
        return {"loss": pl_module.validation_loss(batch)}

    batches = [(torch.randn(n, 4), torch.randn(n, 1)) for n in (3, 5)]
    callback = ObserveValidation(every_n_steps=1, loss_fn=loss_fn, dataloader=batches)
    trainer = _trainer(L, tmp_path, accumulate_grad_batches=2, callbacks=[callback])
    train, _ = _loaders()
    trainer.fit(module, train)  # no validation dataloader: not needed with dataloader=
    steps = trainer.global_step
    assert steps == 6  # 5 batches per epoch, accumulated in twos: 3 steps per epoch
    assert callback.observations == steps and seen == [3, 5, 3, 5, 3, 5]
    assert observation_counts(trainer.optimizers[0]) == {steps}
    assert callback.state_dict() == {"last_step": 6, "observations": 6, "batches_drawn": 6}


def test_lightning_observe_validation_errors(tmp_path) -> None:
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    with pytest.raises(ValueError, match="every_n_steps"):
        ObserveValidation(every_n_steps=0)
    # the default is the recommended frequency (study 9: one validation batch every 20 steps)
    from metalr.functional.validation import RECOMMENDED_EVERY

    assert ObserveValidation().every_n_steps == RECOMMENDED_EVERY == 20
    train, val = _loaders()
    with pytest.raises(TypeError, match="needs a metalr optimizer.*Adam"):
        _trainer(L, tmp_path, callbacks=[ObserveValidation()]).fit(
            _module(L, "normalized", optimizer="torch"), train, val
        )
    with pytest.raises(AttributeError, match="no method 'shared_loss'"):
        _trainer(L, tmp_path, callbacks=[ObserveValidation(loss_fn="shared_loss")]).fit(
            _module(L, "normalized"), train, val
        )


# -------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("every", [3, 4])
def test_lightning_observe_validation_cadence_with_two_optimizers(tmp_path, every) -> None:
    """With two optimizers (manual optimization) the optimizer-step count moves by two per batch:
    observations follow every ``every`` optimizer steps whatever its parity (a ``step % k`` test
    saw only the even multiples: k=3 observed every 6 steps)."""
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidation

    class TwoOptimizers(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def validation_loss(self, batch):
            x, y = batch
            return F.mse_loss(self.b(self.a(x)), y)

        def training_step(self, batch, batch_idx):
            for opt in self.optimizers():
                opt.zero_grad()
                self.manual_backward(self.validation_loss(batch))
                opt.step()

        def configure_optimizers(self):
            return [metalr.AdamHD(self.a.parameters(), lr=1e-2),
                    metalr.AdamHD(self.b.parameters(), lr=1e-2)]  # fmt: skip

    train, val = _loaders()  # 5 batches: 10 optimizer steps an epoch
    callback = ObserveValidation(every_n_steps=every, dataloader=val)
    trainer = _trainer(L, tmp_path, callbacks=[callback], max_epochs=3)
    trainer.fit(TwoOptimizers(), train)
    assert trainer.global_step == 30
    assert callback.observations == 30 // every


def test_group_lrs_copies_a_tensor_lr_that_a_scheduler_changes_in_place() -> None:
    """The monitors read ``group['lr']`` before the step and log after it; torch's schedulers
    ``fill_`` a tensor lr in place, so a reference would log the next step's rate."""
    from metalr.integrations import effective_lr_stats, group_lrs

    w = nn.Parameter(torch.randn(4))
    opt = metalr.AdamHD([w], lr=torch.tensor(0.1), hypergrad_lr=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    captured = group_lrs(opt)
    w.sum().backward()
    opt.step()
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    assert float(captured[0]) == pytest.approx(0.1)
    logged = effective_lr_stats(opt, None, lrs=captured)
    assert logged["effective_lr/group0/mean"] == pytest.approx(0.1)


def test_lightning_observe_validation_loss_hands_over_each_validation_run(tmp_path) -> None:
    """The logged ``val_loss`` of each validation run of fit (not the sanity check's) is
    observed alone: counted by the hold, nothing backpropagated, no signal statistics."""
    L = _lightning()
    from metalr.integrations.lightning import ObserveValidationLoss

    L.seed_everything(0, verbose=False)
    module = _module(L, "seek")
    logged: list[float] = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and trainer.state.fn.value == "fit":
                logged.append(float(trainer.callback_metrics["val_loss"]))

    callback = ObserveValidationLoss("val_loss")
    trainer = _trainer(L, tmp_path, num_sanity_val_steps=2, val_check_interval=2,
                       callbacks=[Record(), callback])  # fmt: skip
    train, val = _loaders()
    trainer.fit(module, train, val)
    opt = trainer.optimizers[0]
    assert len(logged) == callback.observations >= 4  # every 2 steps of 10, not the sanity run
    avg = logged[0]
    for value in logged[1:]:  # the hold's running average, loss_decay 0.5
        avg = 0.5 * avg + 0.5 * value
    stats = loss_statistics(opt)
    assert len(stats) == 1
    count, got = next(iter(stats))
    assert count == len(logged) and got == pytest.approx(avg, rel=1e-6)
    assert observation_counts(opt) == {0}  # no validation gradient was taken
    assert float(callback.last_loss) == pytest.approx(logged[-1], rel=1e-6)
    trainer.validate(module, val)  # a validate() outside fit is not observed
    assert callback.observations == len(logged)
    with pytest.raises(ValueError, match=r"no metric 'nope' was logged .*'val_loss'"):
        L.seed_everything(0, verbose=False)
        _trainer(L, tmp_path, callbacks=[ObserveValidationLoss("nope")]).fit(
            _module(L, "seek"), *_loaders()
        )


def test_lightning_ray_ceiling_takes_the_budget_and_the_whole_validation_set(tmp_path) -> None:
    """The documented way to run the ray ceiling under Lightning: the budget from
    ``trainer.estimated_stepping_batches`` in ``configure_optimizers``, the whole validation set
    as one batch in ``ObserveValidation``'s own loader. The anchor is the weights the fit
    started from and every observation read the ray (τ −1: each look reads above it, so the
    rule acts at the second; ``ray_before`` 1: inside the window)."""
    L = _lightning()
    from metalr.functional._ray import DONE, STREAK
    from metalr.integrations.lightning import ObserveValidation
    from metalr.optim._state_keys import RAY_ANCHOR_KEY, RAY_KEY

    class RayRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def validation_loss(self, batch):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self.validation_loss(batch)

        def configure_optimizers(self):
            budget = self.trainer.estimated_stepping_batches
            return metalr.AdamHD(
                self.parameters(),
                lr=1e-2,
                seek={"moment_restart": 0},  # the ray's clock here counts every step (the
                validation={  # step after Adam's moment restart has no direction: one fewer)
                    "ray_steps": budget,
                    "hypergrad_lr": 0.0,
                    "hold": 0,
                    "ray_tau": -1.0,
                    "ray_before": 1.0,
                    "ray_gate": 1,
                },
            )  # fmt: skip (acts at its 2nd look)

    L.seed_everything(0, verbose=False)
    module = RayRegression()
    start = [p.detach().clone() for p in module.parameters()]
    train, val = _loaders()
    whole = torch.utils.data.DataLoader(val.dataset, batch_size=len(val.dataset))
    callback = ObserveValidation(every_n_steps=2, dataloader=whole)
    _trainer(L, tmp_path, callbacks=[callback]).fit(module, train)
    opt = unwrap_optimizer(module.trainer.optimizers[0])
    assert opt.param_groups[0]["validation"]["ray_steps"] == 10 and callback.observations == 5
    for p, s in zip(module.parameters(), start):
        assert torch.equal(opt.state[p][RAY_ANCHOR_KEY], s)
        assert (
            float(opt.state[p][RAY_KEY][DONE]) == 1.0 and float(opt.state[p][RAY_KEY][STREAK]) == 2
        )
