"""metalr ablate: grid expansion, records, resume after an interruption, the process pool, Ray,
TensorBoard, progress bars, CLI."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from metalr.cli import main
from metalr.functional._controller import SGD_SEEK_DEFAULTS
from metalr.workbench import executors as E
from metalr.workbench import read_records, resolve_study, run_study
from metalr.workbench import runner as R


def _study(tmp_path: Path, **extra) -> object:
    raw = {"name": "t", "tasks": ["digits_logreg"], "steps": 5, "log_every": 2,
           "lrs": [0.01, 0.1], "seeds": [0, 1],
           "optimizers": {"adam": {"kind": "adam"}, "sgd_hd": {"kind": "sgd_hd"}},
           "out": str(tmp_path / "res"), **extra}  # fmt: skip
    return resolve_study(raw)


def test_records_have_provenance_and_curves(tmp_path):
    cfg = _study(tmp_path, lrs=[0.1], seeds=[3])
    records = run_study(cfg, quiet=True)
    assert len(records) == 2
    r = records[0]
    assert r["seed"] == 3 and r["status"] == "ok" and r["steps_done"] == 5
    prov = r["provenance"]
    for key in ("study_config_sha256", "cell_sha256", "git_commit", "torch_version",
                "metalr_version", "device", "wall_time_s", "seed"):  # fmt: skip
        assert key in prov
    assert prov["cell"]["lr"] == 0.1 and prov["cell"]["spec"] == {"kind": "adam"}
    curves = json.loads((cfg.out_dir / r["curves"]).read_text())
    assert curves["step"] == [0, 2, 4, 5]
    assert len(curves["val_loss"]) == len(curves["lr_mean"]) == 4
    assert curves["val_loss"][0] == pytest.approx(r["initial_val_loss"])
    assert curves["val_loss"][-1] == pytest.approx(r["final_val_loss"])
    assert (
        json.loads((cfg.out_dir / "study.json").read_text())["provenance"]["config"]["steps"] == 5
    )


def test_resume_after_interruption_no_duplicates(tmp_path, monkeypatch):
    cfg = _study(tmp_path)
    real, calls = R.run_cell, []

    def interrupted(cell, device="cpu", **kwargs):
        calls.append(cell["id"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(cell, device, **kwargs)

    monkeypatch.setattr(R, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, quiet=True)
    path = cfg.out_dir / "records.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 3
    # a crash mid-append leaves a torn line: it is cut before the next record
    with open(path, "a") as f:
        f.write('{"id": "torn", "task"')
    monkeypatch.setattr(R, "run_cell", real)
    records = run_study(cfg, quiet=True)
    lines = path.read_text().splitlines()
    assert lines[:3] == first  # finished cells untouched
    assert len(lines) == len(records) == 8 == len(R.expand(cfg))
    ids = [json.loads(line)["id"] for line in lines]
    assert len(set(ids)) == 8 and set(ids) == {c["id"] for c in R.expand(cfg)}
    # a third run has nothing left to do
    monkeypatch.setattr(R, "run_cell", lambda *a: pytest.fail("a finished cell was rerun"))
    assert len(run_study(cfg, quiet=True)) == 8
    assert path.read_text().splitlines() == lines


def test_changed_config_runs_new_cells_only(tmp_path):
    cfg = _study(tmp_path, lrs=[0.1], seeds=[0])
    run_study(cfg, quiet=True)
    more = _study(tmp_path, lrs=[0.1], seeds=[0, 1])
    records = run_study(more, quiet=True)
    assert len(records) == 4 and len(read_records(more.out_dir)) == 4


def test_process_pool_matches_sequential(tmp_path):
    seq = run_study(_study(tmp_path / "a", lrs=[0.1]), quiet=True)
    par = run_study(_study(tmp_path / "b", lrs=[0.1], workers=2), quiet=True)
    key = lambda r: r["id"]
    assert [r["id"] for r in sorted(seq, key=key)] == [r["id"] for r in sorted(par, key=key)]
    for a, b in zip(sorted(seq, key=key), sorted(par, key=key)):
        assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)


def test_lr_free_optimizers_run_once_per_seed(tmp_path):
    cfg = _study(tmp_path, optimizers={"rt": {"kind": "range_test_adam"},
                                       "tuned": {"kind": "tuned_adam", "trials": 3,
                                                 "trial_steps": 2}},
                 range_test_steps=20)  # fmt: skip
    records = run_study(cfg, quiet=True)
    assert len(records) == 4 and all(r["lr"] is None for r in records)
    rt = next(r for r in records if r["optimizer"] == "rt")
    assert rt["lr_used"] == pytest.approx(rt["extra"]["range_test"]["suggested_lr"])
    tuned = next(r for r in records if r["optimizer"] == "tuned")
    assert tuned["extra"]["trials"] == 3 and tuned["extra"]["trial_steps_total"] == 6
    assert tuned["lr_used"] in tuned["extra"]["trial_lrs"]


def test_cli_default_study_smoke(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["ablate", "--smoke", "--quiet", f"out={out}", "tasks=[digits_logreg]"]) == 0
    text = capsys.readouterr().out
    assert "| optimizer | 0.001 | 0.1 |" in text and "adam_hd" in text and "Rank summary" in text
    assert len(read_records(out)) == 8
    assert (out / "digits_logreg_sensitivity.png").stat().st_size > 1000
    assert main(["ablate", "--smoke", "--quiet", f"out={out}", "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_two_runners_on_one_folder_refused(tmp_path):
    import fcntl

    cfg = _study(tmp_path, lrs=[0.1], seeds=[0])
    cfg.out_dir.mkdir(parents=True)
    with open(cfg.out_dir / "records.jsonl", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="another metalr ablate"):
            run_study(cfg, quiet=True)
    assert len(run_study(cfg, quiet=True)) == 2


def test_progress_bar_within_runs_only_in_process(tmp_path, monkeypatch):
    real, seen = R.train, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "train", spy)
    run_study(_study(tmp_path / "a", lrs=[0.1], seeds=[0]), quiet=False)
    run_study(_study(tmp_path / "b", lrs=[0.1], seeds=[0]), quiet=True)
    assert seen == [True, True, False, False]


def test_tensorboard_events_match_curves(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _study(tmp_path, lrs=[0.1], seeds=[0], tensorboard=True)
    records = run_study(cfg, quiet=True)
    root = cfg.out_dir / "tensorboard" / "digits_logreg"
    for r in records:
        acc = EventAccumulator(str(root / r["optimizer"] / "lr0.1_seed0"))
        acc.Reload()
        curves = json.loads((cfg.out_dir / r["curves"]).read_text())
        for tag, key in (("loss/val", "val_loss"), ("lr/mean", "lr_mean")):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == curves["step"]
            assert [e.value for e in events] == pytest.approx(curves[key], rel=1e-6)  # float32
        assert [e.step for e in acc.Scalars("loss/train")] == curves["step"][1:]
        per_tensor = {t for t in acc.Tags()["scalars"] if t.startswith("effective_lr/")}
        if r["optimizer"] == "sgd_hd":  # metalr: one rate per tensor
            assert {"effective_lr/0.weight", "effective_lr/0.bias"} <= per_tensor, per_tensor
        else:
            assert not per_tensor
    # a rerun of a cell replaces the events of its earlier attempt
    (cfg.out_dir / "records.jsonl").unlink()
    run_study(cfg, quiet=True)
    for name in ("adam", "sgd_hd"):
        assert len(list((root / name / "lr0.1_seed0").glob("events.out.tfevents.*"))) == 1


def test_tensorboard_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        run_study(_study(tmp_path, tensorboard=True), quiet=True)


def test_unknown_executor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Invalid value for executor: 'dask'"):
        _study(tmp_path, executor="dask")


def test_ray_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=re.escape('pip install "torch==2.13.0" ray')):
        run_study(_study(tmp_path, executor="ray"), quiet=True)
    assert not (tmp_path / "res").exists()


def test_ray_init_args(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert E.ray_init_args(None, 3) == {"num_cpus": 3}
    assert E.ray_init_args("auto", 3) == {"address": "auto"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # ray.init() connects there by itself
    assert E.ray_init_args(None, 3) == {}


class _FakeRay(types.ModuleType):
    """Just enough of Ray to run tasks in this process, recording init/shutdown."""

    def __init__(self, initialized: bool):
        super().__init__("ray")
        self.initialized, self.calls = initialized, []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown",))

    def remote(self, **options):
        self.calls.append(("remote", options))
        return lambda fn: types.SimpleNamespace(remote=fn)

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref


@pytest.mark.parametrize("initialized", [False, True])
def test_ray_session_started_here_is_shut_down_only(tmp_path, monkeypatch, initialized):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay(initialized)
    monkeypatch.setitem(sys.modules, "ray", fake)
    records = run_study(_study(tmp_path, lrs=[0.1], seeds=[0], executor="ray", workers=3),
                        quiet=True)  # fmt: skip
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    remote = ("remote", {"num_cpus": 1, "num_gpus": 0})
    where = "the running Ray session" if initialized else "a local Ray instance of 3 CPU(s)"
    assert records[0]["provenance"]["device"] == f"cpu ({where}; 1 thread per run)"
    if initialized:
        assert fake.calls == [remote]
    else:
        assert fake.calls == [("init", {"num_cpus": 3}), remote, ("shutdown",)]


# ------------------------------------------------------------------------------ a real Ray instance
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_executor_matches_local(tmp_path, ray_local):
    raw = {"tasks": ["digits_logreg"], "steps": 5, "log_every": 2, "lrs": [0.01, 0.1],
           "seeds": [0, 1],
           "optimizers": {"adam": {"kind": "adam"}, "sgd_hd": {"kind": "sgd_hd"}}}  # fmt: skip
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    out = tmp_path / "ray"
    args = ["--config", str(path), "--quiet", "--no-report", f"out={out}"]
    assert main(["ablate", *args, "executor=ray", "workers=2", "tensorboard=true"]) == 0
    local = {r["id"]: r for r in run_study(_study(tmp_path / "local"), quiet=True)}
    remote = {r["id"]: r for r in read_records(out)}
    assert sorted(remote) == sorted(local) and len(local) == 8
    for id_, r in remote.items():  # both ran at one torch thread: bit for bit the same
        assert r["final_val_loss"] == local[id_]["final_val_loss"]
        assert r["final_lr"] == local[id_]["final_lr"]
        assert r["provenance"]["cell"] == local[id_]["provenance"]["cell"]
        assert set(r) == set(local[id_])
        curves = json.loads((out / r["curves"]).read_text())
        assert curves == json.loads((tmp_path / "local" / "res" / r["curves"]).read_text())
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 8
    assert ray_local.is_initialized()  # the runner did not start it, so it did not stop it


def test_ray_interrupt_cancels_pending_and_resumes(tmp_path, ray_local, monkeypatch):
    cfg = _study(tmp_path, executor="ray", workers=2)
    real_append, real_cancel, cancelled = R.append_record, ray_local.cancel, []

    def append_then_interrupt(record, path):
        real_append(record, path)
        if len(path.read_text().splitlines()) == 2:
            raise KeyboardInterrupt

    def cancel(ref, **kwargs):
        cancelled.append(ref)
        real_cancel(ref, **kwargs)

    monkeypatch.setattr(R, "append_record", append_then_interrupt)
    monkeypatch.setattr(ray_local, "cancel", cancel)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, quiet=True)
    path = cfg.out_dir / "records.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 2 and len(cancelled) == 6  # every task not yet collected
    monkeypatch.setattr(R, "append_record", real_append)
    records = run_study(cfg, quiet=True)
    lines = path.read_text().splitlines()
    assert lines[:2] == first and len(lines) == len(records) == 8
    assert {json.loads(line)["id"] for line in lines} == {c["id"] for c in R.expand(cfg)}


INIT_SCALE = SGD_SEEK_DEFAULTS["init_scale"]  # the curves below are SGD-HD's


def test_curves_hold_each_layers_effective_lr_for_metalr_optimizers(tmp_path):
    cfg = _study(tmp_path, lrs=[0.1], seeds=[0])
    records = {r["optimizer"]: r for r in run_study(cfg, quiet=True)}
    hd = json.loads((cfg.out_dir / records["sgd_hd"]["curves"]).read_text())
    assert set(hd["lr_layers"]) == {"0.weight", "0.bias"}
    for rates in hd["lr_layers"].values():
        # the seek rule starts below the given lr (its ramp starts at init_scale × lr)
        assert len(rates) == len(hd["step"]) and rates[0] == pytest.approx(0.1 * INIT_SCALE)
    assert hd["lr_layers"]["0.weight"][-1] != pytest.approx(0.1 * INIT_SCALE)  # it adapted
    adam = json.loads((cfg.out_dir / records["adam"]["curves"]).read_text())
    assert "lr_layers" not in adam


def test_sigkill_mid_grid_then_rerun_gives_every_record_once(tmp_path):
    """A real ``metalr ablate`` process killed with SIGKILL mid-grid: the rerun finishes the grid,
    no record is duplicated or lost, and the results equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "metalr.cli", "ablate", "--quiet", "--no-report",
            "tasks=[digits_logreg]", "steps=150", "log_every=50", "lrs=[0.01,0.1,1.0]",
            "seeds=[0,1,2]", "optimizers={adam: {kind: adam}, sgd_hd: {kind: sgd_hd}}",
            f"out={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the grid finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_records(out))
    assert 3 <= done < 18
    assert subprocess.run(args, check=False, env=env, capture_output=True).returncode == 0
    records = read_records(out)
    assert len(records) == 18 and len({r["id"] for r in records}) == 18
    clean = run_study(resolve_study({"name": "t", "tasks": ["digits_logreg"], "steps": 150,
                                     "log_every": 50, "lrs": [0.01, 0.1, 1.0], "seeds": [0, 1, 2],
                                     "optimizers": {"adam": {"kind": "adam"},
                                                    "sgd_hd": {"kind": "sgd_hd"}},
                                     "out": str(tmp_path / "clean")}), quiet=True)  # fmt: skip
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {r["id"] for r in clean}
    for r in clean:
        assert by_id[r["id"]]["final_val_loss"] == pytest.approx(r["final_val_loss"], rel=1e-6)


