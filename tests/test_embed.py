"""jobs.embed: every row accounted for, embeddings equal to the model's own forward, the same
bytes on a re-run, a non-empty --out refused, and the same through s3:// on the moto server."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.model import pool_regions
from jobs import embed as embed_job
from pipeline.embed import _InputOrder
from tests.coco_files import good_coco

IMAGE_SIZE = (80, 60)  # good_coco's images


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Five good images with two captions and two boxes each, plus a corrupt image with two
    captions and a blank caption on image 1."""
    root = good_coco(tmp_path_factory.mktemp("embed") / "coco", count=5)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG but not really")
    captions = json.loads((root / "captions.json").read_text())
    captions["images"].append({"id": 99, "file_name": "broken.png"})
    captions["annotations"] += [{"id": 990, "image_id": 99, "caption": "a shape"},
                                {"id": 991, "image_id": 99, "caption": "two shapes"},
                                {"id": 992, "image_id": 1, "caption": " "}]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


@pytest.fixture(scope="module")
def local_run(ray_local, micro_weights, coco, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("embeddings") / "out"
    record = embed_job.main(["--checkpoint", micro_weights, "--model", "harmo-micro", "--data", str(coco),
                             "--out", str(out), "--rows-per-batch", "2", "--rows-per-shard", "3"])
    return out, record


def _direct(weights: str, coco: Path, image_ids: list[str], captions: list[str]):
    """The model's forward, computed here without Ray: the whole image resized to the input size
    (bicubic, no crop), normalised with the model's mean/std; regions by RoIAlign on each box."""
    harmo = HarmoCLIP(create_clip(ModelConfig(name="harmo-micro", pretrained=weights))).eval()
    size = harmo.image_size[0]
    preprocess = harmo.clip.visual.preprocess_cfg
    instances = json.loads((coco / "instances.json").read_text())
    name_to_id = {image["file_name"]: image["id"] for image in instances["images"]}
    pixels, boxes = [], []
    for image_id in image_ids:
        image = Image.open(coco / "images" / image_id).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, np.float32) / 255.0
        pixels.append(((array - preprocess["mean"]) / np.array(preprocess["std"])).transpose(2, 0, 1))
        boxes.append([[x / IMAGE_SIZE[0], y / IMAGE_SIZE[1], (x + w) / IMAGE_SIZE[0], (y + h) / IMAGE_SIZE[1]]
                      for x, y, w, h in (a["bbox"] for a in instances["annotations"]
                                         if a["image_id"] == name_to_id[image_id])])
    with torch.no_grad():
        features = harmo.encode_image(torch.tensor(np.stack(pixels), dtype=torch.float32), dense=True)
        box_tensor = torch.tensor(boxes, dtype=torch.float32)
        regions = pool_regions(features.dense, box_tensor, torch.ones(box_tensor.shape[:2], dtype=torch.bool))
        texts = harmo.encode_text(open_clip.get_tokenizer("harmo-micro")(captions))[0]
    return features.global_.numpy(), regions.numpy(), texts.numpy()


def _array(column) -> np.ndarray:
    return np.array(column.to_pylist(), dtype=np.float32)


def test_every_row_is_written_or_rejected_and_equals_the_models_forward(local_run, micro_weights, coco):
    out, record = local_run
    counts = record["counts"]
    assert (counts["images_in"], counts["images_written"], counts["images_rejected"]) == (6, 5, 1)
    assert (counts["captions_in"], counts["captions_written"], counts["captions_rejected"]) == (13, 10, 3)
    assert counts["rejected_by_reason"] == {"corrupt_image": 1, "empty_caption": 1, "image_rejected": 2}
    assert counts["boxes"] == 10 and record["dimension"] == 32 and record["dtype"] == "float32"
    assert (counts["image_shards"], counts["caption_shards"]) == (2, 4)  # 3 rows per shard, cut in order
    assert [p.name for p in sorted((out / "images").iterdir())] == ["part-00000.parquet", "part-00001.parquet"]
    assert json.loads((out / "embeddings.json").read_text())["counts"] == counts

    images = pq.read_table(out / "images")
    captions = pq.read_table(out / "captions")
    rejects = pq.read_table(out / "rejects")
    assert images.num_rows + sum(r == "image" for r in rejects["stage"].to_pylist()) == counts["images_in"]
    assert captions.num_rows + sum(r == "caption" for r in rejects["stage"].to_pylist()) == counts["captions_in"]
    assert images["image_id"].to_pylist() == [f"{i:04d}.png" for i in range(1, 6)]  # source order
    assert images["box_labels"].to_pylist() == [[1, 2]] * 5
    assert {r["image_id"]: r["reason"] for r in rejects.to_pylist() if r["stage"] == "image"} == \
        {"broken.png": "corrupt_image"}

    image_features, regions, texts = _direct(micro_weights, coco, images["image_id"].to_pylist(),
                                             captions["caption"].to_pylist())
    np.testing.assert_allclose(_array(images["image_embedding"]), image_features, atol=1e-5)
    np.testing.assert_allclose(np.array(images["region_embeddings"].to_pylist(), np.float32), regions, atol=1e-5)
    np.testing.assert_allclose(_array(captions["caption_embedding"]), texts, atol=1e-5)
    assert captions["image_id"].to_pylist() == [f"{i:04d}.png" for i in range(1, 6) for _ in range(2)]


