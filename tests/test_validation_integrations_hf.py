"""The validation-observing callbacks of the transformers integration, on a tiny GPT-2 (CPU).

``ObserveValidationCallback``: at each observed step the optimizer's new state equals a copy of
the model and optimizer (taken before the callback ran) observing the expected eval batch by
hand; the Trainer's own evaluation is unaffected; a resumed run equals the uninterrupted one.
``ObserveEvalLossCallback``: each evaluation's ``eval_loss`` during training is observed alone.
Skipped when transformers (or accelerate) is not installed (``pip install "metalr[integrations]"``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _integration_checks import loss_statistics, observation_counts, state_copies
from torch import nn

import metalr
from metalr.integrations import unwrap_optimizer
from metalr.optim._base import RATE_KEY, VALIDATION_KEY

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")


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
            self.observed = observation_counts(inner)
            if state.global_step % 4 == 0:
                snapshots[state.global_step] = copy.deepcopy((model, inner))

    class After(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = unwrap_optimizer(optimizer)
            assert model.training  # back in training mode
            for a, p in zip(before.grads, model.parameters(), strict=True):  # .grad untouched
                assert (a is None and p.grad is None) or torch.equal(a, p.grad)
            if state.global_step % 4:
                assert observation_counts(inner) == before.observed  # no observation at this step
                return
            ref_model, ref_opt = snapshots[state.global_step]
            i = state.global_step // 4 - 1  # eval batches in turn: 0, 1, 0
            batch = {k: torch.stack([eval_data[j][k] for j in range(8 * (i % 2), 8 * (i % 2) + 8)])
                     for k in ("input_ids", "labels")}  # fmt: skip
            ref_model.eval()  # dropout off
            rates_before = state_copies(ref_opt, RATE_KEY)
            ref_opt.observe_validation(ref_model(**batch).loss)
            for key in (RATE_KEY, VALIDATION_KEY):
                for a, b in zip(state_copies(inner, key), state_copies(ref_opt, key), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=key)
            # The rates moved: the observation was not a no-op.
            assert any(
                not torch.equal(a, b) for a, b in zip(state_copies(inner, RATE_KEY), rates_before)
            )
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
    assert checked == [4, 8, 12] and callback.observations == 3 and observation_counts(opt) == {3}
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
        rates[chosen] = state_copies(opt, RATE_KEY)
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
    for a, b in zip(state_copies(opt, RATE_KEY), state_copies(resumed_opt, RATE_KEY), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
    ((count, last),) = loss_statistics(opt)
    assert count == 3 and last == pytest.approx(evals[-1], rel=1e-6)  # loss_decay 0: the last
    assert observation_counts(opt) == {0}
    trainer.evaluate()
    assert callback.observations == 3
    bad = ObserveEvalLossCallback("eval_accuracy")
    with pytest.raises(ValueError, match=r"no metric 'eval_accuracy' was logged .*'eval_loss'"):
        bad.on_train_begin(args, trainer.state, None, optimizer=opt)
        bad.on_evaluate(args, trainer.state, None, metrics={"eval_loss": 1.0}, optimizer=opt)