def test_progress_lines_when_not_a_terminal_and_cached_counts(tmp_path, capsys):
    """Without a terminal (a log file, CI) the grid's progress comes as lines on stderr; a rerun
    says how many cells were cached instead of "N runs"."""
    cfg = _study(tmp_path)  # 8 cells
    records = run_study(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "runs done" in line]
    assert lines[0].startswith("ablate t: 1/8 runs done (0 cached, 1 run), ")
    assert lines[-1].startswith("ablate t: 8/8 runs done (0 cached, 8 run), ")
    assert all(re.search(r", \d+ s elapsed, ~\d+ s left$", line) for line in lines)
    assert re.search(r"^t: 0 cached, 8 run in \d+\.\d s$", err, re.MULTILINE)
    assert (records.cached, records.ran) == (0, 8)
    records = run_study(cfg)  # everything recorded: nothing runs
    err = capsys.readouterr().err
    assert re.fullmatch(r"t: 8 cached, 0 run \(\d+\.\d s\)\n", err)
    assert (records.cached, records.ran, len(records)) == (8, 0, 8)
    records = run_study(_study(tmp_path, seeds=[0, 1, 2]))  # the mixed case
    err = capsys.readouterr().err
    assert "ablate t: 12/12 runs done (8 cached, 4 run)" in err
    assert re.search(r"^t: 8 cached, 4 run in \d+\.\d s$", err, re.MULTILINE)
    assert records.summary("t").startswith("t: 8 cached, 4 run in ")
    run_study(cfg, quiet=True)
    assert capsys.readouterr().err == ""


