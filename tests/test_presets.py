"""Named MethodConfig presets: pinned to docs/method.md's table, and `--method` with field flags."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from harmoclip import MethodConfig
from harmoclip.cli import parse_field_value
from harmoclip.presets import DEFAULT_METHOD, METHOD_PRESETS
from jobs import train as train_job

DOC = Path(__file__).resolve().parent.parent / "docs" / "method.md"


def documented_presets() -> dict[str, tuple[MethodConfig, bool]]:
    """Each row of docs/method.md's preset table as the MethodConfig it describes, and whether the
    docs call it a teacher."""
    section = DOC.read_text().split("## Presets", 1)[1].split("\n## ", 1)[0]
    hints = typing.get_type_hints(MethodConfig)
    presets = {}
    for name, fields, teacher in re.findall(r"^\| `(\w+)` \| (.*?) \| (yes|no)\b.*\|$", section, re.MULTILINE):
        values = {key: parse_field_value(hints[key], value)
                  for key, value in re.findall(r"`(\w+)=([^`]+)`", fields)}
        presets[name] = (MethodConfig(**values), teacher == "yes")
    return presets


def test_every_preset_is_what_docs_method_md_says():
    documented = documented_presets()
    assert set(documented) == set(METHOD_PRESETS)
    for name, (config, teacher) in documented.items():
        assert METHOD_PRESETS[name] == config, name
        assert METHOD_PRESETS[name].needs_anchor == teacher, f"{name}: docs and code disagree on the teacher"


def test_the_paper_preset_is_the_literal_reading():
    paper = METHOD_PRESETS["paper"]
    assert (paper.lexeme_unit, paper.lrc_region_to_lexeme, paper.gr_mode) == ("noun_chunk", True, "contrastive")
    assert (paper.lambda_gc, paper.lambda_lrc, paper.lambda_gr) == (1.0, 1.0, 1.0)
    assert not paper.needs_anchor


def _method(argv: list[str]) -> MethodConfig:
    from harmoclip.cli import method_from_args
    return method_from_args(train_job.build_parser().parse_args(["--data", "d", "--out", "o", *argv]))


def test_method_flag_picks_a_preset_and_field_flags_override_it():
    assert _method([]) == METHOD_PRESETS[DEFAULT_METHOD]
    assert _method(["--method", "paper"]) == METHOD_PRESETS["paper"]
    overridden = _method(["--method", "paper", "--lambda-gr", "2", "--gr-mode", "consistency"])
    assert (overridden.lambda_gr, overridden.gr_mode, overridden.lexeme_unit) == (2.0, "consistency", "noun_chunk")
    # A flag equal to the global default still overrides a preset that changed that field.
    assert _method(["--method", "gc_only", "--lambda-lrc", "1.0"]).lambda_lrc == 1.0


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        _method(["--method", "nope"])
    assert err.value.code == 2 and "--method" in capsys.readouterr().err
