"""The validation-observing callbacks of the integrations, on tiny CPU models.

* Lightning ``ObserveValidation``: a fit with the callback (every 2 steps, batches drawn in turn
  from the trainer's validation dataloader, restarted when it runs out) gives the weights, rates
  and validation statistics of a hand-written loop that calls ``observe_validation`` at the same
  steps with the same batches; the loss is computed in eval mode (the model has BatchNorm, whose
  running statistics validation batches must not touch) and every module's mode comes back;
  ``.grad`` is untouched and Lightning's validation loop logs what the final weights give.
* transformers ``ObserveValidationCallback``: at each observed step the optimizer's new state
  equals a copy of the model and optimizer (taken before the callback ran) observing the expected
  eval batch by hand; the Trainer's own evaluation is unaffected.

Each framework is skipped when it is not installed (``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.integrations import unwrap_optimizer
from metalr.optim._base import RATE_KEY, VALIDATION_KEY

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


def _state(opt, key: str) -> list[torch.Tensor]:
    opt = unwrap_optimizer(opt)
    return [opt.state[p][key].clone() for g in opt.param_groups for p in g["params"]]


def _counts(opt) -> set[int]:
    """The observation counts of the parameters that have validation statistics."""
    opt = unwrap_optimizer(opt)
    return {int(s[VALIDATION_KEY][2]) for s in opt.state.values() if VALIDATION_KEY in s}


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
    assert _counts(opt) == {5}
    ref_module, ref_opt = _manual_run(L, rule, every=2)
    assert _counts(ref_opt) == {5}
    for key in (RATE_KEY, VALIDATION_KEY):
        for a, b in zip(_state(opt, key), _state(ref_opt, key), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    for name, tensor in ref_module.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(module.state_dict()[name], tensor, rtol=1e-6, atol=1e-7)
    # The observations changed the training: without them the rates differ.
    _, plain = _manual_run(L, rule, every=2, observe=False)
    assert any(
        not torch.allclose(a, b) for a, b in zip(_state(opt, RATE_KEY), _state(plain, RATE_KEY))
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
    assert _counts(trainer.optimizers[0]) == {steps}
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
def _transformers():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    return transformers


class _TokenData(torch.utils.data.Dataset):
    """Sequences of a repeating pattern (next token = current + stride mod V)."""

    def __init__(self, n: int, seed: int, stride: int = 1, length: int = 12, vocab: int = 32):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_hf_observe_validation_callback(tmp_path) -> None:
    transformers = _transformers()
    from metalr.integrations.huggingface import add_observe_validation_callback

    model = _gpt2(transformers)
    opt = metalr.AdamWHD(model.parameters(), lr=3e-3, rule="normalized")
    eval_data = _TokenData(16, seed=1, stride=2)  # 2 eval batches of 8
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, logging_steps=6, report_to=[], save_strategy="no",
        eval_strategy="steps", eval_steps=12, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    snapshots: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
    checked: list[int] = []

    class Before(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = unwrap_optimizer(optimizer)
            self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            self.observed = _counts(inner)
            if state.global_step % 4 == 0:
                snapshots[state.global_step] = copy.deepcopy((model, inner))

    class After(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = unwrap_optimizer(optimizer)
            assert model.training  # back in training mode
            for a, p in zip(before.grads, model.parameters(), strict=True):  # .grad untouched
                assert (a is None and p.grad is None) or torch.equal(a, p.grad)
            if state.global_step % 4:
                assert _counts(inner) == before.observed  # no observation at this step
                return
            ref_model, ref_opt = snapshots[state.global_step]
            i = state.global_step // 4 - 1  # eval batches in turn: 0, 1, 0
            batch = {k: torch.stack([eval_data[j][k] for j in range(8 * (i % 2), 8 * (i % 2) + 8)])
                     for k in ("input_ids", "labels")}  # fmt: skip
            ref_model.eval()  # dropout off
            rates_before = _state(ref_opt, RATE_KEY)
            ref_opt.observe_validation(ref_model(**batch).loss)
            for key in (RATE_KEY, VALIDATION_KEY):
                for a, b in zip(_state(inner, key), _state(ref_opt, key), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=key)
            # The rates moved: the observation was not a no-op.
            assert any(not torch.equal(a, b) for a, b in zip(_state(inner, RATE_KEY), rates_before))
            checked.append(state.global_step)

    before = Before()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(64, seed=0), eval_dataset=eval_data,
        optimizers=(opt, None), callbacks=[before],
    )  # fmt: skip
    callback = add_observe_validation_callback(trainer, every_n_steps=4)
    trainer.add_callback(After())
    trainer.train()
    assert trainer.optimizer is not opt and unwrap_optimizer(trainer.optimizer) is opt
    assert checked == [4, 8, 12] and callback.observations == 3 and _counts(opt) == {3}
    # The Trainer's evaluation at step 12 (after the observation there) is that of the final
    # weights, as a Trainer without the callback evaluates them.
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [12]
    fresh = transformers.Trainer(model=model, args=args, eval_dataset=eval_data)
    assert evals[0]["eval_loss"] == pytest.approx(fresh.evaluate()["eval_loss"], rel=1e-6)


def test_hf_observe_validation_errors(tmp_path) -> None:
    transformers = _transformers()
    from metalr.integrations.huggingface import add_observe_validation_callback

    model = _gpt2(transformers)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(8, seed=0),
        eval_dataset=_TokenData(8, seed=1), optimizers=(plain, None),
    )  # fmt: skip
    add_observe_validation_callback(trainer, every_n_steps=1)
    with pytest.raises(TypeError, match="needs a metalr optimizer.*AdamW"):
        trainer.train()
    no_eval = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(8, seed=0),
        optimizers=(metalr.AdamWHD(model.parameters(), lr=1e-3), None),
    )  # fmt: skip
    add_observe_validation_callback(no_eval, every_n_steps=1)
    with pytest.raises(ValueError, match="needs validation data"):
        no_eval.train()
    from metalr.functional.validation import RECOMMENDED_EVERY

    assert add_observe_validation_callback(trainer).every_n_steps == RECOMMENDED_EVERY == 20


def test_hf_observe_validation_with_a_dict_of_eval_datasets(tmp_path) -> None:
    """The Trainer evaluates a dict of datasets by name; the callback draws from its first one
    by default, or the one named by ``eval_dataset="name"`` (a loader of the dict itself indexed
    it by position: KeyError 0); a name the dict lacks is refused before training."""
    transformers = _transformers()
    from metalr.integrations.huggingface import add_observe_validation_callback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    sets = {"a": _TokenData(8, seed=1), "b": _TokenData(8, seed=2)}
    rates = {}
    for chosen in (None, "a", "b"):
        model = _gpt2(transformers)
        opt = metalr.AdamWHD(model.parameters(), lr=3e-3, rule="normalized")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenData(32, seed=0),
                                       eval_dataset=sets, optimizers=(opt, None))  # fmt: skip
        callback = add_observe_validation_callback(trainer, every_n_steps=2, eval_dataset=chosen)
        trainer.train()
        assert callback.observations == 2
        rates[chosen] = _state(opt, RATE_KEY)
    assert all(torch.equal(x, y) for x, y in zip(rates[None], rates["a"]))  # the first set
    assert any(not torch.equal(x, y) for x, y in zip(rates["a"], rates["b"]))
    model = _gpt2(transformers)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(32, seed=0), eval_dataset=sets,
        optimizers=(metalr.AdamWHD(model.parameters(), lr=3e-3), None),
    )  # fmt: skip
    add_observe_validation_callback(trainer, every_n_steps=2, eval_dataset="c")
    with pytest.raises(ValueError, match="eval_dataset='c' names no dataset"):
        trainer.train()


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


def test_hf_observe_validation_resumes_where_the_uninterrupted_run_is(tmp_path) -> None:
    """``train(resume_from_checkpoint=...)``: the callback counts the observations made before the
    checkpoint and skips the validation batches they drew, so the resumed run equals the
    uninterrupted one bit for bit (with three validation batches and an observation every 2
    steps, a checkpoint at step 4 falls mid-cycle; the batches restarted at the first before)."""
    transformers = _transformers()
    from metalr.integrations.huggingface import add_observe_validation_callback

    def run(resume: str | None = None):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)  # no dropout: the RNG plays no part
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
            per_device_eval_batch_size=8, report_to=[], save_strategy="steps", save_steps=4,
            use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        opt = metalr.AdamWHD(model.parameters(), lr=3e-3, rule="normalized")
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_TokenData(96, seed=0),
            eval_dataset=_TokenData(24, seed=1), optimizers=(opt, None),  # 3 eval batches
        )  # fmt: skip
        callback = add_observe_validation_callback(trainer, every_n_steps=2)
        trainer.train(resume_from_checkpoint=resume)
        return model, opt, callback

    model, opt, callback = run()
    resumed_model, resumed_opt, resumed = run(str(tmp_path / "checkpoint-4"))
    assert callback.observations == resumed.observations == 4
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_state(opt, RATE_KEY), _state(resumed_opt, RATE_KEY), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _loss_stats(opt) -> set[tuple[float, float]]:
    """Per tensor: (losses counted, the loss's running average) of the validation statistics."""
    from metalr.functional._validation_state import LOSS_AVG, LOSS_COUNT

    return {(float(v[LOSS_COUNT]), float(v[LOSS_AVG])) for v in _state(opt, VALIDATION_KEY)}


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
    stats = _loss_stats(opt)
    assert len(stats) == 1
    count, got = next(iter(stats))
    assert count == len(logged) and got == pytest.approx(avg, rel=1e-6)
    assert _counts(opt) == {0}  # no validation gradient was taken
    assert float(callback.last_loss) == pytest.approx(logged[-1], rel=1e-6)
    trainer.validate(module, val)  # a validate() outside fit is not observed
    assert callback.observations == len(logged)
    with pytest.raises(ValueError, match=r"no metric 'nope' was logged .*'val_loss'"):
        L.seed_everything(0, verbose=False)
        _trainer(L, tmp_path, callbacks=[ObserveValidationLoss("nope")]).fit(
            _module(L, "seek"), *_loaders()
        )


def test_hf_observe_eval_loss_callback(tmp_path) -> None:
    """Each evaluation's ``eval_loss`` during training is observed alone; the evaluation after
    training is not."""
    transformers = _transformers()
    from metalr.integrations.huggingface import ObserveEvalLossCallback

    model = _gpt2(transformers)
    opt = metalr.AdamWHD(model.parameters(), lr=3e-3, validation={"loss_decay": 0.0})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, logging_steps=6, report_to=[], save_strategy="no",
        eval_strategy="steps", eval_steps=4, use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = ObserveEvalLossCallback()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(64, seed=0),
        eval_dataset=_TokenData(16, seed=1, stride=2), optimizers=(opt, None),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == callback.observations == 3
    ((count, last),) = _loss_stats(opt)
    assert count == 3 and last == pytest.approx(evals[-1], rel=1e-6)  # loss_decay 0: the last
    assert _counts(opt) == {0}
    trainer.evaluate()
    assert callback.observations == 3
    bad = ObserveEvalLossCallback("eval_accuracy")
    with pytest.raises(ValueError, match=r"no metric 'eval_accuracy' was logged .*'eval_loss'"):
        bad.on_train_begin(args, trainer.state, None, optimizer=opt)
        bad.on_evaluate(args, trainer.state, None, metrics={"eval_loss": 1.0}, optimizer=opt)