def test_progress_lines_every_tenth_of_the_grid(tmp_path, monkeypatch):
    import io

    stream = io.StringIO()
    bar = R.Progress("s", 105, 5, stream=stream)  # 100 to run
    for _ in range(100):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    done = [int(re.match(r"ablate s: (\d+)/105", line).group(1)) for line in lines[:-1]]
    assert done == [6, *range(15, 106, 10)]  # the first run, then every 10 runs
    assert re.fullmatch(r"s: 5 cached, 100 run in \d+\.\d s", lines[-1])
    monkeypatch.setattr(R, "LOG_EVERY_S", 0.0)  # a slow grid: a line at least every LOG_EVERY_S
    stream = io.StringIO()
    bar = R.Progress("s", 100, 0, stream=stream)
    for _ in range(5):
        bar.update(1)
    assert len(stream.getvalue().splitlines()) == 5


def test_cli_rerun_says_cached(tmp_path, capsys):
    args = ["ablate", "--smoke", "--no-report", f"out={tmp_path / 'o'}", "tasks=[digits_logreg]"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "ablate ablate_default: 8/8 runs done (0 cached, 8 run)" in err
    assert main(args) == 0
    assert "ablate_default: 8 cached, 0 run (" in capsys.readouterr().err


def test_records_state_the_task_size(tmp_path):
    (r,) = run_study(_study(tmp_path, lrs=[0.1], seeds=[0], optimizers={"a": {"kind": "adam"}}),
                     quiet=True)  # fmt: skip
    assert r["task_info"] == {"train": 1078, "val": 359, "test": 360, "batch_size": None,
                              "params": 650}  # fmt: skip


def test_demo_runs_are_the_default_studys_digits_mlp_runs(capsys):
    """``metalr`` (the demo) and ``metalr ablate`` (the default study) train the same model on
    the same data split from the same seed: their validation losses agree."""
    import torch

    import metalr
    from metalr import demo

    data = demo.load_digits_split()
    task = R._task("digits_mlp", "smoke", "cpu", False)
    assert torch.equal(data[0], task.train[0]) and torch.equal(data[3], task.val[1])
    for kind, cls in (("adam", torch.optim.Adam), ("adam_hd", metalr.AdamHD)):
        study = R.train(task, {"kind": kind}, 1e-3, 1, 20, 10, 1e4, "cpu")
        loss, _ = demo.train(lambda p, cls=cls: cls(p, lr=1e-3), data, 20, 1)
        assert loss == pytest.approx(study["final_val_loss"], rel=1e-5)
    assert main(["demo", "--steps", "2", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "1078 train / 359 validation examples" in out and "default study" in out


def test_shock_schedule_and_a_guarded_optimizer_reading_the_loss(tmp_path, monkeypatch):
    """``schedule: shock`` multiplies the rate from ``at`` of the run on; a spec with
    ``spike_guard`` steps with a closure returning the loss, so the guard sees every loss."""
    import torch

    import metalr
    from metalr.workbench import optimizers as O

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = O.build_schedule({"kind": "sgd", "schedule": "shock",
                              "schedule_args": {"at": 0.3, "factor": 50.0}}, opt, 10)  # fmt: skip
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0] * 3 + [50.0] * 7)

    summaries = []
    step = metalr.AdamHD.step

    def recording_step(self, closure=None):
        out = step(self, closure)
        summaries.append(self.spike_summary())
        return out

    monkeypatch.setattr(metalr.AdamHD, "step", recording_step)
    cfg = _study(tmp_path, steps=30, lrs=[0.01], seeds=[0], optimizers={
        "guarded": {"kind": "adam_hd", "spike_guard": {"warmup": 5.0}, "schedule": "shock",
                    "schedule_args": {"at": 0.5, "factor": 1e4}}})  # fmt: skip
    records = run_study(cfg, quiet=True)
    assert records[0]["status"] in ("ok", "diverged")
    assert summaries[-1][0]["losses"] == len(summaries)  # every step's loss reached the guard
    assert summaries[-1][0]["spikes"] >= 1  # the x1e4 shock was seen


def test_cell_ids_follow_the_library_defaults_a_metalr_spec_resolves(tmp_path, monkeypatch):
    """A cell's id hashes the settings its metalr optimizer resolves, defaults included: after a
    refit of the seek constants the seek cells get new ids (and so rerun), while torch's cells
    and a rule that does not read those constants keep theirs."""
    from metalr.functional._controller import SEEK_DEFAULTS

    optimizers = {"adam": {"kind": "adam"}, "adam_hd": {"kind": "adam_hd"},
                  "normalized": {"kind": "adam_hd", "rule": "normalized"},
                  "sgd_hd": {"kind": "sgd_hd", "momentum": 0.9}}  # fmt: skip
    cfg = _study(tmp_path, optimizers=optimizers)

    def ids() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for cell in R.expand(cfg):
            out.setdefault(cell["optimizer"], set()).add(cell["id"])
        return out

    before = ids()
    assert all(len(v) == 4 for v in before.values())  # 2 lrs x 2 seeds, distinct
    monkeypatch.setitem(SEEK_DEFAULTS, "ramp_rate", SEEK_DEFAULTS["ramp_rate"] * 1.5)
    after = ids()
    assert after["adam_hd"].isdisjoint(before["adam_hd"])
    assert after["adam"] == before["adam"]
    assert after["normalized"] == before["normalized"]
    assert after["sgd_hd"] == before["sgd_hd"]  # SGD-HD reads SGD_SEEK_DEFAULTS
    monkeypatch.setitem(SGD_SEEK_DEFAULTS, "turn_cut", SGD_SEEK_DEFAULTS["turn_cut"] * 0.5)
    assert ids()["sgd_hd"].isdisjoint(before["sgd_hd"])


def test_records_made_under_other_defaults_are_not_reused(tmp_path, monkeypatch):
    from metalr.functional._controller import SEEK_DEFAULTS

    cfg = _study(tmp_path, lrs=[0.01], seeds=[0],
                 optimizers={"adam": {"kind": "adam"}, "adam_hd": {"kind": "adam_hd"}})  # fmt: skip
    first = {r["optimizer"]: r for r in run_study(cfg, quiet=True)}
    settings = first["adam_hd"]["provenance"]["resolved_settings"]
    assert (
        settings["rule"] == "seek" and settings["seek"]["ramp_rate"] == SEEK_DEFAULTS["ramp_rate"]
    )
    assert "validation" not in settings and first["adam"]["provenance"]["resolved_settings"] is None
    monkeypatch.setitem(SEEK_DEFAULTS, "init_scale", 1.0)  # starts at lr0, no ramp from below
    second = run_study(cfg, quiet=True)
    assert (second.cached, second.ran) == (1, 1)
    again = {r["optimizer"]: r for r in second}
    assert again["adam"]["id"] == first["adam"]["id"]
    assert again["adam_hd"]["provenance"]["resolved_settings"]["seek"]["init_scale"] == 1.0
    assert again["adam_hd"]["final_val_loss"] != first["adam_hd"]["final_val_loss"]
    assert len(read_records(cfg.out_dir)) == 3  # the old record stays in the file, unreported
