"""harmoclip.metrics on hand-built unit vectors, every expected value worked out by hand."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from harmoclip import metrics
from harmoclip.metrics import (DEFAULT_TEMPLATES, box_classification, class_text_embeddings, harmonic_mean, harmony,
                               retrieval_recall, vocabulary_labels)


def unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows), dim=-1)


def one_hot(indices: list[int], dim: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(indices), dim).float()


# --- retrieval ---------------------------------------------------------------------------------

def test_perfect_ranking_gives_one_everywhere():
    owner = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    result = retrieval_recall(torch.eye(4), one_hot(owner.tolist(), 4), owner)
    assert result == {"i2t": {"r1": 1.0, "r5": 1.0, "r10": 1.0}, "t2i": {"r1": 1.0, "r5": 1.0, "r10": 1.0}}


def test_known_confusion_image_2_ranks_second():
    images = torch.eye(3)
    texts = unit([[1, 0, 0], [1, 0, 0],  # image 0
                  [0, 0.8, 0.6], [0, 1, 0],  # image 1: caption 2 leans towards image 2
                  [0.96, 0, 0.28], [0.96, 0, 0.28]])  # image 2: both captions lean towards image 0
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    result = retrieval_recall(images, texts, owner, ks=(1, 2, 5))
    # I2T image 2: caption 2 scores 0.6, its own captions 0.28, everything else 0 -> own at position 2.
    assert result["i2t"] == pytest.approx({"r1": 2 / 3, "r2": 1.0, "r5": 1.0})
    # T2I captions 4, 5: image 0 scores 0.96, image 2 0.28 -> second; k=5 > 3 images is clamped.
    assert result["t2i"] == pytest.approx({"r1": 4 / 6, "r2": 1.0, "r5": 1.0})


def test_i2t_counts_any_caption_not_the_first_or_all():
    images = torch.eye(3)
    # image 0's FIRST caption points at image 1; its second caption points at itself
    texts = unit([[0.1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    result = retrieval_recall(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1,))
    assert result["i2t"]["r1"] == 1.0
    assert result["t2i"]["r1"] == pytest.approx(3 / 4)  # caption 0 retrieves image 1


def test_i2t_misses_when_every_caption_is_beaten():
    images = torch.eye(3)[:2]
    # both captions of image 0 score 0.6 for it, but image 1's caption scores 0.8 for image 0
    texts = unit([[0.6, 0, 0.8], [0.6, 0, 0.8], [0.8, 0.6, 0]])
    result = retrieval_recall(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert result["i2t"] == pytest.approx({"r1": 0.5, "r2": 1.0})


def test_t2i_is_computed_separately_from_i2t():
    # caption 0 belongs to image 0 but is closer to image 1: T2I misses it, while I2T still ranks
    # caption 0 first for image 0 (0.6 > 0) and caption 1 first for image 1 (1.0 > 0.8).
    images = torch.eye(2)
    texts = unit([[0.6, 0.8], [0, 1]])
    result = retrieval_recall(images, texts, torch.tensor([0, 1]), ks=(1, 2))
    assert result["i2t"] == {"r1": 1.0, "r2": 1.0}
    assert result["t2i"] == {"r1": 0.5, "r2": 1.0}


def test_ties_count_against_the_model():
    # collapsed embedding: every score ties, so the correct answer is ranked behind every wrong one
    images = torch.ones(3, 2) / 2 ** 0.5
    result = retrieval_recall(images, images.clone(), torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    assert result["i2t"] == result["t2i"] == {"r1": 0.0, "r2": 0.0, "r3": 1.0}


def test_chunked_similarity_matches_one_block(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(7, 5, generator=generator), dim=-1)
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 2, 4, 6, 1, 3])
    texts = F.normalize(images[owner] + 0.8 * torch.randn(len(owner), 5, generator=generator), dim=-1)
    whole = retrieval_recall(images, texts, owner, ks=(1, 2, 3))
    monkeypatch.setattr(metrics, "ROW_CHUNK", 2)
    assert retrieval_recall(images, texts, owner, ks=(1, 2, 3)) == whole


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_recall(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 2]))


def test_bad_caption_owner_is_an_error():
    with pytest.raises(ValueError, match=r"text_to_image: values must lie in \[0, 2\)"):
        retrieval_recall(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="text_to_image: expected shape"):
        retrieval_recall(torch.eye(2), torch.eye(2), torch.tensor([0, 1, 1]))


# --- box classification ------------------------------------------------------------------------

def test_micro_and_mean_per_class_differ_on_imbalance():
    classes = torch.eye(3)
    regions = one_hot([0, 0, 0, 0, 2], 3)  # class 0: four boxes, all right; class 1: one box, called 2
    result = box_classification(regions, classes, torch.tensor([0, 0, 0, 0, 1]))
    assert result["top1"] == pytest.approx(0.8) and result["macc1"] == pytest.approx(0.5)
    assert result["num_boxes"] == 5 and result["num_classes_present"] == 2
    assert "thing" not in result and "stuff" not in result
    # per class, by index: class 0 four boxes all right, class 1 one box wrong, class 2 none
    assert result["per_class"] == {"boxes": [4, 1, 0], "top1_hits": [4, 0, 0]}


def test_top5_clamps_to_the_number_of_classes():
    # the class-1 box scores its own class last of 3 (0.0 < 0.6 < 0.8): top-5 over 3 classes still hits
    regions = unit([[1, 0, 0], [0.8, 0, 0.6]])
    result = box_classification(regions, torch.eye(3), torch.tensor([0, 1]), ks=(1, 2, 5))
    assert (result["top1"], result["top2"], result["top5"]) == (0.5, 0.5, 1.0)
    assert (result["macc1"], result["macc2"], result["macc5"]) == (0.5, 0.5, 1.0)


def test_thing_stuff_split():
    classes = torch.eye(4)
    # things 0, 1: boxes 0, 0 (right), 1 (called 0); stuff 2, 3: boxes 2 (right), 3 (called 2)
    regions = one_hot([0, 0, 0, 2, 2], 4)
    labels = torch.tensor([0, 0, 1, 2, 3])
    result = box_classification(regions, classes, labels, ks=(1,), is_thing=torch.tensor([True, True, False, False]))
    assert result["top1"] == pytest.approx(3 / 5) and result["macc1"] == pytest.approx(2 / 4)
    assert result["thing"] == pytest.approx({"top1": 2 / 3, "macc1": 0.5, "num_boxes": 3, "num_classes_present": 2})
    assert result["stuff"] == pytest.approx({"top1": 0.5, "macc1": 0.5, "num_boxes": 2, "num_classes_present": 2})


def test_split_without_boxes_is_left_out():
    result = box_classification(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), is_thing=torch.tensor([True, True]))
    assert result["thing"]["top1"] == 1.0 and "stuff" not in result


def test_box_errors():
    with pytest.raises(ValueError, match="at least one ground-truth box"):
        box_classification(torch.empty(0, 3), torch.eye(3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 3\)"):
        box_classification(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="is_thing: expected shape"):
        box_classification(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), is_thing=torch.tensor([True]))


# --- prompt ensemble and harmony ---------------------------------------------------------------

def hashed(text: str, dim: int = 8) -> torch.Tensor:
    """A deterministic stand-in for a text encoder: a unit vector from the prompt's sha256."""
    digest = hashlib.sha256(text.encode()).digest()[:dim]
    return F.normalize(torch.tensor([float(b) - 127.5 for b in digest]), dim=0)


