"""`temde-hf`: a failing command prints one line and exits non-zero; the traceback only on request."""

from __future__ import annotations

from pathlib import Path

import pytest

from temde_hf import cli


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEMDE_HF_DEBUG", raising=False)
    args = [
        "publish",
        str(tmp_path / "nope"),
        "--repo-id",
        "a/b",
        "--out-dir",
        str(tmp_path / "x"),
        "--dry-run",
    ]
    assert cli.main(args) == 1
    line = _one_line(capsys)
    assert line.startswith("temde-hf publish: error: ") and "nope: no such folder" in line
    assert "--debug" in line


def test_debug_flag_or_environment_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["publish", str(tmp_path / "nope"), "--repo-id", "a/b", "--out-dir", str(tmp_path / "x")]
    monkeypatch.delenv("TEMDE_HF_DEBUG", raising=False)
    with pytest.raises(ValueError, match="no such folder"):
        cli.main([*args, "--debug"])
    monkeypatch.setenv("TEMDE_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="no such folder"):
        cli.main(args)


def test_unexpected_errors_say_how_to_report_them(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEMDE_HF_DEBUG", raising=False)
    # a stand-in sub-command with a bug: int(["x"]) raises TypeError
    monkeypatch.setitem(cli.COMMANDS, "buggy", ("builtins", "int", "a command with a bug"))
    assert cli.main(["buggy", "x"]) == 1
    line = _one_line(capsys)
    assert line.startswith("temde-hf buggy: unexpected TypeError: ") and "report the traceback" in line


@pytest.mark.parametrize("text", ["", "   ", "\u200b", "\u200b\u2060 \ufeff", "\t\n"], ids=repr)
def test_search_refuses_an_empty_or_invisible_text_query_in_one_line(text: str, tmp_path: Path) -> None:
    # embedded as [CLS] [SEP], such a query returned confident nonsense; refused before anything loads
    with pytest.raises(SystemExit) as caught:
        cli.main(["search", "--index", str(tmp_path / "no-index"), "--text", "a dog", "--text", text])
    line = str(caught.value.code)
    assert line.startswith(f"temde-hf search: --text {text!r}: empty or invisible text") and "\n" not in line
    assert "give the words to search for" in line