def test_a_rerun_writes_the_same_bytes_and_a_full_out_is_refused(local_run, micro_weights, coco, capsys,
                                                                  cpu_burner):
    out, _ = local_run
    shards = sorted(out.glob("*/*.parquet"))  # images, captions and rejects
    assert {path.parent.name for path in shards} == {"images", "captions", "rejects"}
    before = {path: path.read_bytes() for path in shards}
    summary = json.loads((out / "embeddings.json").read_text())
    argv = ["--checkpoint", micro_weights, "--model", "harmo-micro", "--data", str(coco), "--out", str(out),
            "--rows-per-batch", "2", "--rows-per-shard", "3"]
    with pytest.raises(SystemExit) as refused:
        embed_job.main(argv)
    assert refused.value.code == 2 and "already holds files" in capsys.readouterr().err
    with cpu_burner():  # the first run had the machine to itself
        embed_job.main([*argv, "--overwrite"])
    assert sorted(out.glob("*/*.parquet")) == shards
    assert all(path.read_bytes() == data for path, data in before.items())
    again = json.loads((out / "embeddings.json").read_text())
    when = ("seconds", "created_at")  # the only keys a rerun may change
    assert {k: v for k, v in again.items() if k not in when} == {k: v for k, v in summary.items() if k not in when}
    assert set(summary) > set(when)


def test_s3_in_and_out_with_float16(local_run, micro_weights, coco, s3_server, bucket):
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in coco.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"coco/{path.relative_to(coco)}")
    out = f"s3://{bucket}/embeddings"
    record = embed_job.main(["--checkpoint", micro_weights, "--model", "harmo-micro", "--data", f"s3://{bucket}/coco",
                             "--out", out, "--what", "image,text", "--dtype", "float16"])
    local_out, local_record = local_run
    assert record["counts"]["images_written"] == 5 and record["counts"]["captions_written"] == 10
    assert record["parts"] == ["image", "text"]
    filesystem = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http")
    remote = pq.read_table(f"{bucket}/embeddings/images", filesystem=filesystem)
    assert "region_embeddings" not in remote.column_names
    assert str(remote.schema.field("image_embedding").type) == "fixed_size_list<element: halffloat>[32]"
    local = pq.read_table(local_out / "images")
    assert remote["image_uri"].to_pylist() == [f"s3://{bucket}/coco/images/{i:04d}.png" for i in range(1, 6)]
    np.testing.assert_allclose(_array(remote["image_embedding"]), _array(local["image_embedding"]), atol=2e-3)
    with filesystem.open_input_stream(f"{bucket}/embeddings/embeddings.json") as stream:
        assert json.loads(stream.read())["counts"]["rejected_by_reason"] == \
            local_record["counts"]["rejected_by_reason"]


def test_prepared_dataset_with_grid_boxes_and_manifest_with_felzenszwalb(ray_local, prepared, micro_weights, coco,
                                                                         tmp_path):
    """The other sources and box methods: a prepared dataset (one image row kept per image, however
    many caption rows) with the multi-scale grid, and a manifest (no ground truth) with
    felzenszwalb segments."""
    argv = ["--checkpoint", micro_weights, "--model", "harmo-micro", "--what", "image,regions"]
    record = embed_job.main([*argv, "--data", prepared, "--out", str(tmp_path / "grid"), "--regions", "grid"])
    images = pq.read_table(tmp_path / "grid" / "images")
    assert record["counts"]["images_in"] == images.num_rows == 16 and record["counts"]["images_rejected"] == 0
    assert images["image_id"].to_pylist() == sorted(images["image_id"].to_pylist())  # the dataset's order
    assert {len(boxes) for boxes in images["boxes"].to_pylist()} == {20}  # 30 grid cells, capped at --max-regions
    assert images["box_labels"].to_pylist()[0] == [None] * 20

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(coco / "images" / f"{i:04d}.png"), "caption": f"shape {i}"})
                                + "\n" for i in range(1, 4)))
    with pytest.raises(SystemExit):  # a manifest has no ground-truth boxes
        embed_job.main([*argv, "--data", str(manifest), "--out", str(tmp_path / "gt")])
    record = embed_job.main([*argv, "--data", str(manifest), "--out", str(tmp_path / "segments"),
                             "--regions", "felzenszwalb", "--min-region-size", "0.1"])
    segments = pq.read_table(tmp_path / "segments" / "images")
    assert segments.num_rows == 3 and record["counts"]["boxes"] == sum(len(b) for b in segments["boxes"].to_pylist())
    assert all(boxes for boxes in segments["boxes"].to_pylist())  # every image has its two shapes segmented
    assert segments["width"].to_pylist() == [80, 80, 80]


def test_images_out_of_input_order_fail_instead_of_writing_other_bytes():
    order = _InputOrder(pa.chunked_array([["a.png", "a.png", "b.png", "c.png"]]))
    order.check(["a.png", "no-captions.png", "b.png"])
    with pytest.raises(RuntimeError, match="a.png came back from the model out of input order"):
        order.check(["a.png"])
