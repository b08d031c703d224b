"""A value out of range on `cleave`'s command line fails at once with one line naming the flag: not a
traceback (``--top 0``), an empty answer with exit 0 (``--random -3``), minutes of planning that end in a
misleading message (``--min-top1 5``), or a whole compression job run for nothing (``--out FILE``).
No daemon is needed: each of these fails before one would be called."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cleave_cli.main import main

NOBODY = "127.0.0.1:1"  # nothing listens there: a command that got as far as calling it would fail differently


@pytest.mark.parametrize(
    "argv, message",
    [
        (["infer", "--edge", NOBODY, "--top", "0", "--random", "1"], "argument --top: 0 is not an integer >= 1"),
        (["infer", "--edge", NOBODY, "--random", "-3"], "argument --random: -3 is not an integer >= 0"),
        (["infer", "--edge", NOBODY, "--random", "1", "--timeout", "0"], "argument --timeout: 0 is not a number > 0"),
        (["wait", "--edge", NOBODY, "--timeout", "-1"], "argument --timeout: -1 is not a number > 0"),
        (["status", "--edge", NOBODY, "--timeout", "nan"], "argument --timeout: 'nan' is not a finite number"),
        (["plan", "--model", "resnet18", "--min-top1", "99"], r"argument --min-top1: 99 is not in \[0, 1\]"),
        (["plan", "--model", "resnet18", "--max-rel-error", "-0.1"], "argument --max-rel-error: -0.1 is not a number"),
        (["plan", "--model", "resnet18", "--top", "0"], "argument --top: 0 is not an integer >= 1"),
        (["plan", "--model", "resnet18", "--calibration-inputs", "0"], "argument --calibration-inputs: 0 is not"),
        (["plan", "--model", "resnet18", "--rtt", "ten"], "argument --rtt: 'ten' is not a number"),
    ],
)
def test_an_out_of_range_flag_fails_while_parsing(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_compress_refuses_an_out_that_is_a_file_before_submitting(tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.txt"
    out.write_text("mine")
    argv = ["compress", "--cloud", NOBODY, "--model", "resnet18", "--input-shape", "1,3,32,32", "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"cleave compress: --out {out}: exists and is not a directory"
    assert main(["jobs", "download", "abc", "--cloud", NOBODY, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "--cloud", NOBODY, "--model", "resnet18", "--input-shape", "1,3,x", "--no-wait"],
        ["info", "--cuts", "--model", "resnet18", "--input-shape", "1,3,x"],
    ],
)
def test_a_bad_input_shape_names_the_flag(argv: list[str], capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--input-shape: '1,3,x' is not a shape: integers > 0, comma-separated" in err, err


def test_bundle_names_a_cut_the_model_does_not_have(tmp_path: Path, capsys) -> None:
    argv = ["bundle", "--model", "resnet18", "--input-shape", "1,3,32,32", "--cuts", "layer1,nosuch"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cleave bundle: cuts: no cut 'layer1'; valid cuts include 0 ('x'),"), err
    assert not (tmp_path / "b").exists()


def test_cli_commands_that_need_torch_say_so_where_it_is_missing() -> None:
    import argparse

    from cleave_cli.errors import explain

    missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    message = explain(missing, argparse.Namespace(command="bundle"))
    assert message is not None and "needs torch, which is not installed here" in message
    assert "pip install 'cleave[cloud]'" in message
    assert explain(ModuleNotFoundError("No module named 'mine'", name="mine"), argparse.Namespace()) is None
