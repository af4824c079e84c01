"""What a new user types first: ``metalr --help``, ``--version``, ``help``, each command's
``--help``, and a mistyped option value (issue 9, "What a new user hit")."""

from __future__ import annotations

import subprocess
import sys

import pytest

import metalr
from metalr import cli
from metalr.workbench.cli import find_lr_parser


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``metalr argv...`` in-process: (exit status, stdout, stderr); argparse's exits count."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_top_level_help_lists_every_command_with_one_line(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: metalr")
    for command in cli.COMMANDS:
        lines = [ln for ln in out.splitlines() if ln.strip().startswith(command + " ")]
        assert len(lines) == 1, (command, out)
        assert len(lines[0].split(None, 1)[1]) > 10  # a description, not just the name
    assert "--version" in out and "metalr help COMMAND" in out
    assert "Adam vs AdamHD" in out  # not the demo's own usage, but it is listed
    assert "usage: metalr demo" not in out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag):
    code, out, _ = run(capsys, flag)
    assert code == 0
    assert out.strip() == f"metalr {metalr.__version__}"


def test_console_script_help_and_version():
    """Through the installed entry point's module, as a user's shell runs it."""
    for argv, expected in (["--version"], metalr.__version__), (["--help"], "find-lr"):
        proc = subprocess.run([sys.executable, "-m", "metalr.cli", *argv], capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout


@pytest.mark.parametrize(
    ("command", "prog"),
    [
        ("bench-step", "metalr bench-step"),
        ("find-lr", "metalr find-lr"),
        ("meta-train", "metalr meta-train"),
        ("few-shot-eval", "metalr few-shot-eval"),
        ("ablate", "metalr ablate"),
        ("report", "metalr report"),
        ("demo", "metalr demo"),
    ],
)
def test_help_command_and_each_commands_help_name_it(capsys, command, prog):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: {prog} ")
    code, via_help, _ = run(capsys, "help", command)
    assert code == 0 and via_help == out


def test_bench_step_help_does_not_call_itself_bench_step(capsys):
    _, out, _ = run(capsys, "bench-step", "--help")
    assert "bench_step" not in out


def test_find_lr_help_documents_every_option_with_its_default(capsys):
    code, out, _ = run(capsys, "find-lr", "--help")
    assert code == 0
    for action in find_lr_parser()._actions:
        assert action.help, f"--{action.dest} has no help text"
    for option, default in [("--optimizer", "adam"), ("--task", "digits_mlp"),
                            ("--start-lr", "1e-07"), ("--end-lr", "10.0"), ("--steps", "100"),
                            ("--method", "min/10"), ("--out", "range_test.png")]:  # fmt: skip
        assert option in out
        assert f"(default: {default})" in " ".join(out.split()), option
    assert "rmsprop" in out and "schedulefree_adamw" in out  # the allowed kinds are listed


def test_find_lr_unknown_optimizer_names_the_option_and_the_choices(capsys):
    code, out, err = run(capsys, "find-lr", "--optimizer", "nosuch")
    assert code == 2 and out == ""
    assert "--optimizer" in err and "'nosuch'" in err
    for kind in ("adam", "sgd", "adamw", "rmsprop"):
        assert f"'{kind}'" in err
    for kind in ("adam_hd", "sgd_hd", "hyperlr"):  # their rates adapt on top of the swept lr
        assert f"'{kind}'" not in err
    assert "optimizers.optimizer" not in err  # no config path the user never wrote


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr"),
        (["--steps", "1"], "--steps"),
        (["--task", "nosuch"], "--task"),
    ],
)
def test_find_lr_bad_values_name_their_option(capsys, argv, needle):
    code, _, err = run(capsys, "find-lr", *argv)
    assert code == 2 and needle in err


def test_unknown_command_and_unknown_help_topic(capsys):
    code, _, err = run(capsys, "ablte")
    assert code == 2
    assert "unknown command 'ablte'" in err and "did you mean 'ablate'" in err
    assert "metalr --help" in err
    code, _, err = run(capsys, "help", "nosuch")
    assert code == 2 and "unknown command 'nosuch'" in err
