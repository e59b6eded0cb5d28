"""Use a model on one's own images: label boxes with a vocabulary, see where a phrase is.

Plain torch, PIL and numpy, no Ray: a notebook, a service or `jobs.predict` load the model once
and call it for many images. The numbers follow the evaluation protocol (docs/design.md), so
`jobs.evaluate`'s box accuracy is the accuracy of these labels:

- the image is squashed whole to the model's input size (`harmoclip.pixels`), never cropped;
- a box's feature is RoIAlign 1x1 of the dense map (`harmoclip.model.pool_regions`);
- a label's embedding is its prompt-template ensemble (`harmoclip.metrics.class_text_embeddings`),
  computed once per label list and kept, so labelling many images encodes the labels once;
- a box's scores are the softmax over the labels of `logit_scale * cosine`, with the model's own
  learned `logit_scale` (CLIP's zero-shot classifier): they sum to 1 over the labels given, so
  they say how the labels compare with each other, not whether any of them is in the box.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from .checkpoint import model_to_use
from .config import ModelConfig
from .metrics import DEFAULT_TEMPLATES, check_class_names, class_text_embeddings
from .model import INFERENCE_METHOD, HarmoCLIP, create_clip, pool_regions
from .pixels import squash_batch
from .validation import image_boxes

# Label lists whose embeddings are kept; a service cycling through more re-encodes the oldest.
LABEL_CACHE_SIZE = 16


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float  # softmax over the label list of logit_scale * cosine


@dataclass(frozen=True)
class BoxLabels:
    box: tuple[float, float, float, float]  # normalised [x0, y0, x1, y1], as given
    top: list[LabelScore]  # best first; equal scores keep the label list's order


class Predictor:
    """One model, loaded once, for box labelling (`classify`) and phrase heatmaps (`heatmap`)."""

    def __init__(self, model: ModelConfig, device: str | torch.device = "cpu") -> None:
        self.config = model
        self.device = torch.device(device)
        self.model = HarmoCLIP(create_clip(model), INFERENCE_METHOD, check_inputs=False).eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model.name)
        self._label_cache: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = OrderedDict()

    @classmethod
    def from_checkpoint(cls, checkpoint: str, model_name: str | None = None,
                        device: str | torch.device = "cpu") -> Predictor:
        """From a jobs.train run or checkpoint folder (it names its architecture), or a weights file
        with `model_name`; local or s3://."""
        return cls(model_to_use(checkpoint, model_name, None), device)

    @property
    def logit_scale(self) -> float:
        """The model's learned softmax scale (exp of `logit_scale`; CLIP caps it at 100)."""
        return self.model.clip.logit_scale.detach().exp().item()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit-norm global text embeddings, as evaluation computes them."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device))[0]

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(C, D) prompt-ensemble embeddings of `labels`, encoded on first use and then kept."""
        check_class_names(labels, "label list")
        key = (tuple(labels), tuple(templates))
        if key not in self._label_cache:
            self._label_cache[key] = class_text_embeddings(self.encode_texts, list(labels), templates)
            if len(self._label_cache) > LABEL_CACHE_SIZE:
                self._label_cache.popitem(last=False)
        self._label_cache.move_to_end(key)
        return self._label_cache[key]

    @torch.no_grad()
    def dense_map(self, image: Image.Image) -> torch.Tensor:
        """(D, h, w) unit-norm dense features of the whole image; location (i, j) covers the
        (i, j) cell of an h x w grid laid over the image."""
        return self.model.encode_image(squash_batch([image], self.model.clip).to(self.device)).dense[0]

    @torch.no_grad()
    def box_scores(self, image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
                   templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(K, C) on the CPU: per box (normalised [x0, y0, x1, y1]), the softmax over `labels` of
        logit_scale * cosine(RoIAlign box feature, label embedding). Each row sums to 1."""
        box_tensor = image_boxes(boxes).to(self.device)
        embeddings = self.label_embeddings(labels, templates)
        mask = torch.ones(1, len(box_tensor), dtype=torch.bool, device=self.device)
        regions = pool_regions(self.dense_map(image)[None], box_tensor[None], mask)[0]
        return (self.logit_scale * regions @ embeddings.T).softmax(dim=-1).cpu()

    def classify(self, image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
                 top_k: int = 5, templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[BoxLabels]:
        """Per box, its `top_k` labels (at most all of them) with their scores, best first."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scores = self.box_scores(image, boxes, labels, templates)
        # A stable sort, so equal scores keep the label list's order on every device.
        order = scores.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
        return [BoxLabels(tuple(float(v) for v in box),
                          [LabelScore(labels[c], float(scores[row, c])) for c in order[row].tolist()])
                for row, box in enumerate(boxes)]

    @torch.no_grad()
    def heatmap(self, image: Image.Image, query: str) -> np.ndarray:
        """(h, w) float32 at the dense map's resolution: the cosine similarity of `query`'s text
        embedding (the text as written, no prompt template) with each location of the image."""
        if not query.strip():
            raise ValueError("the query is empty")
        text = self.encode_texts([query])[0]
        return torch.einsum("d,dhw->hw", text, self.dense_map(image)).float().cpu().numpy()
