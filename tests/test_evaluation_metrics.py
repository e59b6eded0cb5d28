"""Metrics on hand-built embeddings, with values worked out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harmoclip.metrics import box_classification, class_text_embeddings, harmony, retrieval_recall


def one_hot(indices: list[int], dim: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(indices), dim).float()


def test_perfect_ranking_gives_one():
    images = torch.eye(4)
    texts = one_hot([0, 0, 1, 2, 3, 3], 4)
    result = retrieval_recall(images, texts, torch.tensor([0, 0, 1, 2, 3, 3]))
    assert all(v == 1.0 for direction in result.values() for v in direction.values())


def test_known_confusion():
    # image 2's captions point at image 0's direction: image 2 ranks them only after image 0 would
    images = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0, 0.8]]), dim=-1)
    texts = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0.9, 0, 0.1], [0.9, 0, 0.1]])
    texts = F.normalize(texts, dim=-1)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    result = retrieval_recall(images, texts, owner, ks=(1, 2, 5))
    # I2T: image 0's top text is caption 0 (hit); image 1 -> caption 2 (hit); image 2: cosines
    # 0.6 (captions 0, 1) vs 0.6*0.994+0.8*0.110=0.685 (captions 4, 5): a hit.
    assert result["i2t"]["r1"] == pytest.approx(1.0)
    # T2I: captions 4, 5 are closer to image 0 (0.994) than to image 2 (0.685): misses at 1, hits at 2
    assert result["t2i"]["r1"] == pytest.approx(4 / 6)
    assert result["t2i"]["r2"] == pytest.approx(1.0) and result["t2i"]["r5"] == pytest.approx(1.0)


def test_i2t_counts_any_caption():
    images = torch.eye(2)
    # image 0 has two captions: caption 0 points at image 1, caption 1 at image 0
    texts = F.normalize(torch.tensor([[0.2, 0.98], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    result = retrieval_recall(images, texts, torch.tensor([0, 0, 1]), ks=(1,))
    assert result["i2t"]["r1"] == 1.0  # image 0's top caption is caption 1: one of its own is enough
    assert result["t2i"]["r1"] == pytest.approx(2 / 3)  # caption 0 retrieves image 1


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_recall(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 2]))


def test_micro_and_mean_per_class_differ_on_imbalance():
    classes = torch.eye(3)
    # class 0: four boxes all right; class 1: one box, classified as class 2
    regions = one_hot([0, 0, 0, 0, 2], 3)
    labels = torch.tensor([0, 0, 0, 0, 1])
    result = box_classification(regions, classes, labels)
    assert result["top1"] == pytest.approx(0.8) and result["macc1"] == pytest.approx(0.5)
    assert result["top5"] == 1.0 and result["macc5"] == 1.0  # k clamped to the 3 classes
    assert result["num_boxes"] == 5 and result["num_classes_present"] == 2


def test_thing_stuff_split():
    classes = torch.eye(3)
    regions = one_hot([0, 1, 1], 3)
    labels = torch.tensor([0, 1, 2])
    result = box_classification(regions, classes, labels, is_thing=torch.tensor([True, True, False]))
    assert result["thing"]["top1"] == 1.0 and result["stuff"]["top1"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        box_classification(regions[:0], classes, labels[:0])


def test_template_ensemble_averages_and_normalises():
    calls = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return F.normalize(torch.tensor([[float(len(t)), 1.0] for t in texts]), dim=-1)

    result = class_text_embeddings(encode, ["cat", "zebra"], templates=("a {}.", "the {} here"))
    assert calls == [["a cat.", "the cat here", "a zebra.", "the zebra here"]]
    expected = F.normalize(F.normalize(torch.tensor([[6.0, 1.0], [12.0, 1.0]]), dim=-1).mean(0), dim=0)
    assert torch.allclose(result[0], expected)
    assert torch.allclose(result.norm(dim=-1), torch.ones(2))


def test_harmony_is_the_harmonic_mean():
    results = {"retrieval": {"i2t": {"r1": 0.5}, "t2i": {"r1": 0.3}}, "box": {"top1": 0.6}}
    assert harmony(results) == pytest.approx(2 * 0.4 * 0.6 / 1.0)
    results["box"]["top1"] = 0.0
    assert harmony(results) == 0.0
