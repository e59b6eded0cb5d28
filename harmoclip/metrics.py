"""Retrieval and box-classification metrics (docs/evaluation.md), on L2-normalised features.

Similarity is the dot product. Every metric reduces to one number per query: the pessimistic
rank of its best-scoring correct candidate, i.e. how many wrong candidates score *at least as
high*. A hit at k is rank < k. Ties therefore count against the model, which makes the result
independent of any sort's tie order (torch.topk leaves it unspecified, and it differs between CPU
and CUDA) and gives a collapsed embedding (all features equal) zero rather than chance. A k above
the number of candidates is clamped for free: the rank is at most candidates - 1.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)
# Query rows per similarity block: 1024 x 25k texts in float32 is ~100 MB, not 25k x 5k x 4 B at once.
ROW_CHUNK = 1024


def _check_pair(name: str, queries: torch.Tensor, keys: torch.Tensor) -> None:
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"{name}: expected (N, D) and (M, D) features, "
                         f"got {tuple(queries.shape)} and {tuple(keys.shape)}")


def _check_index(name: str, index: torch.Tensor, length: int, bound: int) -> None:
    """Out-of-range ids would silently wrap (negative) or fail deep inside torch: say which tensor."""
    if index.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(index.shape)}")
    if length and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise ValueError(f"{name}: values must lie in [0, {bound}), got [{int(index.min())}, {int(index.max())}]")


def _pessimistic_ranks(queries: torch.Tensor, keys: torch.Tensor,
                       query_groups: torch.Tensor, key_groups: torch.Tensor) -> torch.Tensor:
    """Per query, the number of wrong keys scoring >= its best correct key (correct = same group).

    Computed in blocks of ROW_CHUNK query rows so that only (ROW_CHUNK, M) similarities are alive.
    The correct score is read from the same block as the wrong ones, so exact ties stay exact.
    Returns a CPU LongTensor (N,).
    """
    key_groups = key_groups.to(keys.device)
    ranks = []
    for start in range(0, queries.shape[0], ROW_CHUNK):
        sim = queries[start:start + ROW_CHUNK] @ keys.T
        correct = query_groups[start:start + ROW_CHUNK, None].to(keys.device) == key_groups[None, :]
        best = sim.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((sim >= best) & ~correct).sum(dim=1).cpu())
    return torch.cat(ranks)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """COCO-style recall@k, {"i2t": {"r1": ..}, "t2i": {..}}.

    I2T: an image hits at k if ANY of its captions is in its top k texts (images have several
    captions, and any of them is a correct answer). T2I: a caption hits if its own image is in
    its top k images. `text_to_image[j]` is the index of caption j's image.
    """
    _check_pair("retrieval_recall", image_features, text_features)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if num_images == 0:
        raise ValueError("retrieval needs at least one image, got none")
    _check_index("text_to_image", text_to_image, num_texts, num_images)
    text_to_image = text_to_image.cpu()
    uncaptioned = (torch.bincount(text_to_image, minlength=num_images) == 0).nonzero()
    if uncaptioned.numel():
        raise ValueError(f"image {int(uncaptioned[0])} has no caption: retrieval needs one per image "
                         f"({uncaptioned.numel()} image(s) without)")
    image_ids = torch.arange(num_images)
    ranks = {"i2t": _pessimistic_ranks(image_features, text_features, image_ids, text_to_image),
             "t2i": _pessimistic_ranks(text_features, image_features, text_to_image, image_ids)}
    return {direction: {f"r{k}": (rank < k).float().mean().item() for k in ks} for direction, rank in ranks.items()}


def _accuracies(ranks: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], num_classes: int) -> dict:
    """Micro top-k (every box counts once) and mean per-class top-k (every present class counts once)."""
    boxes_per_class = torch.bincount(labels, minlength=num_classes)
    present = boxes_per_class > 0
    result: dict = {}
    for k in ks:
        hit = (ranks < k).double()
        result[f"top{k}"] = hit.mean().item()
        hits_per_class = torch.bincount(labels, weights=hit, minlength=num_classes)
        result[f"macc{k}"] = (hits_per_class[present] / boxes_per_class[present]).mean().item()
    result["num_boxes"] = int(labels.numel())
    result["num_classes_present"] = int(present.sum())
    return result


def box_classification(region_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5), is_thing: Optional[torch.Tensor] = None) -> dict:
    """Classify each box by cosine against the class embeddings; `labels` are class indices 0..C-1.

    Reports micro top-k and mean per-class top-k over the classes present in `labels` (COCO is
    very imbalanced: micro accuracy alone is mostly "person"), and per class its box count and
    top-1 hits (`per_class`, lists indexed by class). With `is_thing` (C,), also the
    same keys under "thing" and "stuff" for the boxes of each kind; a kind without boxes is left out.
    """
    if labels.numel() == 0:
        raise ValueError("box classification needs at least one ground-truth box, got none")
    _check_pair("box_classification", region_features, class_embeddings)
    num_classes = class_embeddings.shape[0]
    _check_index("labels", labels, region_features.shape[0], num_classes)
    labels = labels.cpu()
    ranks = _pessimistic_ranks(region_features, class_embeddings, labels, torch.arange(num_classes))
    result = _accuracies(ranks, labels, ks, num_classes)
    # Per class index: its boxes and how many of them were right at top-1 (for a per-class table).
    result["per_class"] = {"boxes": torch.bincount(labels, minlength=num_classes).tolist(),
                           "top1_hits": torch.bincount(labels, weights=(ranks < 1).double(),
                                                       minlength=num_classes).long().tolist()}
    if is_thing is not None:
        if is_thing.shape != (num_classes,):
            raise ValueError(f"is_thing: expected shape ({num_classes},), got {tuple(is_thing.shape)}")
        box_is_thing = is_thing.cpu().bool()[labels]
        for name, selected in (("thing", box_is_thing), ("stuff", ~box_is_thing)):
            if selected.any():
                result[name] = _accuracies(ranks[selected], labels[selected], ks, num_classes)
    return result


def check_class_names(names: Sequence[str], what: str = "vocabulary") -> None:
    """Names to classify among: at least one, none blank, none twice (a name given twice would
    share its score between two entries, and a label index could not say which was meant)."""
    if not names:
        raise ValueError(f"the {what} is empty")
    if blank := [position for position, name in enumerate(names) if not name.strip()]:
        raise ValueError(f"the {what} has a blank name at position {blank[0]}")
    if duplicates := sorted({name for name in names if list(names).count(name) > 1}):
        raise ValueError(f"the {what} names these classes more than once: {duplicates}")


def vocabulary_labels(box_classes: Sequence[str], vocabulary: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A custom vocabulary for box classification: `(labels, kept)`, where `kept` (M,) marks the
    boxes whose class name is in `vocabulary` and `labels` are their indices into it.

    The other boxes are left out (their class cannot be named); vocabulary names that no box has
    stay in as distractors, as they would in open-vocabulary use.
    """
    check_class_names(vocabulary)
    index = {name: i for i, name in enumerate(vocabulary)}
    kept = torch.tensor([name in index for name in box_classes], dtype=torch.bool)
    labels = torch.tensor([index[name] for name in box_classes if name in index], dtype=torch.long)
    return labels, kept


def class_text_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: list[str],
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Prompt-template ensemble (C, D): per class, the mean of its template embeddings, renormalised.

    A single prompt is a noisy probe of a class name; averaging unit vectors over templates is the
    standard CLIP remedy. `encode_text` is called once, on the C x T prompts in class-major order.
    """
    if not class_names or not templates:
        raise ValueError(f"need at least one class name and one template, "
                         f"got {len(class_names)} and {len(templates)}")
    if missing := [t for t in templates if "{}" not in t]:
        raise ValueError(f"templates without a '{{}}' slot for the class name: {missing}")
    prompts = [template.format(name) for name in class_names for template in templates]
    # Normalising again is a no-op for unit inputs and makes every template count equally otherwise.
    features = F.normalize(encode_text(prompts), dim=-1).reshape(len(class_names), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean, 0 when either side is 0: a trade-off score that a collapse on one side sinks."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def harmony(results: dict) -> float:
    """The paper's trade-off in one number: harmonic mean of mean R@1 (I2T, T2I) and box top-1."""
    retrieval = results["retrieval"]
    mean_r1 = (retrieval["i2t"]["r1"] + retrieval["t2i"]["r1"]) / 2
    return harmonic_mean(mean_r1, results["box"]["top1"])
