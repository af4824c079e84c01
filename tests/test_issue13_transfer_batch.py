"""Issue 13: transfer tasks (pretrained body, fresh head), layer-wise rates, batch-size specs, the
transfer prior, and the headlines of studies 7 and 8."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import metalr
from metalr.workbench import layerwise as L
from metalr.workbench import optimizers as O
from metalr.workbench import transfer_tasks as T
from metalr.workbench.config import resolve_study
from metalr.workbench.runner import expand, run_cell
from metalr.workbench.tasks import CharGRU, make_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METALR_CACHE", str(tmp_path_factory.getbasetemp() / "cache13"))


def _cell(task, spec, lr=1e-3, seed=0, steps=4):
    cell = {"task": task, "size": "smoke", "optimizer": "x", "spec": spec, "lr": lr, "seed": seed,
            "steps": steps, "log_every": 2, "divergence": 1e4, "range_test_steps": 10,
            "fallback_text": True, "id": "test"}  # fmt: skip
    return run_cell(cell)


# ------------------------------------------------------------------------- tasks and pretraining
def test_animal_transfer_splits_are_disjoint_classes_and_sized():
    spec = T.SPECS["animal_transfer"]["smoke"]
    (px, py), (train, val, test) = T.animal_splits(spec)
    assert len(px) == spec["pretrain_examples"] and int(py.max()) <= 4  # classes 0-4 only
    assert [len(s[1]) for s in (train, val, test)] == [5 * spec["shots"], 5 * 40, 5 * 40]
    for _, y in (train, val, test):  # classes 5-9 relabelled 0-4, every class present
        assert torch.bincount(y, minlength=5).tolist() == [len(y) // 5] * 5
    # no fine-tuning image is a pretraining image
    flat = {tuple(x.flatten()[::7].tolist()) for x in px}
    assert not any(tuple(x.flatten()[::7].tolist()) in flat for x in train[0])


def test_pretraining_is_deterministic_and_cached(monkeypatch):
    a, b = T.pretrain("animal_transfer", "smoke"), T.pretrain("animal_transfer", "smoke")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if k != "_pretrain_s")
    assert not any(k.startswith("head.") for k in a)
    body = T.pretrained_body("animal_transfer", "smoke")
    assert T.cache_path("animal_transfer", "smoke").is_file()
    T._pretrained.cache_clear()
    monkeypatch.setattr(T, "pretrain", lambda *a: pytest.fail("pretrained again"))
    again = T.pretrained_body("animal_transfer", "smoke")  # read from the cache file
    assert torch.equal(again["conv1.weight"], body["conv1.weight"])
    assert torch.equal(again["conv1.weight"], a["conv1.weight"])


@pytest.mark.parametrize("name", ["animal_transfer", "text_transfer"])
def test_fine_tuning_model_is_pretrained_body_and_fresh_seeded_head(name):
    task = make_task(name, "smoke", fallback_text=True)
    body = T.pretrained_body(name, "smoke")
    m0, m0b, m1 = task.model(0), task.model(0), task.model(1)
    for k, v in m0.state_dict().items():
        if k.startswith("head."):
            assert torch.equal(v, m0b.state_dict()[k]) and not torch.equal(v, m1.state_dict()[k])
        else:
            assert torch.equal(v, body[k]) and torch.equal(v, m1.state_dict()[k])
    x, y = task.splits()[0]
    assert math.isfinite(float(task.loss(m0(x), y).detach()))


def test_text_transfer_shares_an_ascii_vocabulary():
    task = make_task("text_transfer", "smoke", fallback_text=True)
    assert isinstance(task.model(0), CharGRU) and task.model(0).head.out_features == T.VOCAB
    pre = T.text_pretraining(T.SPECS["text_transfer"]["smoke"])
    assert int(pre[0].max()) < T.VOCAB and int(task.splits()[0][0].max()) < T.VOCAB


# ------------------------------------------------------------------------------ layer-wise rates
def test_layer_depths_count_from_the_head():
    cnn = T.TransferCNN(4, 8, 5)
    assert L.layer_depths(cnn) == {"conv1.weight": 2, "conv1.bias": 2, "conv2.weight": 1,
                                   "conv2.bias": 1, "head.weight": 0, "head.bias": 0}  # fmt: skip
    gru = L.layer_depths(CharGRU(10, 4, 6))
    assert gru["embed.weight"] == 2 and gru["gru.weight_hh_l0"] == 1 and gru["head.bias"] == 0


def test_layer_decay_groups_and_freeze_schedule():
    torch.manual_seed(0)
    model = T.TransferCNN(2, 4, 5)
    spec = {"kind": "adam", "layer_decay": 0.5, "freeze_body": 0.5}
    opt = O.build_for_model(spec, model, 1e-2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-3, 5e-3, 1e-2])
    sched = O.build_schedule(spec, opt, 10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 5, (8,))
    for step in range(1, 11):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        now = model.state_dict()
        assert not torch.equal(now["head.weight"], start["head.weight"])
        assert torch.equal(now["conv1.weight"], start["conv1.weight"]) == (step <= 5), step
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-3, 5e-3, 1e-2])


def test_tuned_layer_decay_searches_the_same_lrs_as_tuned_adam():
    base = {"kind": "tuned_adam", "search": "random", "trials": 3, "lr_range": [1e-4, 1e-1]}
    adam = _cell("animal_transfer", base, lr=None)
    llrd = _cell("animal_transfer", {**base, "layer_decay_range": [0.2, 0.9]}, lr=None)
    assert llrd["extra"]["trial_lrs"] == adam["extra"]["trial_lrs"]  # paired draws
    gammas, scores = llrd["extra"]["trial_layer_decays"], llrd["extra"]["trial_val_losses"]
    assert all(0.2 <= g <= 0.9 for g in gammas) and len(set(gammas)) == 3
    best = min(range(3), key=scores.__getitem__)
    assert llrd["extra"]["layer_decay"] == gammas[best]
    assert llrd["lr_used"] == llrd["extra"]["trial_lrs"][best]


@pytest.mark.parametrize(("spec", "match"), [
    ({"kind": "adam", "layer_decay": 0.0}, "layer_decay"),
    ({"kind": "adam", "layer_decay": 1.5}, "layer_decay"),
    ({"kind": "adam", "freeze_body": 1.0}, "freeze_body"),
    ({"kind": "adam", "freeze_body": 0.3, "schedule": "cosine"}, "freeze_body"),
    ({"kind": "tuned_adam", "layer_decay_range": [0.1, 1.0]}, "layer_decay_range"),
    ({"kind": "adam", "layer_decay_range": [0.1, 1.0]}, "layer_decay_range"),
    ({"kind": "adam", "epochs": 3}, "epochs needs batch_size"),
    ({"kind": "adam", "batch_size": 0}, "batch_size"),
    ({"kind": "adam", "lrs": []}, "lrs"),
])  # fmt: skip
def test_invalid_layerwise_and_batch_keys_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        O.check_spec("x", spec)


# ----------------------------------------------------------------------- batch size and warmup
def test_batch_size_and_epochs_set_the_run_and_spec_lrs_the_grid():
    rec = _cell("digits_mlp", {"kind": "adam", "batch_size": 16, "epochs": 0.1})
    assert rec["steps"] == round(0.1 * 1078 / 16) == 7 and rec["task_info"]["batch_size"] == 16
    cfg = resolve_study({"tasks": ["digits_mlp"], "lrs": [1e-4, 1e-3], "optimizers": {
        "adam": {"kind": "adam"}, "hd": {"kind": "adam_hd", "lrs": [3e-3]}}})  # fmt: skip
    assert [(c["optimizer"], c["lr"]) for c in expand(cfg)] == [
        ("adam", 1e-4),
        ("adam", 1e-3),
        ("hd", 3e-3),
    ]


def test_linear_warmup_ramps_then_holds():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    spec = {"kind": "sgd", "schedule": "linear_warmup",
            "schedule_args": {"warmup": 0.1, "start_factor": 0.1}}  # fmt: skip
    sched = O.build_schedule(spec, opt, 100)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert lrs[10:] == pytest.approx([1.0] * 20)


def test_lr_geomean_weights_by_size():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-4}])
    assert L.lr_geomean(opt) == pytest.approx(math.exp((3 * math.log(1e-2) + math.log(1e-4)) / 4))
    hd = metalr.AdamHD([a, b], lr=1e-3)
    (a.sum() + b.sum()).backward()
    hd.step()
    eff = hd.effective_lrs()
    want = math.exp((3 * math.log(float(eff[a])) + math.log(float(eff[b]))) / 4)
    assert L.lr_geomean(hd) == pytest.approx(want)


def test_runs_record_the_geomean_effective_rate():
    rec = _cell("digits_mlp", {"kind": "adam", "layer_decay": 0.5}, lr=1e-2, steps=3)
    lr = rec["final_lr"]  # digits_mlp smoke: 64×64 + 64 (depth 1), 64×10 + 10 (head)
    want = math.exp((4160 * math.log(5e-3) + 650 * math.log(1e-2)) / 4810)
    assert lr["min"] == 5e-3 and lr["max"] == 1e-2 and lr["geomean"] == pytest.approx(want)


# ------------------------------------------------------------------------------ transfer prior
def test_transfer_prior_is_meta_trained_on_pretraining_episodes_only():
    from metalr.workbench import priors
    from metalr.workbench.transfer_priors import PretrainEpisodes

    spec = T.SPECS["animal_transfer"]["smoke"]
    (px, py), _ = T.animal_splits(spec)
    batch = PretrainEpisodes(px, py, shots=2, query=3).sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 10, 1, 28, 28) and batch.query_y.shape == (4, 15)
    assert sorted(batch.support_y[0].unique().tolist()) == [0, 1, 2, 3, 4]
    prior = priors.task_prior("animal_transfer", "smoke", "adam_hd")
    assert set(prior.rates) == {n for n, _ in T.TransferCNN(8, 16, 5).named_parameters()}
    assert prior.provenance["split"] == "pretraining" and prior.init_weights is None
    rec = _cell("animal_transfer", {"kind": "adam_hd", "prior": "task"}, lr=None)
    assert rec["status"] == "ok" and rec["lr_used"] is None


def test_text_transfer_prior_runs_the_gru_with_sequence_episodes():
    from metalr.workbench import priors
    from metalr.workbench.transfer_priors import TextEpisodes

    x, y = T.text_pretraining(T.SPECS["text_transfer"]["smoke"])
    batch = TextEpisodes(x, y, shots=2, query=3).sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 2, 32) and batch.query_y.shape == (4, 3, 32)
    assert torch.equal(batch.support_x[..., 1:], batch.support_y[..., :-1])  # next characters
    prior = priors.task_prior("text_transfer", "smoke", "adam_hd")
    assert set(prior.rates) == {n for n, _ in CharGRU(T.VOCAB, 16, 32).named_parameters()}
    assert all(float(r) > 0 for r in prior.rates.values())


# ------------------------------------------------------------------------------------ headlines
def _rec(task, opt, lr, seed, val, **kw):
    return {"task": task, "optimizer": opt, "lr": lr, "seed": seed, "status": "ok",
            "final_val_loss": val, "final_test_loss": val, "steps": 10,
            "lr_used": kw.pop("lr_used", lr), "final_lr": {"geomean": kw.pop("rate", lr or 1e-3)},
            "extra": kw.pop("extra", {}), **kw}  # fmt: skip


def test_headline8_reads_best_rates_and_the_scaling_rules_off_the_grid():
    import transfer_batch_studies as H

    lrs = [1e-4 * 2**k for k in range(6)]
    recs = []
    for b, best in ((16, 2), (64, 3), (256, 4)):  # the best lr doubles per ×4 batch: sqrt rule
        for k, lr in enumerate(lrs):
            recs += [
                _rec("t", f"adam_bs{b}", lr, s, 1.0 + abs(k - best) + 0.01 * s) for s in (0, 1)
            ]
        recs += [_rec("t", f"adam_hd_bs{b}", 1e-3, s, 1.5, rate=1e-3 * (b / 16)) for s in (0, 1)]
    rows = H.batch_table(recs, "t")
    assert [rows[b]["best_lr"] for b in (16, 64, 256)] == [lrs[2], lrs[3], lrs[4]]
    assert rows[64]["linear_lr"] == pytest.approx(lrs[4]) and rows[64]["sqrt_lr"] == pytest.approx(
        lrs[3]
    )
    assert rows[256]["linear"] is None  # 4e-4 × 16 = 6.4e-3 is beyond this grid: "off grid"
    assert rows[256]["sqrt"][0]["final_val_loss"] == 1.0  # the sqrt rule hits the best rate
    text = H.headline8(recs)
    assert "best Adam **0.50**" in text and "AdamHD end **1.00**" in text and "off grid" in text


def test_headline7_names_the_winner_by_test_loss():
    import transfer_batch_studies as H

    recs = [_rec("t", "adam_tuned", None, s, 1.0 + 0.01 * s, extra={"trials": 8}, lr_used=1e-3)
            for s in (0, 1, 2)]  # fmt: skip
    recs += [_rec("t", "adam_hd", 1e-3, s, 0.5 + 0.01 * s) for s in (0, 1, 2)]
    text = H.headline7(recs)
    assert "lowest test loss **adam_hd@0.001**" in text and "overlapping it: none" in text
    assert "| Adam, one rate (tuned) | 9 |" in text
