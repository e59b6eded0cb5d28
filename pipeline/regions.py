"""Region proposals per image, as normalised xyxy boxes capped at K and filtered by size.

Methods: `gt` (the dataset's own instance boxes), `file` (published COCO-format detections),
`grid` (multi-scale grid, CLIPSelf-style) and `felzenszwalb` (graph-based segmentation from
scikit-image: unsupervised, no weights). Boxes outside the image are clipped, degenerate or too
small ones dropped, and both are counted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from scipy import ndimage
from skimage.segmentation import felzenszwalb
from torchvision.ops import nms

from harmoclip.config import PrepareConfig

REGION_TYPE = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()),
                         ("y1", pa.float32()), ("score", pa.float32()), ("source", pa.string())])
GT_BOX_TYPE = pa.struct([("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()),
                         ("y1", pa.float32()), ("category_id", pa.int32())])
GRID_LEVELS = (1, 2, 3, 4)
SEGMENTATION_SIDE = 256  # felzenszwalb runs on a copy at most this large: boxes are normalised anyway
DUPLICATE_IOU = 0.7


@dataclass
class BoxCounts:
    clipped: int = 0
    dropped: int = 0


def normalise_xywh(boxes: list[dict], width: int, height: int, min_size: float,
                   counts: BoxCounts) -> list[tuple[float, float, float, float, dict]]:
    """Pixel [x, y, w, h] -> clipped normalised (x0, y0, x1, y1, original); drops degenerate ones."""
    kept = []
    for box in boxes:
        x0, y0 = box["x"] / width, box["y"] / height
        x1, y1 = x0 + box["w"] / width, y0 + box["h"] / height
        if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
            counts.dropped += 1
            continue
        clipped = (min(max(x0, 0.0), 1.0), min(max(y0, 0.0), 1.0), min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0))
        if clipped[2] - clipped[0] < max(min_size, 1e-6) or clipped[3] - clipped[1] < max(min_size, 1e-6):
            counts.dropped += 1
            continue
        counts.clipped += clipped != (x0, y0, x1, y1)
        kept.append((*clipped, box))
    return kept


def grid_boxes(levels: tuple[int, ...] = GRID_LEVELS) -> list[tuple[float, float, float, float]]:
    """Every cell of an n x n grid for each n, coarse levels first."""
    return [(col / n, row / n, (col + 1) / n, (row + 1) / n) for n in levels for row in range(n) for col in range(n)]


def segment_boxes(image: Image.Image, min_size: float) -> list[tuple[float, float, float, float, float]]:
    """Bounding boxes of felzenszwalb segments, scored by segment area, near-duplicates removed."""
    image = image.convert("RGB")
    image.thumbnail((SEGMENTATION_SIDE, SEGMENTATION_SIDE))
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    labels = felzenszwalb(pixels, scale=100, sigma=0.8, min_size=max(4, (height * width) // 400))
    areas = np.bincount(labels.ravel())
    boxes, scores = [], []
    for label, found in enumerate(ndimage.find_objects(labels + 1)):
        if found is None:
            continue
        rows, cols = found
        box = (cols.start / width, rows.start / height, cols.stop / width, rows.stop / height)
        if box[2] - box[0] < min_size or box[3] - box[1] < min_size or (box[2] - box[0]) * (box[3] - box[1]) > 0.95:
            continue  # too small, or the whole image (background)
        boxes.append(box)
        scores.append(areas[label] / (height * width))
    if not boxes:
        return []
    keep = nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32), DUPLICATE_IOU)
    return [(*boxes[i], float(scores[i])) for i in keep.tolist()]


def propose(row: dict, config: PrepareConfig, counts: BoxCounts, image: Image.Image | None = None) -> list[dict]:
    """The `regions` of one decoded image row, best first, at most `config.max_regions`.
    felzenszwalb segments `image`, or the row's encoded `image` bytes when it is not given."""
    if config.regions == "grid":
        found = [(*box, 1.0) for box in grid_boxes() if box[2] - box[0] >= config.min_region_size]
    elif config.regions == "felzenszwalb":
        found = segment_boxes(image or Image.open(io.BytesIO(row["image"])), config.min_region_size)
    else:
        source_boxes = row["gt_boxes"] if config.regions == "gt" else row["proposals"]
        kept = normalise_xywh(source_boxes or [], row["width"], row["height"], config.min_region_size, counts)
        found = [(x0, y0, x1, y1, float(box.get("score", 1.0))) for x0, y0, x1, y1, box in kept]
        found.sort(key=lambda b: -b[4])  # stable: ties keep file order
    return [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "score": b[4], "source": config.regions}
            for b in found[: config.max_regions]]


def region_stage(batch: pa.Table, config: PrepareConfig) -> pa.Table:
    """Ray Data stage: adds `regions`, normalised `gt_boxes` and the box counters."""
    regions, gt_boxes, clipped, dropped = [], [], [], []
    for row in batch.to_pylist():
        counts = BoxCounts()
        if row["reject_reason"]:
            regions.append(None), gt_boxes.append(None)
        else:
            regions.append(propose(row, config, counts))
            gt_boxes.append(None if row["gt_boxes"] is None else [
                {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "category_id": box["category_id"]}
                for x0, y0, x1, y1, box in normalise_xywh(row["gt_boxes"], row["width"], row["height"], 0.0,
                                                          counts if config.regions != "gt" else BoxCounts())])
        clipped.append(counts.clipped), dropped.append(counts.dropped)
    return (batch.drop_columns(["gt_boxes", "proposals"])
            .append_column("regions", pa.array(regions, pa.list_(REGION_TYPE)))
            .append_column("gt_boxes", pa.array(gt_boxes, pa.list_(GT_BOX_TYPE)))
            .append_column("boxes_clipped", pa.array(clipped, pa.int32()))
            .append_column("boxes_dropped", pa.array(dropped, pa.int32())))
