"""``metalr meta-train`` / ``few-shot-eval``, the run configs and the meta-learning study scripts.

Everything runs in-process on the configs' smoke sections (a few meta-iterations each).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from metalr import cli
from metalr.meta import LRPrior, MetaLearner
from metalr.meta.results import load_checkpoint, pool_chunks
from metalr.meta.run_config import load_config, resolve_config
from metalr.meta.runner import evaluate, fixed_tasks, make_learner, meta_train
from metalr.tasks.glyphs import DEFAULT_FONT_DIR
from metalr.tasks.sinusoid import SinusoidTasks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SINUSOID = CONFIGS / "sinusoid_metasgd.yaml"
RUN_CONFIGS = sorted(CONFIGS.glob("sinusoid_*.yaml")) + sorted(CONFIGS.glob("glyphs_*.yaml"))
needs_fonts = pytest.mark.skipif(
    not (DEFAULT_FONT_DIR / "NotoSans-Regular.ttf").exists(),
    reason="glyph tasks need the Noto fonts (apt-get install -y fonts-noto-core)",
)


def train(run_dir: Path, *overrides: str, config: Path = SINUSOID, resume: bool = False) -> int:
    argv = ["meta-train", "--config", str(config), "--run-dir", str(run_dir), "--quiet", "--smoke"]
    return cli.main(argv + (["--resume"] if resume else []) + list(overrides))


def meta_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.pt")["learner"]


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("meta_parameters",):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    sa, sb = a["meta_optimizer"]["state"], b["meta_optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert torch.equal(a["generator_state"], b["generator_state"])
    assert a["step_count"] == b["step_count"]


def test_meta_train_smoke_writes_checkpoint_results_and_prior(tmp_path):
    assert train(tmp_path / "run") == 0
    run = tmp_path / "run"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["train"]["iterations"] == 4
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert test["num_tasks"] == 20 and math.isfinite(test["query_loss_ci95"])
    assert test["query_loss"] > 0 and test["k_shot"] == 10
    assert [v["iteration"] for v in results["validation"]] == [2, 4]
    prov = results["provenance"]
    assert len(prov["config_sha256"]) == 64 and prov["torch_version"] == torch.__version__
    assert prov["config"]["meta"]["rates"] == "element" and prov["config_file_sha256"]
    for key in ("git_commit", "metalr_version", "device", "command"):
        assert key in prov
    assert results["seed"] == 0 and results["wall_time_s"] > 0
    prior = LRPrior.load(run / results["files"]["prior"])
    assert prior.granularity == "element" and set(prior.rates) == {
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}  # fmt: skip
    # the checkpoint rebuilds the learner: its exported prior is the saved one
    learner = make_learner(load_config(SINUSOID, smoke=True))
    learner.load_state_dict(ckpt["learner"])
    for name, rate in learner.export_prior().rates.items():
        assert torch.equal(rate, prior.rates[name])


def test_meta_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    assert train(tmp_path / "run") == 0
    assert train(tmp_path / "run") == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_continues_bit_exactly(tmp_path):
    every = "train.checkpoint_every=2"
    assert train(tmp_path / "straight", "train.iterations=6", every) == 0
    assert train(tmp_path / "split", "train.iterations=4", every) == 0
    assert train(tmp_path / "split", "train.iterations=6", every, resume=True) == 0
    assert_same_state(meta_state(tmp_path / "straight"), meta_state(tmp_path / "split"))
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((tmp_path / "split" / "results.json").read_text())
    assert a["test"] == b["test"] and a["validation"] == b["validation"]


def test_resume_after_a_crash_mid_run(tmp_path, monkeypatch):
    cfg = load_config(SINUSOID, ["train.iterations=6", "train.checkpoint_every=2"], smoke=True)
    meta_train(cfg, tmp_path / "straight", quiet=True)
    real_step = MetaLearner.meta_step

    def crash_at_5(self, batch):
        if self.step_count == 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(MetaLearner, "meta_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        meta_train(cfg, tmp_path / "crashed", quiet=True)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["iteration"] == 4
    monkeypatch.setattr(MetaLearner, "meta_step", real_step)
    torch.manual_seed(123)  # the global RNG state comes back from the checkpoint
    meta_train(cfg, tmp_path / "crashed", resume=True, quiet=True)
    assert_same_state(meta_state(tmp_path / "straight"), meta_state(tmp_path / "crashed"))


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    assert train(tmp_path / "run") == 0
    assert train(tmp_path / "run", "meta.inner_lr=0.02", "train.iterations=6", resume=True) == 2
    assert "meta.inner_lr" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["train.iteratons=3", "optim.lr=0.1", "meta.inner_lrr=0.1",
                                      "bogus=1"])  # fmt: skip
def test_unknown_override_key_is_an_error(tmp_path, capsys, override):
    assert train(tmp_path / "run", override) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.iterations=abc", "train.iterations"), ("train.iterations=1.5", "train.iterations"),
     ("meta.learn_init=3", "meta.learn_init"), ("meta.inner_lr=fast", "meta.inner_lr"),
     ("model.hidden=[40, x]", "model.hidden[1]"), ("meta.rates=layer", "rates"),
     ("train.val_every=0", "train.val_every"), ("smoke=maybe", "smoke")],
)  # fmt: skip
def test_bad_override_value_is_an_error(override, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(SINUSOID, [override])


def test_overrides_are_typed_and_take_both_spellings():
    cfg = load_config(SINUSOID, ["--meta.inner_lr=1e-3", "train.iterations=7", "meta.lr_bounds=[0, .inf]",
                                 "eval.steps=null", "task.k_query=3"])  # fmt: skip
    assert cfg.meta.inner_lr == 0.001 and isinstance(cfg.meta.inner_lr, float)
    assert cfg.train.iterations == 7 and cfg.meta.lr_bounds == (0.0, math.inf)
    assert cfg.eval.steps is None and cfg.task.k_query == 3
    smoke = load_config(SINUSOID, ["smoke=true", "train.iterations=5"])
    assert smoke.train.iterations == 5 and smoke.eval.num_tasks == 20  # overrides beat smoke


def test_few_shot_eval_writes_metrics_with_ci(tmp_path):
    assert train(tmp_path / "run") == 0
    ckpt, out = tmp_path / "run" / "checkpoint.pt", tmp_path / "eval.json"
    argv = ["few-shot-eval", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    got = json.loads(out.read_text())
    trained = json.loads((tmp_path / "run" / "results.json").read_text())
    assert got["test"] == trained["test"]  # the same fixed test tasks, the same numbers
    assert got["iteration"] == 4 and got["provenance"]["config_sha256"]
    assert cli.main(argv + ["eval.num_tasks=30", "task.k_shot=5"]) == 0
    test = json.loads(out.read_text())["test"]
    assert test["num_tasks"] == 30 and test["k_shot"] == 5
    assert test["query_loss"] > 0 and 0 < test["query_loss_ci95"] < test["query_loss"]
    assert cli.main(["few-shot-eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2


def test_pooled_chunks_equal_one_evaluation():
    learner = make_learner(load_config(SINUSOID, smoke=True))
    batch = SinusoidTasks(5, 20).sample(60, torch.Generator().manual_seed(0))
    whole = learner.evaluate(batch)
    parts = [learner.evaluate(type(batch)(*(t[a:b] for t in batch))) for a, b in
             ((0, 25), (25, 50), (50, 60))]  # fmt: skip
    pooled = pool_chunks(parts)
    for key in ("query_loss", "query_loss_ci95", "pre_adaptation_loss_ci95"):
        assert pooled[key] == pytest.approx(whole[key], rel=1e-5)


def _glyph_sampler():
    from metalr.tasks.glyphs import GlyphTasks

    return GlyphTasks("test", n_way=3, k_shot=1, k_query=2, image_size=12, max_scripts=2)


@pytest.mark.parametrize(
    ("make", "block"),
    [(lambda: SinusoidTasks(5, 20), None), (lambda: SinusoidTasks(5, 20), 3),
     pytest.param(_glyph_sampler, 50, marks=needs_fonts),
     pytest.param(_glyph_sampler, 4, marks=needs_fonts)],
    ids=["sinusoid-whole", "sinusoid-block3", "glyphs-block50", "glyphs-block4"],
)  # fmt: skip
def test_fixed_tasks_do_not_depend_on_the_chunk(make, block):
    """``eval.chunk`` bounds memory only: every chunk size hands out the same tasks (until
    2026-12-05 each chunk was a new draw from one generator, so the size changed the test set).
    The set is drawn in the sampler's own blocks from one generator: for the committed configs
    (sinusoid: one draw; glyphs: blocks of 50, their chunk) the tasks they were scored on."""
    sampler = make()
    sampler.draw_block = block
    expected, generator, drawn = [], torch.Generator().manual_seed(2024), 0
    while drawn < 10:
        n = min(block or 10, 10 - drawn)
        expected.append(sampler.sample(n, generator))
        drawn += n
    expected = type(expected[0])(*(torch.cat(fields) for fields in zip(*expected)))
    for chunk in (1, 4, 7, 10, 50):
        parts = list(fixed_tasks(sampler, 10, 2024, chunk))
        assert [p.num_tasks for p in parts][:-1] == [min(chunk, 10)] * (len(parts) - 1)
        tasks = type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))
        assert all(torch.equal(a, b) for a, b in zip(tasks, expected)), chunk


def test_the_task_families_name_their_draw_blocks():
    from metalr.tasks.glyphs import GlyphTasks
    from metalr.tasks.omniglot import OmniglotTasks

    assert SinusoidTasks.draw_block is None  # the sinusoid tables' sets: one draw of 600 / 100
    assert GlyphTasks.draw_block == OmniglotTasks.draw_block == 50  # the glyph configs' chunk


def test_evaluation_does_not_depend_on_the_chunk():
    learner = make_learner(load_config(SINUSOID, smoke=True))
    sampler = SinusoidTasks(5, 20)
    results = [evaluate(learner, fixed_tasks(sampler, 30, 7, chunk), None) for chunk in (30, 8)]
    for key in ("query_loss", "query_loss_ci95"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_run_configs_parse_and_document_themselves(path):
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    for field in ("# command:", "# hardware:", "# time:", "# expected:"):
        assert field in header, f"{path.name} header lacks {field!r}"
    full, smoke = load_config(path), load_config(path, smoke=True)
    assert smoke.train.iterations < full.train.iterations
    assert smoke.eval.num_tasks < full.eval.num_tasks


@needs_fonts
def test_glyph_smoke_config_trains_two_iterations(tmp_path):
    config = CONFIGS / "glyphs_metasgd.yaml"
    assert train(tmp_path / "run", config=config) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["iterations"] == 2 and results["name"] == "glyphs_metasgd"
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    assert math.isfinite(results["test"]["accuracy_ci95"])


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sinusoid_study_smoke(tmp_path):
    assert _script("meta_sinusoid").main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "meta_sinusoid.csv")
    assert len(rows) == 5 * 3 + 2 * 3
    assert {r["method"] for r in rows} >= {"MAML", "Meta-SGD", "metalr Adam-HD"}
    report = (tmp_path / "meta_sinusoid.md").read_text()
    assert "0.482 ± 0.061" in report and "far below" in report
    # a second invocation reuses every finished run
    assert _script("meta_sinusoid").main(["--smoke", "--out", str(tmp_path), "--shots", "5"]) == 0


@needs_fonts
def test_glyph_study_smoke(tmp_path):
    assert _script("meta_glyphs").main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "meta_glyphs.csv")
    assert len(rows) == 5 * 2 and {r["k_shot"] for r in rows} == {"1", "5"}
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


def test_unknown_command_and_default_dispatch(capsys):
    assert cli.main(["meta-tran"]) == 2
    assert "meta-train" in capsys.readouterr().err


def test_omniglot_folder_config_trains(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from PIL import Image, ImageDraw

    monkeypatch.setenv("METALR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "omniglot"
    for split, n_chars in (("images_background", 4), ("images_evaluation", 3)):
        for c in range(n_chars):
            folder = root / split / "Alphabet" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(3):
                img = Image.new("L", (105, 105), 255)
                ImageDraw.Draw(img).line([(10, 10 + 20 * c), (90, 30 + 10 * d)], fill=0, width=6)
                img.convert("1").save(folder / f"{c}_{d}.png")
    raw = {
        "task": {"source": "omniglot", "root": str(root), "n_way": 3, "k_shot": 1, "k_query": 1},
        "model": {"kind": "cnn", "channels": 4},
        "meta": {"meta_batch_size": 2, "inner_lr": 0.1},
        "train": {"iterations": 2, "val_every": 2, "val_tasks": 2, "checkpoint_every": 2},
        "eval": {"num_tasks": 3, "k_query": 2, "chunk": 2},
    }
    results = meta_train(resolve_config(raw), tmp_path / "run", quiet=True)
    assert results["test"]["num_tasks"] == 3 and 0 <= results["test"]["accuracy"] <= 1
    with pytest.raises(ValueError, match="task.root"):
        resolve_config({**raw, "task": {"source": "omniglot"}})


@pytest.mark.parametrize("method", ["metasgd", "lslr", "sgd_hd", "adam_hd"])
def test_prior_in_drop_in_optimizers_matches_the_learner(tmp_path, method):
    """few-shot-eval --prior adapts with SGDHD/AdamHD loaded from the exported prior: the same
    test numbers as the meta-learner's own inner loop (the hand-off is faithful)."""
    config = CONFIGS / f"sinusoid_{method}.yaml"
    assert train(tmp_path / "run", config=config) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    prior, out = tmp_path / "run" / results["files"]["prior"], tmp_path / "prior.json"
    argv = ["few-shot-eval", "--prior", str(prior), "--config", str(config), "--smoke",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    got, want = json.loads(out.read_text())["test"], results["test"]
    assert got["num_tasks"] == want["num_tasks"] and got["adapted_with"] in ("SGDHD", "AdamHD")
    for key in ("query_loss", "query_loss_ci95", "pre_adaptation_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert cli.main(["few-shot-eval", "--prior", str(prior)]) == 2  # needs --config


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sinusoid_sgd_hd.yaml"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["meta-train", "--config", str(CONFIG), "--threads", "0"], "--threads: invalid value 0"),
     (["few-shot-eval", "--checkpoint", "x.pt", "--threads", "-1"], "--threads: invalid value")],
)  # fmt: skip
def test_cli_refuses_a_bad_thread_count(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_cli_bad_files_are_errors_not_tracebacks(tmp_path, capsys):
    """A folder or malformed YAML as --config, a corrupt checkpoint or prior, a folder as --out:
    a one-line error and exit 2 (they raised IsADirectoryError, a YAML parse error, KeyError or
    SafetensorError, and --out failed only after the whole evaluation)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\n  - : [\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not a zip at all")
    bad_prior = tmp_path / "garbage.safetensors"
    bad_prior.write_bytes(b"x")
    cases = [
        (["meta-train", "--config", str(tmp_path)], "meta-train: error"),
        (["meta-train", "--config", str(bad_yaml)], "meta-train: error"),
        (["few-shot-eval", "--checkpoint", str(garbage)], "is not a readable metalr run checkpoint"),
        (["few-shot-eval", "--prior", str(bad_prior), "--config", str(CONFIG)],
         "is not a readable metalr LRPrior"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["few-shot-eval", "--checkpoint", str(garbage), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["task.k_query=0", "eval.steps=0"])
def test_zero_counts_are_refused_when_the_config_loads(override):
    """0 was read as "not set" (k_query: the shot count; eval.steps: the training's), so a run
    recorded k_query 0 while training with k_shot, or failed at its first validation."""
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"Invalid value for {key}: 0"):
        load_config(CONFIG, [override], smoke=True)


def test_help_help_prints_the_usage(capsys):
    assert cli.main(["help", "--help"]) == 0
    assert "meta-train" in capsys.readouterr().out


def test_the_few_shot_eval_face_is_importable_from_its_old_module():
    from metalr.meta import evaluation, runner

    for name in ("few_shot_eval", "prior_metrics", "ensure_prior_eval"):
        assert getattr(runner, name) is getattr(evaluation, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        runner.no_such_name  # noqa: B018