def test_template_ensemble_averages_and_normalises():
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return torch.stack([hashed(t) for t in texts])

    names = ["cat", "traffic light", "zebra"]
    result = class_text_embeddings(encode, names)
    assert len(calls) == 1 and len(calls[0]) == len(names) * len(DEFAULT_TEMPLATES) == 18
    assert calls[0][:len(DEFAULT_TEMPLATES)] == [t.format("cat") for t in DEFAULT_TEMPLATES]
    assert result.shape == (3, 8)
    assert torch.allclose(result.norm(dim=-1), torch.ones(3))
    for row, name in zip(result, names):
        expected = F.normalize(torch.stack([hashed(t.format(name)) for t in DEFAULT_TEMPLATES]).mean(0), dim=0)
        assert torch.allclose(row, expected, atol=1e-6)


def test_template_errors():
    with pytest.raises(ValueError, match="slot for the class name"):
        class_text_embeddings(lambda texts: torch.stack([hashed(t) for t in texts]), ["cat"], templates=("a photo",))


def test_harmony_is_the_harmonic_mean_of_mean_r1_and_box_top1():
    results = {"retrieval": {"i2t": {"r1": 0.5}, "t2i": {"r1": 0.3}}, "box": {"top1": 0.6}}
    assert harmony(results) == pytest.approx(2 * 0.4 * 0.6 / (0.4 + 0.6))
    results["box"]["top1"] = 0.0
    assert harmony(results) == 0.0
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5) and harmonic_mean(0.0, 1.0) == 0.0


def test_custom_vocabulary_leaves_out_unnamed_boxes_and_keeps_distractors():
    labels, kept = vocabulary_labels(["cat", "car", "dog", "cat"], ["dog", "cat", "bird"])
    assert kept.tolist() == [True, False, True, True] and labels.tolist() == [1, 0, 1]
    # Kept boxes: a clear cat, a clear dog, and a cat that looks more like a bird.
    regions = torch.stack([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]),
                           torch.tensor([0.0, 0.6, 0.8])])
    with_bird = box_classification(regions, torch.eye(3), labels)  # dog, cat, bird
    assert with_bird["top1"] == pytest.approx(2 / 3)  # the distractor takes the third box
    labels, kept = vocabulary_labels(["cat", "car", "dog", "cat"], ["dog", "cat"])
    assert box_classification(regions, torch.eye(3)[:2], labels)["top1"] == 1.0
    with pytest.raises(ValueError, match="more than once"):
        vocabulary_labels(["cat"], ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="empty"):
        vocabulary_labels(["cat"], [])


def test_custom_templates_make_the_class_embeddings():
    directions = {"a drawing of a cat.": [1.0, 0.0], "a photo of a cat.": [0.0, 1.0]}
    encode = lambda texts: torch.tensor([directions.get(t, [0.6, 0.8]) for t in texts])
    assert torch.allclose(class_text_embeddings(encode, ["cat"], ["a drawing of a {}."]), torch.tensor([[1.0, 0.0]]))
    both = class_text_embeddings(encode, ["cat"], ["a drawing of a {}.", "a photo of a {}."])
    assert torch.allclose(both, F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1))
