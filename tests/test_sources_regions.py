"""Input layouts and region proposal methods, without Ray."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from harmoclip.config import PrepareConfig
from pipeline.images import load_image
from pipeline.regions import BoxCounts, grid_boxes, propose
from pipeline.sources import SourceError, find_source, read_image_rows
from tests.coco_files import good_coco, shape_image

MANIFEST_ROWS = [{"image": "images/0001.png", "caption": "a red square"},
                 {"image": "images/0002.png", "caption": "a blue circle"},
                 {"image": "images/0001.png", "caption": "two shapes"}]


def _write_manifest(root, suffix: str) -> str:
    table = pa.Table.from_pylist(MANIFEST_ROWS)
    path = root / f"manifest{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in MANIFEST_ROWS))
    elif suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_manifests_group_captions_by_image(tmp_path, suffix):
    root = good_coco(tmp_path, count=2)
    rows = read_image_rows(find_source(_write_manifest(root, suffix))).to_pylist()
    assert [r["image_key"] for r in rows] == ["images/0001.png", "images/0002.png"]
    assert rows[0]["image_uri"] == str(root / "images/0001.png")
    assert [c["caption"] for c in rows[0]["captions"]] == ["a red square", "two shapes"]
    assert rows[0]["captions"][0]["sample_id"] != rows[0]["captions"][1]["sample_id"]


def test_manifest_without_the_column_names_it(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"path": "a.png", "caption": "x"}))
    with pytest.raises(SourceError, match=r"m.jsonl: no column 'image'"):
        read_image_rows(find_source(str(path)))
    source = find_source(str(path), image_column="path")
    assert read_image_rows(source).to_pylist()[0]["image_key"] == "a.png"


def test_real_coco_layout_with_explicit_files(tmp_path):
    root = good_coco(tmp_path, count=2)
    (root / "captions.json").rename(root / "captions_val2017.json")
    source = find_source("", images=str(root / "images"), captions=str(root / "captions_val2017.json"),
                         instances=str(root / "instances.json"))
    rows = read_image_rows(source).to_pylist()
    assert len(rows) == 2 and len(rows[0]["gt_boxes"]) == 2
    with pytest.raises(SourceError, match="needs --images"):
        find_source("", captions=str(root / "captions_val2017.json"))


def _decoded_row(index: int = 1) -> dict:
    image = shape_image(index)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"image": buffer.getvalue(), "width": 80, "height": 60,
            "gt_boxes": [{"x": 10, "y": 10, "w": 21, "h": 21, "category_id": 1},
                         {"x": 40, "y": 20, "w": 31, "h": 31, "category_id": 2}],
            "proposals": [{"x": 0, "y": 0, "w": 40, "h": 30, "score": 0.2},
                          {"x": 40, "y": 20, "w": 31, "h": 31, "score": 0.9},
                          {"x": 1, "y": 1, "w": 1, "h": 1, "score": 0.99}]}


def test_grid_regions_are_multiscale_and_capped():
    assert len(grid_boxes()) == 1 + 4 + 9 + 16
    regions = propose(_decoded_row(), PrepareConfig(regions="grid", max_regions=10), BoxCounts())
    assert len(regions) == 10 and regions[0] == {"x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "score": 1.0, "source": "grid"}


def test_file_regions_best_first_and_too_small_dropped():
    counts = BoxCounts()
    regions = propose(_decoded_row(), PrepareConfig(regions="file", proposals="p.json", max_regions=5), counts)
    assert [round(r["score"], 2) for r in regions] == [0.9, 0.2]
    assert counts.dropped == 1 and regions[0]["source"] == "file"


def test_felzenszwalb_finds_the_drawn_shapes():
    regions = propose(_decoded_row(), PrepareConfig(regions="felzenszwalb"), BoxCounts())
    found = torch.tensor([[r["x0"], r["y0"], r["x1"], r["y1"]] for r in regions])
    shapes = torch.tensor([[10 / 80, 10 / 60, 31 / 80, 31 / 60], [40 / 80, 20 / 60, 71 / 80, 51 / 60]])
    assert 0 < len(regions) <= 20
    assert (box_iou(shapes, found).max(dim=1).values > 0.7).all()


def test_reencoding_bounds_the_longer_side(tmp_path):
    path = tmp_path / "big.png"
    shape_image(1, (300, 200)).save(path)
    data, width, height = load_image(str(path), max_pixels=10**6, max_side=120, image_format="png")
    assert (width, height) == (300, 200) and Image.open(io.BytesIO(data)).size == (120, 80)
