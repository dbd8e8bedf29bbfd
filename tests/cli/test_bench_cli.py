"""``shiftkit bench``: help and listing without torch, suite dispatch, clean errors for unknown suites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from shiftkit.cli import bench as bench_cli
from shiftkit.cli import main


def _fresh(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (this one has torch loaded) and return the JSON it prints."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_bench_help_and_list_do_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from shiftkit.cli import main

        out = {}
        for argv in (["bench", "--help"], ["bench", "list"], ["--help"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    code = main(argv)
                except SystemExit as exit_:
                    code = exit_.code
            out[" ".join(argv)] = [code, buf.getvalue()]
        out["torch"] = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
        out["suites"] = sorted(m for m in sys.modules if m.startswith("shiftkit.bench."))
        print(json.dumps(out))
        """
    )
    result = _fresh(code)
    assert result["torch"] == [], f"imported {result['torch']}"
    assert result["suites"] == [], f"imported suite modules at parse time: {result['suites']}"
    code_help, text_help = result["bench --help"]  # type: ignore[misc]
    assert code_help == 0 and text_help.startswith("usage: shiftkit bench")
    assert all(name in text_help for name in ("peft-vader", "recursive", "intrinsic-dim", "list"))
    assert "shiftkit bench peft-vader" in text_help.split("example", 1)[1]
    code_list, text_list = result["bench list"]  # type: ignore[misc]
    assert code_list == 0
    rows = {line.split()[0]: line.split()[1] for line in text_list.splitlines()[2:]}
    assert set(rows) == set(bench_cli.SUITES) and set(rows.values()) <= {"available", "missing"}
    assert rows["peft-vader"] == "available"
    assert "bench" in result["--help"][1]  # type: ignore[index]


def test_suite_help_does_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from shiftkit.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main(["bench", "peft-vader", "--help"])
            except SystemExit as exit_:
                code = exit_.code
        print(json.dumps({"code": code, "text": buf.getvalue(),
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
        """
    )
    result = _fresh(code)
    assert result["code"] == 0 and result["torch"] == []
    text = str(result["text"])
    assert text.startswith("usage: shiftkit bench peft-vader")
    assert all(opt in text for opt in ("--quick", "--full", "--methods", "--all-domains", "--train-domain"))
    assert "shiftkit bench peft-vader --quick" in text


def test_unknown_suite_is_exit_2_with_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "peft-vadr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shiftkit bench: error: unknown suite 'peft-vadr'")
    assert "Did you mean 'peft-vader'" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_suite_missing_from_the_install_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(bench_cli.SUITES, "ghost", "shiftkit.bench.no_such_suite")
    assert main(["bench", "ghost", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "suite 'ghost' is not available" in err and "shiftkit.bench.no_such_suite" in err
    assert main(["bench", "list"]) == 0
    assert "ghost" in (out := capsys.readouterr().out) and "missing" in out


def test_bad_suite_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "peft-vader", "--frobnicate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "shiftkit bench peft-vader" in err and "--frobnicate" in err


def test_suite_receives_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(args: object) -> int:
        seen["args"] = args
        return 0

    import shiftkit.bench.peft_vader as pv

    monkeypatch.setattr(pv, "run", fake_run)
    argv = ["--quick", "--methods", "lora", "ia3", "--train-domain", "nyt", "--out", "x"]
    assert main(["bench", "peft-vader", *argv]) == 0
    args = seen["args"]
    assert args.quick and args.methods == ["lora", "ia3"] and args.train_domain == "nyt"  # type: ignore[attr-defined]
    assert args.out == "x" and not args.all_domains  # type: ignore[attr-defined]
