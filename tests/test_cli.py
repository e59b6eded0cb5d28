"""One command-line convention across the jobs: every job builds its parser in `build_parser()`;
a boolean flag takes true/false (or nothing, meaning true) and refuses any other word; one
spelling per concept and one meaning per spelling (harmoclip.cli.FLAGS, docs/cli.md); `--verbose`
in every job; test-only flags and deprecated aliases hidden from `--help`, the aliases still
working."""

from __future__ import annotations

import argparse
import collections
import importlib
import re
from pathlib import Path

import pytest

from harmoclip.cli import FLAGS, SYNONYMS, DeprecatedAlias, parse_bool
from harmoclip.config import REGION_SOURCES
from harmoclip.presets import DEFAULT_METHOD

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if "def main(" in p.read_text())
# Values a flag may take a subset of in some jobs (the rest keep their meaning where they appear).
SHARED_CHOICES = {"--regions": REGION_SOURCES}


def parser_of(job: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"jobs.{job}").build_parser()


def visible_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long flag `--help` shows, but --help itself."""
    return {flag: action for action in parser._actions if action.help is not argparse.SUPPRESS
            for flag in action.option_strings if flag.startswith("--") and flag != "--help"}


def hidden_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.help is argparse.SUPPRESS]


def kind(action: argparse.Action) -> tuple:
    """What a flag takes: a value or none, how many, a strict boolean or not."""
    return type(action).__name__, action.nargs, action.const, action.type is parse_bool


def without_default(text: str) -> str:
    return re.sub(r"\s*\(default: [^)]*\)\s*$", "", text)


@pytest.fixture(scope="module")
def flags_by_job() -> dict[str, dict[str, argparse.Action]]:
    return {job: visible_flags(parser_of(job)) for job in JOBS}


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


@pytest.mark.parametrize("job", JOBS)
def test_every_boolean_flag_is_a_strict_true_or_false(job):
    """No store_true flag beside the true/false ones: `--verbose false` works as `--gpu false` does."""
    for flag, action in visible_flags(parser_of(job)).items():
        if isinstance(action.default, bool):
            assert action.type is parse_bool and action.nargs == "?" and action.const is True, flag


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_verbose_and_no_synonym(job):
    flags = visible_flags(parser_of(job))
    assert "--verbose" in flags
    synonyms = {flag: SYNONYMS[flag] for flag in flags if flag in SYNONYMS}
    assert not synonyms, f"jobs.{job} spells a concept another way (old -> the glossary's): {synonyms}"


def test_one_spelling_one_meaning_across_the_jobs(flags_by_job):
    """A glossary flag's help starts with the glossary's meaning in every job; any other flag that
    several jobs share comes from one helper (the same help everywhere); a shared flag takes the
    same kind of value everywhere, and the same values (a subset of them for SHARED_CHOICES)."""
    where = collections.defaultdict(dict)
    for job, flags in flags_by_job.items():
        for flag, action in flags.items():
            where[flag][job] = action
    problems = []
    for flag, actions in sorted(where.items()):
        helps = {job: without_default(action.help or "") for job, action in actions.items()}
        if flag in FLAGS:
            problems += [f"{flag} in jobs.{job}: help should start with {FLAGS[flag]!r}, is {text!r}"
                         for job, text in helps.items() if not text.lower().startswith(FLAGS[flag].lower())]
        elif len(set(helps.values())) > 1:
            problems.append(f"{flag} differs across jobs {sorted(helps)}; add it to harmoclip.cli.FLAGS with its "
                            f"one meaning, or build it with one helper: {helps}")
        if len({kind(action) for action in actions.values()}) > 1:
            problems.append(f"{flag} takes different kinds of value: { {j: kind(a) for j, a in actions.items()} }")
        choices = {job: tuple(action.choices) for job, action in actions.items() if action.choices is not None}
        if flag in SHARED_CHOICES:
            problems += [f"{flag} in jobs.{job}: {values} not drawn, in order, from {SHARED_CHOICES[flag]}"
                         for job, values in choices.items()
                         if list(values) != [v for v in SHARED_CHOICES[flag] if v in values]]
        elif len(set(choices.values())) > 1 or (choices and len(choices) != len(actions)):
            problems.append(f"{flag} takes different values across jobs: {choices}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("job", JOBS)
def test_help_hides_test_only_flags_and_deprecated_aliases(job):
    parser = parser_of(job)
    text = parser.format_help() + parser.format_usage()
    for action in hidden_actions(parser):
        assert isinstance(action, DeprecatedAlias) or all(f.startswith("--inject-") for f in action.option_strings), (
            f"jobs.{job} hides {action.option_strings}: only test-only --inject-* flags and deprecated aliases are "
            "hidden")
        for flag in action.option_strings:
            assert not re.search(re.escape(flag) + r"(?![\w-])", text), f"jobs.{job} --help shows {flag}"
        if isinstance(action, DeprecatedAlias):
            assert action.new in visible_flags(parser), (job, action.option_strings, action.new)
    assert "--inject-" not in text


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_every_default(job):
    """Each visible flag with a default shows it (a method field: the shipped preset's value)."""
    parser = parser_of(job)
    formatter = parser._get_formatter()
    for flag, action in visible_flags(parser).items():
        if action.default in (None, "", []) or isinstance(action, argparse._VersionAction):
            continue
        shown = formatter._get_help_string(action) % {"default": action.default, "prog": parser.prog}
        assert "default" in shown.lower() or f"({DEFAULT_METHOD}: " in shown, f"jobs.{job} {flag}: {shown!r}"


def test_test_only_flags_still_parse():
    from jobs import train
    args = train.build_parser().parse_args(["--data", "d", "--out", "o", "--inject-nan-at-step", "5"])
    assert args.inject_nan_at_step == 5


@pytest.mark.parametrize("job,old,new,required", [
    ("tune", ["--val", "v"], ["--val-data", "v"], ["--data", "d", "--out", "o"]),
    ("predict", ["--labels-file", "c.txt"], ["--classes", "c.txt"], ["--image", "x.png"]),
    ("predict", ["--device", "cuda"], ["--gpu", "true"], ["--image", "x.png", "--labels", "a,b"]),
    ("predict", ["--device", "cpu"], ["--gpu", "false"], ["--image", "x.png", "--labels", "a,b"]),
    ("smoke", ["--device", "cuda:1"], ["--gpu"], []),
    ("make_synthetic", ["--images", "3"], ["--num-images", "3"], ["--out", "o"]),
    ("prepare", ["--batch-size", "8"], ["--rows-per-batch", "8"], ["--out", "o"]),
    ("evaluate", ["--batch-size", "8"], ["--rows-per-batch", "8"], ["--data", "d"]),
    ("embed", ["--batch-size", "8"], ["--rows-per-batch", "8"], ["--data", "d", "--out", "o"]),
])
def test_a_deprecated_alias_still_sets_the_new_flag_and_says_so(job, old, new, required, capsys):
    parser = parser_of(job)
    assert vars(parser.parse_args([*required, *old])) == vars(parser.parse_args([*required, *new]))
    assert f"warning: {old[0]} is deprecated; use {new[0]}" in capsys.readouterr().err


def test_a_deprecated_alias_still_refuses_a_bad_value_and_a_clash(capsys):
    from jobs import predict
    for argv, message in ((["--labels", "a", "--device", "tpu"], "argument --device: expected cpu or cuda"),
                          (["--labels", "a", "--labels-file", "c.txt"], "not allowed with argument --labels")):
        with pytest.raises(SystemExit) as err:
            predict.build_parser().parse_args(["--image", "x.png", *argv])
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_the_glossary_is_documented():
    """docs/cli.md names every glossary flag and every synonym with the flag to use instead."""
    text = (ROOT / "docs" / "cli.md").read_text()
    assert not [flag for flag in FLAGS if f"`{flag}`" not in text]
    assert not [old for old, new in SYNONYMS.items() if f"`{old}`" not in text]
