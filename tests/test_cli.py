"""Command lines: every tools/*.py and every ``mimkit`` command answers --help; the dispatcher's errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mimkit.cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=180)


def test_every_command_has_a_tool_and_the_tools_are_the_commands_plus_benchmark():
    assert {COMMANDS[c].module + ".py" for c in COMMANDS} | {"benchmark.py"} == set(TOOLS)
    assert set(COMMANDS) == {c.module.replace("_", "-") for c in COMMANDS.values()}


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help(tool):
    proc = _run(sys.executable, str(REPO / "tools" / tool), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_mimkit_command_answers_help(command):
    proc = _run(sys.executable, "-m", "mimkit.cli.main", command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: mimkit {command} ")


def test_mimkit_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in COMMANDS.items():
        assert [line.split() for line in lines if line.split()[:1] == [name]] == [
            [name, *command.help.split()]
        ]


@pytest.mark.parametrize("argv", [["bogus"], [], ["--bogus"]])
def test_an_unknown_or_missing_command_fails_listing_the_valid_ones(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    if argv != ["--bogus"]:
        assert "valid: " + ", ".join(COMMANDS) in err
    if argv == ["bogus"]:
        assert "unknown command 'bogus'" in err


def test_the_dispatcher_passes_the_arguments_on(tmp_path, capsys):
    out = tmp_path / "shards"
    code = main(
        ["make-shards", "synthetic:shapes?size=16&train=4", str(out), "--shard-size", "2", "--no-progress"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-index.json",
    ]


def test_import_mimkit_does_not_import_the_command_lines():
    code = (
        "import sys, mimkit; print(sorted(m for m in sys.modules if m.split('.')[:2] == ['mimkit', 'cli']))"
    )
    proc = _run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_installed_console_script_runs():
    # the interpreter's own bin directory first: a virtual environment need not be activated
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("mimkit", path=search)
    if script is None:
        pytest.skip("the mimkit console script is not installed (pip install -e .)")
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in COMMANDS)
