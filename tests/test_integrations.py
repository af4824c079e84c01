"""Trainer and logger integrations, on tiny CPU models: Lightning, transformers' Trainer, TensorBoard.

* Lightning: ``configure_optimizers`` returning a metalr optimizer, alone and with a OneCycleLR in
  the ``lr_scheduler`` dict; checkpoint through the Trainer and resume with ``ckpt_path=`` gives the
  weights and effective rates of an uninterrupted run bit for bit; ``EffectiveLRMonitor`` logs.
* transformers: ``Trainer(optimizers=(opt, scheduler))`` and with the Trainer's own scheduler
  (which rewrites ``group['lr']`` every step): the adaptation survives, effective = lr × multiplier.
* TensorBoard: ``log_effective_lrs`` writes what the event file reads back.

Each framework is skipped when it is not installed (``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metalr
from metalr.integrations import effective_lr_stats, unwrap_optimizer
from metalr.optim._base import RATE_KEY, initial_multiplier

# Lightning 2.6 on torch 2.13 warns about its own use of a deprecated pytree API.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


def multipliers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    opt = unwrap_optimizer(opt)
    return [opt.state[p][RATE_KEY].clone() for g in opt.param_groups for p in g["params"]]


def assert_effective_is_lr_times_multiplier(opt: torch.optim.Optimizer) -> None:
    opt = unwrap_optimizer(opt)
    eff = opt.effective_lrs()
    for group in opt.param_groups:
        for p in group["params"]:
            expected = opt.state[p][RATE_KEY] * group["lr"]
            assert torch.equal(eff[p], expected)


# --------------------------------------------------------------------------------- no framework
def test_integrations_import_no_framework() -> None:
    """``import metalr.integrations`` (and the TensorBoard helper) import no framework."""
    code = (
        "import sys, metalr, metalr.integrations, metalr.integrations.tensorboard\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'tensorboard',"
        " 'torch.utils.tensorboard') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_effective_lr_stats_tags_and_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = metalr.SGDHD(
        [
            {"params": model[0].parameters(), "granularity": "element"},
            {"params": model[1].parameters(), "lr": 0.05},
        ],
        lr=0.1,
        momentum=0.9,
        hypergrad_lr=0.1,
    )
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    stats = effective_lr_stats(opt, model)
    summary = opt.lr_summary()
    for i, s in enumerate(summary):
        for k in ("min", "mean", "max"):
            assert stats[f"effective_lr/group{i}/{k}"] == pytest.approx(s[k], rel=1e-12)
    eff = opt.effective_lrs()
    assert stats["effective_lr/0.weight/max"] == pytest.approx(eff[model[0].weight].max().item())
    assert stats["effective_lr/1.weight"] == pytest.approx(eff[model[1].weight].item())
    unnamed = effective_lr_stats(opt, per_tensor=True, prefix="lr")
    assert "lr/group1.param1" in unnamed
    assert not any("weight" in k for k in effective_lr_stats(opt, model, per_tensor=False))
    # lrs= replaces group['lr'] (e.g. the lr of the step just taken) and leaves it as it was.
    swapped = effective_lr_stats(opt, model, lrs=[0.2, 0.5])
    assert swapped["effective_lr/1.weight"] == pytest.approx(
        opt.state[model[1].weight][RATE_KEY].item() * 0.5, rel=1e-6
    )
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    with pytest.raises(ValueError, match="param groups"):
        effective_lr_stats(opt, lrs=[0.1])
    plain = torch.optim.SGD(model.parameters(), lr=0.3)
    assert effective_lr_stats(plain)["effective_lr/group0/mean"] == pytest.approx(0.3)


# ----------------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="needs lightning")


def _lightning_module(L, scheduler: str | None, granularity: str, total_steps: int):
    class TinyRegression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = metalr.AdamHD(
                self.parameters(), lr=1e-2, hypergrad_lr=0.05, granularity=granularity
            )
            if scheduler is None:
                return opt
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyRegression()


def _loader(n: int = 40, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _trainer(L, tmp_path, **kwargs):
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path), "log_every_n_steps": 1,
    }  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.mark.parametrize("scheduler", [None, "onecycle"])
def test_lightning_fit_adapts(tmp_path, scheduler) -> None:
    L = _lightning()
    L.seed_everything(0, verbose=False)
    module = _lightning_module(L, scheduler, "tensor", total_steps=10)
    trainer = _trainer(L, tmp_path, max_epochs=2)
    trainer.fit(module, _loader())
    assert trainer.global_step == 10
    opt = unwrap_optimizer(trainer.optimizers[0])
    assert isinstance(opt, metalr.AdamHD)
    assert unwrap_optimizer(module.optimizers()) is opt  # through the LightningOptimizer wrapper
    mult = multipliers(opt)
    assert all(torch.isfinite(m).all() and (m != 1).all() for m in mult)
    assert_effective_is_lr_times_multiplier(opt)
    if scheduler:  # the scheduler ran every step and wrote group['lr']
        sched = trainer.lr_scheduler_configs[0].scheduler
        assert sched.last_epoch == 10
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] != 1e-2


def test_lightning_closure_feeds_the_spike_guard(tmp_path) -> None:
    """Lightning steps with a closure that returns the training loss: the guard sees every one
    (the same value as the module's own loss) with no change to the training loop."""
    L = _lightning()
    L.seed_everything(0, verbose=False)
    seen: list[float] = []

    class Guarded(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            seen.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return metalr.AdamHD(self.parameters(), lr=1e-2, spike_guard={"warmup": 3.0})

    module = Guarded()
    trainer = _trainer(L, tmp_path, max_epochs=2)
    trainer.fit(module, _loader())
    summary = unwrap_optimizer(trainer.optimizers[0]).spike_summary()
    assert summary[0]["losses"] == len(seen) == 10
    mean = seen[0]
    for loss in seen[1:]:  # the guard's running mean (no spike in this run)
        mean += (1 - 0.95) * (loss - mean)
    assert summary[0]["mean"] == pytest.approx(mean, rel=1e-5)
    assert summary[0]["spikes"] == 0


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("scheduler", [None, "onecycle"])
def test_lightning_checkpoint_resume_exact(tmp_path, scheduler) -> None:
    """Checkpoint after epoch 1 via ModelCheckpoint, resume with ckpt_path= in a new Trainer."""
    L = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    straight = _lightning_module(L, scheduler, "element", total_steps=10)
    _trainer(L, tmp_path / "a", max_epochs=2).fit(straight, _loader())

    L.seed_everything(0, verbose=False)
    first = _lightning_module(L, scheduler, "element", total_steps=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _trainer(L, tmp_path / "b", max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, _loader()
    )
    path = ckpt.best_model_path or ckpt.last_model_path
    assert path, "no checkpoint written"

    L.seed_everything(123, verbose=False)  # different initial weights: all must come from ckpt
    resumed = _lightning_module(L, scheduler, "element", total_steps=10)
    trainer = _trainer(L, tmp_path / "c", max_epochs=2)
    trainer.fit(resumed, _loader(), ckpt_path=path)
    assert trainer.global_step == 10

    opt_a = straight.trainer.optimizers[0]
    opt_c = trainer.optimizers[0]
    eff_a = list(opt_a.effective_lrs().values())
    eff_c = list(opt_c.effective_lrs().values())
    assert all(torch.equal(a, c) for a, c in zip(eff_a, eff_c, strict=True))
    assert any((m != 1).any() for m in multipliers(opt_c))
    for pa, pc in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pc)


def _memory_logger(L):
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics, step=None) -> None:
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    return MemoryLogger()


@pytest.mark.parametrize("granularity", ["tensor", "element"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_lightning_effective_lr_monitor(tmp_path, granularity, per_tensor) -> None:
    L = _lightning()
    from metalr.integrations.lightning import EffectiveLRMonitor

    L.seed_everything(0, verbose=False)
    module = _lightning_module(L, "onecycle", granularity, total_steps=10)
    logger = _memory_logger(L)
    monitor = EffectiveLRMonitor(logging_interval=2, per_tensor=per_tensor)
    used: dict[int, tuple[float, list[torch.Tensor]]] = {}  # step -> (lr it used, multipliers)

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            used[trainer.global_step] = (self.lr, multipliers(trainer.optimizers[0]))

    callbacks = [monitor, Record()]
    trainer = _trainer(L, tmp_path, max_epochs=2, logger=logger, callbacks=callbacks)
    trainer.fit(module, _loader())

    rows = [(s, m) for s, m in logger.rows if any(k.startswith("effective_lr/") for k in m)]
    assert [s for s, _ in rows] == [2, 4, 6, 8, 10]
    assert rows[-1][1] == monitor.last_metrics
    lrs = {lr for lr, _ in used.values()}
    assert len(lrs) == 10  # OneCycleLR moved the lr every step
    for step, metrics in rows:  # the rates each logged step used: its lr × its multipliers
        lr, mult = used[step]
        rates = torch.cat([(m.double() * lr).reshape(-1) for m in mult])
        assert metrics["effective_lr/group0/min"] == pytest.approx(rates.min().item(), rel=1e-6)
        assert metrics["effective_lr/group0/mean"] == pytest.approx(rates.mean().item(), rel=1e-6)
        assert metrics["effective_lr/group0/max"] == pytest.approx(rates.max().item(), rel=1e-6)
    last = rows[-1][1]
    layer_keys = {k for k in last if "net." in k}
    if not per_tensor:
        assert not layer_keys
    elif granularity == "tensor":
        assert layer_keys == {
            f"effective_lr/net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
        }
        lr, mult = used[10]
        assert last["effective_lr/net.0.weight"] == pytest.approx(lr * mult[0].item(), rel=1e-6)
    else:
        # min/mean/max per tensor; the one-element output bias has a single rate.
        assert (
            "effective_lr/net.0.weight/max" in layer_keys
            and "effective_lr/net.2.bias" in layer_keys
        )
        assert len(layer_keys) == 3 * 3 + 1


# -------------------------------------------------------------------------------- transformers
def _transformers():
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
    return transformers


class _TokenData(torch.utils.data.Dataset):
    """Sequences of a repeating pattern (next token = current + 1 mod V): learnable in steps."""

    def __init__(self, n: int = 64, length: int = 12, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_run(tmp_path, make_scheduler, lr_scheduler_type: str = "linear", steps: int = 24):
    transformers = _transformers()
    from metalr.integrations.huggingface import add_effective_lr_callback

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = metalr.AdamWHD(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        hypergrad_lr=0.05,
    )
    scheduler = make_scheduler(opt) if make_scheduler else None
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        logging_steps=6, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        lr_scheduler_type=lr_scheduler_type, warmup_steps=4, seed=0,
    )  # fmt: skip

    records: list[tuple[list[float], list[torch.Tensor]]] = []

    class Record(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.lrs = [g["lr"] for g in unwrap_optimizer(optimizer).param_groups]

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = unwrap_optimizer(optimizer)
            assert_effective_is_lr_times_multiplier(inner)  # at every step, whatever the lr
            records.append((self.lrs, multipliers(inner)))  # the lr this step used

    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_TokenData(), optimizers=(opt, scheduler),
        callbacks=[Record()],
    )  # fmt: skip
    add_effective_lr_callback(trainer, per_tensor=True)
    with torch.no_grad():
        batch = _TokenData()[:8]
        initial = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    trainer.train()
    assert trainer.optimizer is not opt and unwrap_optimizer(trainer.optimizer) is opt  # accelerate
    with torch.no_grad():
        final = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    return trainer, opt, records, initial, final


def _check_hf_adaptation(opt, records, initial: float, final: float, steps: int = 24) -> None:
    assert len(records) == steps
    assert final < initial
    mult = multipliers(opt)
    assert all(torch.isfinite(m).all() for m in mult)
    # seek: its ramp starts at max(init_scale, init_floor / lr) with the lr of the first step
    m0 = initial_multiplier({**opt.param_groups[0], "lr": records[0][0][0]})
    assert sum(bool((m != m0).all()) for m in mult) == len(mult)  # every tensor adapted
    # The multipliers carry over from step to step although group['lr'] is rewritten each step:
    # they are never reset (after step 1, which has no previous direction), and keep moving.
    assert all(torch.equal(m, torch.full_like(m, m0)) for m in records[0][1])
    assert all(any((m != m0).any() for m in r[1]) for r in records[1:])
    assert any(not torch.equal(a, b) for a, b in zip(records[-2][1], records[-1][1], strict=True))
    assert_effective_is_lr_times_multiplier(opt)


def test_hf_trainer_spike_guard_callback_hands_over_each_steps_loss(tmp_path) -> None:
    """With gradient accumulation the guard sees one loss per optimizer step: the sum of the
    micro-batch losses ``training_step`` returned (the Trainer's logged loss)."""
    transformers = _transformers()
    from metalr.integrations.huggingface import add_spike_guard_callback

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    opt = metalr.AdamWHD(model.parameters(), lr=3e-3, spike_guard={"warmup": 3.0})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenData(),
                                   optimizers=(opt, None))  # fmt: skip
    callback = add_spike_guard_callback(trainer)
    micro: list[float] = []
    inner = trainer.training_step

    def recording(*a, **kw):
        loss = inner(*a, **kw)
        micro.append(float(loss.detach()))
        return loss

    trainer.training_step = recording
    trainer.train()
    assert callback.observed == trainer.state.global_step == 10 and len(micro) == 20
    per_step = [micro[i] + micro[i + 1] for i in range(0, 20, 2)]
    mean = per_step[0]
    for loss in per_step[1:]:
        mean += (1 - 0.95) * (loss - mean)
    summary = opt.spike_summary()[0]
    assert summary["losses"] == 10 and summary["spikes"] == 0
    assert summary["mean"] == pytest.approx(mean, rel=1e-5)


def test_hf_trainer_with_own_scheduler(tmp_path) -> None:
    """``optimizers=(opt, OneCycleLR)``: the Trainer steps our scheduler, which overwrites lr."""
    trainer, opt, records, initial, final = _hf_run(
        tmp_path,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-3, total_steps=24),
    )
    assert trainer.lr_scheduler.last_epoch == 24
    lrs = [r[0][0] for r in records]
    assert len(set(lrs)) > 10  # the schedule moved lr every step
    _check_hf_adaptation(opt, records, initial, final)


@pytest.mark.parametrize("lr_scheduler_type", ["linear", "constant"])
def test_hf_trainer_default_scheduler(tmp_path, lr_scheduler_type) -> None:
    """``optimizers=(opt, None)``: the Trainer's own LambdaLR resets group['lr'] every step."""
    trainer, opt, records, initial, final = _hf_run(tmp_path, None, lr_scheduler_type)
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    _check_hf_adaptation(opt, records, initial, final)
    lrs = [r[0][0] for r in records]
    if lr_scheduler_type == "constant":  # "constant" ignores warm-up: lr reset to 3e-3 each step
        assert lrs == [pytest.approx(3e-3)] * len(lrs)
    else:  # linear: 4 warm-up steps, then down towards 0
        assert lrs[:5] == pytest.approx([0.0, 0.75e-3, 1.5e-3, 2.25e-3, 3e-3])
        assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 3e-4
    # Effective rates reach the Trainer's logs (and, first in the list, its reporters).
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    assert all("effective_lr/group0/mean" in h and "effective_lr/group1/max" in h for h in logged)
    # The logged rates are those the logged step used: the Trainer's learning_rate × multiplier.
    weight = dict(trainer.model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    i = [id(p) for g in opt.param_groups for p in g["params"]].index(id(weight))
    for entry in logged:
        lr, mult = records[entry["step"] - 1]
        assert entry["learning_rate"] == pytest.approx(lr[0], rel=1e-12)
        assert entry["effective_lr/transformer.h.0.attn.c_attn.weight"] == pytest.approx(
            lr[0] * mult[i].item(), rel=1e-6
        )


# --------------------------------------------------------------------------------- TensorBoard
@pytest.mark.parametrize("granularity", ["tensor", "element"])
def test_tensorboard_log_effective_lrs(tmp_path, granularity) -> None:
    pytest.importorskip("tensorboard", reason="needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from metalr.integrations.tensorboard import log_effective_lrs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 1))
    opt = metalr.AdamHD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
        lr=1e-2, hypergrad_lr=0.05, granularity=granularity,
    )  # fmt: skip
    x = torch.randn(32, 5)
    y = x[:, :1] - x[:, 1:2]
    writer = SummaryWriter(log_dir=str(tmp_path))
    written = []
    for step in range(1, 9):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if step % 2 == 0:
            written.append(
                (
                    step,
                    log_effective_lrs(writer, opt, step, model.named_parameters(), histograms=True),
                )
            )
    writer.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(written[-1][1])
    for i in (0, 1):
        assert {f"effective_lr/group{i}/{k}" for k in ("min", "mean", "max")} <= tags
    layer = "effective_lr/0.weight" + ("" if granularity == "tensor" else "/mean")
    assert layer in tags
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4, 6, 8]
        for e, (_, values) in zip(events, written, strict=True):
            assert e.value == pytest.approx(values[tag], rel=1e-6)  # stored as float32
    final = opt.lr_summary()
    assert acc.Scalars("effective_lr/group1/max")[-1].value == pytest.approx(
        final[1]["max"], rel=1e-6
    )
    histos = set(acc.Tags()["histograms"])
    assert bool(histos) == (granularity == "element")
