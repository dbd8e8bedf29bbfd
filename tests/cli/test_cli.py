"""The ``shiftkit`` command line: help, version, the console script, torch-free help, clean errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shiftkit
from shiftkit.cli import main

COMMANDS = ("learn", "fold", "merge", "extract-lora", "adapt", "inspect", "bench", "zoo", "demo")
# every parser that has its own --help: the subcommands, and zoo's actions
HELP_PATHS = [[c] for c in COMMANDS] + [["zoo", "list"], ["zoo", "prepare"]]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _listed_commands(help_text: str) -> set[str]:
    """The command names in the ``<command>`` section of the top-level help."""
    return {line.split()[0] for line in help_text.splitlines() if line.startswith("    ") and line.split()}


def test_python_m_shiftkit_help_lists_every_command() -> None:
    proc = _run(sys.executable, "-m", "shiftkit", "--help")
    assert proc.returncode == 0, proc.stderr
    assert set(COMMANDS) <= _listed_commands(proc.stdout), proc.stdout
    assert proc.stderr == ""


def test_python_m_shiftkit_version() -> None:
    proc = _run(sys.executable, "-m", "shiftkit", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"shiftkit {shiftkit.__version__}"


def test_installed_console_script_runs() -> None:
    found = shutil.which("shiftkit")
    script = Path(found) if found else Path(sys.executable).parent / "shiftkit"
    assert script.is_file(), "the 'shiftkit' console script is not installed (pip install -e .)"
    proc = _run(str(script), "--help")
    assert proc.returncode == 0, proc.stderr
    assert set(COMMANDS) <= _listed_commands(proc.stdout), proc.stdout


def test_help_does_not_import_torch() -> None:
    # a fresh interpreter: the test process itself has torch loaded already
    code = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from shiftkit.cli import build_parser, main

        texts = {{}}
        for path in [[]] + {HELP_PATHS!r}:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    build_parser().parse_args([*path, "--help"])
                except SystemExit as exit_:
                    assert exit_.code == 0, (path, exit_.code)
            texts[" ".join(path)] = buf.getvalue()
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([]) == 0  # no command: prints the help
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                          "texts": texts}}))
        """
    )
    proc = _run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch"] == [], f"--help imported {result['torch'][:5]}"
    assert set(result["texts"]) == {""} | {" ".join(p) for p in HELP_PATHS}
    assert all(text.startswith("usage: shiftkit") for text in result["texts"].values())


@pytest.mark.parametrize("path", HELP_PATHS, ids=" ".join)
def test_each_command_help_has_an_example(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: shiftkit {' '.join(path)}")
    assert "example" in text.lower()
    # the example is a command line to copy: it starts with the command itself
    assert f"shiftkit {path[0]}" in text.lower().split("example", 1)[1]


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert set(COMMANDS) <= _listed_commands(capsys.readouterr().out)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_file_is_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_text("definitely not a safetensors file")
    assert main(["inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("shiftkit inspect: error:")
    assert str(bad) in captured.err
    assert "Traceback" not in captured.err and len(captured.err.splitlines()) == 1


def test_missing_file_is_exit_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.safetensors"
    assert main(["inspect", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("shiftkit inspect: error:") and str(missing) in captured.err
    assert "Traceback" not in captured.err
