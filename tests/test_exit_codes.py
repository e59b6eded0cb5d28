"""Every job's exit code for a user error: 2 and an `error:` line naming the flag or file, found
before the job starts Ray (no test here starts one). A failed run exits 1 (tests/test_tune.py: a
sweep whose trials fail), a finished one 0."""

from __future__ import annotations

import importlib
import re

import pytest

JOBS_ON_RAY = ("prepare", "train", "evaluate", "embed", "tune", "demo")
NOWHERE = "{tmp}/nowhere"

CASES = [
    ("prepare", ["--out", "{tmp}/out"], r"give --input SRC"),
    ("prepare", ["--input", NOWHERE, "--out", "{tmp}/out"], r"nowhere/captions\.json does not exist"),
    ("train", ["--data", NOWHERE, "--out", "{tmp}/run", "--model", "harmo-micro"], r"nowhere has no dataset\.json"),
    ("train", ["--data", NOWHERE, "--out", "{tmp}/run", "--model", "harmo-nano"],
     r"--model harmo-nano: not an open_clip model"),
    ("train", ["--config", "{tmp}/norun/config.json", "--out", "{tmp}/run"], r"--config \S*norun/config\.json"),
    ("evaluate", ["--checkpoint", "{weights}", "--model", "harmo-micro", "--data", NOWHERE],
     r"nowhere/captions\.json does not exist"),
    ("evaluate", ["--checkpoint", "{weights}", "--model", "harmo-nano", "--data", NOWHERE],
     r"--model harmo-nano: not an open_clip model"),
    ("embed", ["--checkpoint", "{weights}", "--model", "harmo-micro", "--data", NOWHERE, "--out", "{tmp}/emb"],
     r"nowhere/captions\.json does not exist"),
    ("predict", ["--checkpoint", "{weights}", "--model", "harmo-micro", "--image", "{tmp}/no.png", "--labels", "a,b",
                 "--out", "{tmp}/out"], r"no\.png does not exist"),
    ("tune", ["--data", NOWHERE, "--val-data", NOWHERE, "--out", "{tmp}/sweep", "--model", "harmo-micro"],
     r"nowhere has no dataset\.json"),
    ("tune", ["--data", NOWHERE, "--val-data", NOWHERE, "--out", "{tmp}/sweep", "--model", "harmo-micro",
              "--max-concurrent", "0"], r"--max-concurrent must be >= 1, got 0"),
    ("embed", ["--checkpoint", "{weights}", "--model", "harmo-micro", "--data", NOWHERE, "--out", "{tmp}/emb",
               "--actors", "0"], r"actors must be >= 1"),
    ("smoke", ["--model", "harmo-micro", "--lambda-lrc", "-1"], r"lambda_lrc must be >= 0"),
    ("smoke", ["--model", "harmo-nano"], r"--model harmo-nano: not an open_clip model"),
    ("demo", ["--out", "{tmp}/demo", "--lambda-lrc", "-1"], r"lambda_lrc must be >= 0"),
    ("demo", ["--out", "{tmp}/demo", "--real", NOWHERE], r"--real \S*nowhere: no corpus/captions\.json"),
    ("make_synthetic", ["--out", "{tmp}/a-file/shapes", "--num-images", "1"], r"a-file"),
    ("interpolate", ["--checkpoint", "{tmp}/norun", "--out", "{tmp}/blends"], r"norun is not a HarmoCLIP checkpoint"),
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A user error is found before the job starts Ray: starting it fails the test."""
    def started() -> None:
        raise AssertionError("the job started Ray before it found the user error")

    for job in JOBS_ON_RAY:
        monkeypatch.setattr(importlib.import_module(f"jobs.{job}"), "init_ray", started)


@pytest.mark.parametrize("job, argv, message", CASES, ids=[f"{job}-{i}" for i, (job, _, _) in enumerate(CASES)])
def test_a_user_error_exits_2_naming_what_to_fix(job, argv, message, micro_weights, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [arg.format(tmp=tmp_path, weights=micro_weights) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"jobs.{job}").main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and errors, (exit_info.value.code, errors)
    assert re.search(message, errors[0]), errors
    assert not (tmp_path / "out").exists()
