"""transformers' ``Trainer`` with a metalr optimizer, on a tiny causal LM on CPU:
``Trainer(optimizers=(opt, scheduler))`` and with the Trainer's own scheduler (which rewrites
``group['lr']`` every step): the adaptation survives, effective = lr × multiplier; the spike
guard's callback hands over each step's loss. Skipped when transformers is not installed
(``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import pytest
import torch
from _integration_checks import assert_effective_is_lr_times_multiplier, multipliers

import metalr
from metalr.integrations import unwrap_optimizer
from metalr.optim._base import initial_multiplier


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
