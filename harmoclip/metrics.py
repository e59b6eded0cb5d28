"""Retrieval and box-classification metrics (DESIGN section 4), on L2-normalised features.

Ties: rankings use `torch.topk`, which breaks ties by index order, deterministically.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)
ROW_CHUNK = 1024


def _topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most similar keys per query, computed in row chunks to bound memory."""
    k = min(k, keys.shape[0])
    return torch.cat([(chunk @ keys.T).topk(k, dim=1).indices for chunk in queries.split(ROW_CHUNK)])


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """COCO-style recall@k: I2T hits if any of the image's captions is in its top k."""
    num_images = image_features.shape[0]
    counts = torch.bincount(text_to_image, minlength=num_images)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption: retrieval needs one per image")
    top = max(ks)
    i2t = text_to_image[_topk_indices(image_features, text_features, top)]  # (N_img, top) image ids
    t2i = _topk_indices(text_features, image_features, top)  # (N_txt, top)
    own_image = torch.arange(num_images)[:, None]
    result: dict[str, dict[str, float]] = {"i2t": {}, "t2i": {}}
    for k in ks:
        result["i2t"][f"r{k}"] = (i2t[:, :k] == own_image).any(1).float().mean().item()
        result["t2i"][f"r{k}"] = (t2i[:, :k] == text_to_image[:, None]).any(1).float().mean().item()
    return result


def _accuracies(hits: dict[int, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    present = labels.unique()
    out: dict[str, float] = {"num_boxes": int(labels.numel()), "num_classes_present": int(present.numel())}
    for k, hit in hits.items():
        out[f"top{k}"] = hit.float().mean().item()
        out[f"macc{k}"] = torch.stack([hit[labels == c].float().mean() for c in present]).mean().item()
    return out


def box_classification(region_features: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5), is_thing: Optional[torch.Tensor] = None) -> dict:
    """Top-k micro accuracy and mean per-class accuracy (over classes present) of box features."""
    if labels.numel() == 0:
        raise ValueError("box classification needs at least one ground-truth box")
    top = _topk_indices(region_features, class_embeddings, max(ks))
    hits = {k: (top[:, : min(k, top.shape[1])] == labels[:, None]).any(1) for k in ks}
    result: dict = _accuracies(hits, labels)
    if is_thing is not None:
        for name, selected in (("thing", is_thing[labels]), ("stuff", ~is_thing[labels])):
            if selected.any():
                result[name] = _accuracies({k: h[selected] for k, h in hits.items()}, labels[selected])
    return result


def class_text_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: list[str],
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Prompt-template ensemble: the mean of each class's normalised template embeddings, renormalised."""
    prompts = [template.format(name) for name in class_names for template in templates]
    features = encode_text(prompts).reshape(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(features.mean(dim=1), dim=-1)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def harmony(results: dict) -> float:
    """The paper's trade-off in one number: harmonic mean of mean R@1 and box top-1."""
    retrieval = results["retrieval"]
    mean_r1 = (retrieval["i2t"]["r1"] + retrieval["t2i"]["r1"]) / 2
    return harmonic_mean(mean_r1, results["box"]["top1"])
