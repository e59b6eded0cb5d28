"""One command-line convention across the jobs: every job builds its parser in `build_parser()`,
and a boolean flag takes true/false (or nothing, meaning true) and refuses any other word."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from harmoclip.cli import parse_bool

JOBS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "jobs").glob("*.py")
              if "def main(" in p.read_text())


@pytest.mark.parametrize("job", JOBS)
def test_every_boolean_flag_of_every_job_is_strict(job):
    parser = importlib.import_module(f"jobs.{job}").build_parser()
    flags = [action for action in parser._actions if action.metavar == "{true,false}"]
    for action in flags:
        assert action.type is parse_bool, action.option_strings
        assert action.type("true") is True and action.type("off") is False
        with pytest.raises(argparse.ArgumentTypeError, match="'ture'"):
            action.type("ture")


def test_a_misspelt_boolean_exits_2_naming_the_flag(capsys):
    from jobs import train
    with pytest.raises(SystemExit) as err:
        train.build_parser().parse_args(["--data", "d", "--out", "o", "--gpu", "ture"])
    assert err.value.code == 2 and "argument --gpu: expected true or false, got 'ture'" in capsys.readouterr().err
    args = train.build_parser().parse_args(["--data", "d", "--out", "o", "--gpu", "--grad-norms", "false"])
    assert args.gpu is True and args.grad_norms is False
