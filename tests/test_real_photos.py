"""Real photographs end to end (tests/fixtures/coco-real-mini: eight COCO photos with their human
captions and boxes): prepare -> training steps -> evaluate -> embed -> predict, and what real
inputs bring: crowd boxes, multi-word class names, odd JPEGs (grayscale, CMYK, EXIF-rotated,
very wide or tall), captions with more words than lexeme slots."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from harmoclip import register_tiny_configs
from harmoclip.config import PrepareConfig
from jobs import embed as embed_job
from jobs import evaluate as evaluate_job
from jobs import predict as predict_job
from jobs import train as train_job
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.train_data import BatchSpec, to_model_batch
from tests.conftest import TEST_MODEL

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "coco-real-mini"
PHOTOS, CAPTIONS, BOXES, CROWD = 8, 40, 112, 2


def _shards(folder) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(Path(folder).glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def real(ray_local, micro_weights, tmp_path_factory):
    """The fixture prepared (felzenszwalb regions, and the gt boxes kept) and fine-tuned for a few
    steps from a harmo-micro start with the shipped method (GR anchor: cached targets)."""
    root = tmp_path_factory.mktemp("real")
    data = str(root / "prepared")
    prepare(find_source(str(FIXTURE)), data, PrepareConfig(regions="felzenszwalb", tokenizer=TEST_MODEL, batch_size=8))
    run = str(root / "run")
    train_job.main(["--data", data, "--out", run, "--model", TEST_MODEL, "--pretrained", micro_weights,
                    "--method", "harmoclip", "--steps", "3", "--batch-size", "4", "--warmup-steps", "1",
                    "--checkpoint-every", "3", "--log-every", "1", "--mlflow-uri", f"sqlite:///{root}/mlflow.db"])
    return {"data": data, "run": run, "root": root}


def test_real_photos_prepare_without_a_reject_and_crowd_boxes_are_left_out(real):
    manifest = json.loads((Path(real["data"]) / "dataset.json").read_text())
    counts = manifest["counts"]
    assert (counts["rows_in"], counts["rows_written"], counts["rows_rejected"]) == (CAPTIONS, CAPTIONS, 0)
    rows = _shards(real["data"])
    assert rows.num_rows == CAPTIONS and len(set(rows["image_id"].to_pylist())) == PHOTOS
    gt_per_image = {row["image_id"]: len(row["gt_boxes"]) for row in rows.select(["image_id", "gt_boxes"]).to_pylist()}
    assert sum(gt_per_image.values()) == BOXES - CROWD  # iscrowd boxes are never gt regions
    assert all(len(r) > 0 for r in rows["regions"].to_pylist())  # felzenszwalb found regions in every photo


def test_a_run_on_real_photos_trains_with_cached_anchor_targets(real):
    config = json.loads((Path(real["run"]) / "harmoclip.json").read_text())
    assert config["step"] == 3 and config["method"]["gr_mode"] == "anchor"
    anchors = list((Path(real["data"]) / "anchor_targets").iterdir())
    assert len(anchors) == 1 and (anchors[0] / "anchor.json").exists()


def test_a_run_exports_safetensors_that_plain_open_clip_loads_and_a_model_card(real):
    register_tiny_configs()
    run = Path(real["run"])
    plain = open_clip.create_model(TEST_MODEL, pretrained=str(run / "model.safetensors")).eval()
    ours = open_clip.create_model(TEST_MODEL, pretrained=str(run / "open_clip_weights.pt")).eval()
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(image), ours.encode_image(image))
    card = (run / "MODEL_CARD.md").read_text()
    assert "| method | `harmoclip` |" in card and "teacher in the objective | yes" in card
    assert f'create_model("{TEST_MODEL}", pretrained="{run / "model.safetensors"}")' in card


def test_evaluate_on_real_photos_scores_multi_word_classes_and_not_crowd_boxes(real, tmp_path, capsys):
    results = evaluate_job.main(["--checkpoint", real["run"], "--data", str(FIXTURE)])
    protocol = results["protocol"]
    assert (protocol["images"], protocol["captions"], protocol["boxes"]) == (PHOTOS, CAPTIONS, BOXES - CROWD)
    assert protocol["crowd_boxes_not_scored"] == CROWD
    per_class = results["box"]["per_class"]
    assert per_class["dining table"]["boxes"] == 2 and sum(c["boxes"] for c in per_class.values()) == BOXES - CROWD
    # A vocabulary of multi-word names (one per line): boxes of other classes are left out.
    vocabulary = tmp_path / "classes.txt"
    vocabulary.write_text("dining table\nperson\nhair drier\ntraffic light\n")
    narrowed = evaluate_job.main(["--checkpoint", real["run"], "--data", str(FIXTURE), "--classes", str(vocabulary)])
    assert set(narrowed["box"]["per_class"]) == {"dining table", "person", "traffic light"}
    assert narrowed["protocol"]["classes"] == 4


def test_embed_and_predict_on_real_photos(real, tmp_path):
    record = embed_job.main(["--checkpoint", real["run"], "--data", str(FIXTURE), "--out", str(tmp_path / "emb")])
    counts = record["counts"]
    assert (counts["images_written"], counts["captions_written"], counts["boxes"]) == (PHOTOS, CAPTIONS, BOXES - CROWD)
    photo = FIXTURE / "images" / "000000397133.jpg"
    predictions = predict_job.main(["--checkpoint", real["run"], "--image", str(photo), "--regions", "grid",
                                    "--labels", "dining table,person,broccoli", "--query", "a bowl of broccoli",
                                    "--out", str(tmp_path / "pred")])
    assert predictions["labels"] == ["dining table", "person", "broccoli"]
    assert predictions["boxes"] and all(b["top"][0]["label"] in predictions["labels"] for b in predictions["boxes"])
    assert (tmp_path / "pred" / "predictions.png").exists()


def _odd_jpegs(folder: Path) -> dict[str, tuple[int, int]]:
    """JPEGs real collections hold, made from a fixture photo: grayscale, CMYK, stored sideways
    with an EXIF orientation, very wide, very tall. Returns each file's upright size."""
    photo = Image.open(FIXTURE / "images" / "000000173350.jpg").convert("RGB")
    (folder / "images").mkdir(parents=True)
    photo.convert("L").save(folder / "images" / "gray.jpg")
    photo.convert("CMYK").save(folder / "images" / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer turns the stored pixels 90 degrees clockwise
    photo.transpose(Image.Transpose.ROTATE_90).save(folder / "images" / "sideways.jpg", exif=exif)
    photo.resize((1600, 40)).save(folder / "images" / "wide.jpg")
    photo.resize((30, 1200)).save(folder / "images" / "tall.jpg")
    names = ["gray.jpg", "cmyk.jpg", "sideways.jpg", "wide.jpg", "tall.jpg"]
    captions = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": i, "image_id": i, "caption": "a dog lies next to a white toilet"}
                                for i in range(len(names))]}
    (folder / "captions.json").write_text(json.dumps(captions))
    return {"gray.jpg": photo.size, "cmyk.jpg": photo.size, "sideways.jpg": photo.size, "wide.jpg": (1600, 40),
            "tall.jpg": (30, 1200)}


def test_grayscale_cmyk_exif_rotated_wide_and_tall_jpegs_are_prepared_upright_in_rgb(ray_local, tmp_path):
    sizes = _odd_jpegs(tmp_path / "odd")
    out = tmp_path / "prepared"
    prepare(find_source(str(tmp_path / "odd")), str(out), PrepareConfig(regions="grid", tokenizer=TEST_MODEL))
    rows = {r["image_id"]: r for r in _shards(out).select(["image_id", "image", "width", "height"]).to_pylist()}
    assert set(rows) == set(sizes)
    reference = np.asarray(Image.open(FIXTURE / "images" / "000000173350.jpg").convert("RGB"), np.float32)
    for name, row in rows.items():
        stored = Image.open(io.BytesIO(row["image"]))
        assert stored.mode == "RGB", name
        assert (row["width"], row["height"]) == sizes[name], name  # the upright photo's size
        if name in ("sideways.jpg", "cmyk.jpg"):  # upright and in the photo's colours again
            difference = np.abs(np.asarray(stored.resize(sizes[name]), np.float32) - reference).mean()
            assert difference < 12, (name, difference)


def test_word_lexemes_beyond_the_slots_are_cut_and_counted(real):
    rows = _shards(real["data"]).slice(0, 8)
    context = json.loads((Path(real["data"]) / "dataset.json").read_text())["tokenizer"]["context_length"]
    spec = BatchSpec(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, max_regions=4, max_lexemes=2,
                     context_length=context, tokenizer=TEST_MODEL, lexeme_unit="word")
    batch = to_model_batch(rows, spec)
    roomy = to_model_batch(rows, BatchSpec(**{**spec.__dict__, "max_lexemes": 64}))
    units = roomy["lexeme_mask"].sum(1)
    assert units.max() > 2  # real captions have more content words than two slots
    assert (batch["lexeme_mask"].sum(1) == np.minimum(units, 2)).all()
    assert (batch["lexemes_over_cap"] == units - np.minimum(units, 2)).all() and (roomy["lexemes_over_cap"] == 0).all()


def test_bad_boxes_and_spans_in_prepared_rows_through_the_batch_builder(real):
    """Regions out of the image, inverted or NaN are clipped or dropped (never reach the model as
    invalid boxes); a lexeme span past the caption's end-of-text is an error naming the image."""
    prepared = _shards(real["data"])
    rows = prepared.slice(0, 4).to_pylist()
    context = json.loads((Path(real["data"]) / "dataset.json").read_text())["tokenizer"]["context_length"]
    spec = BatchSpec(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, max_regions=8, max_lexemes=4,
                     context_length=context, tokenizer=TEST_MODEL)
    inside = {"x0": 0.2, "y0": 0.2, "x1": 0.6, "y1": 0.7}
    bad = [{"x0": -0.5, "y0": 0.1, "x1": 1.7, "y1": 0.9},  # beyond the image: clipped to it
           {"x0": 0.6, "y0": 0.1, "x1": 0.2, "y1": 0.9},  # inverted: dropped
           {"x0": float("nan"), "y0": 0.1, "x1": 0.5, "y1": 0.9}]  # NaN: dropped
    template = rows[0]["regions"][0]
    rows[0]["regions"] = [{**template, **box} for box in [inside, *bad]]
    rows[0]["width"] = rows[0]["height"] = 100  # a square image: the crop is the whole image
    table = pa.Table.from_pylist(rows, schema=prepared.schema)
    batch = to_model_batch(table, spec)
    kept = batch["boxes"][0][batch["box_mask"][0]]
    np.testing.assert_allclose(kept, [[0.2, 0.2, 0.6, 0.7], [0.0, 0.1, 1.0, 0.9]], atol=1e-6)

    bad = next(i for i, row in enumerate(rows) if i > 0 and row["lexemes"])
    end_of_text = int(np.argmax(rows[bad]["tokens"]))
    rows[bad]["lexemes"][0] = {**rows[bad]["lexemes"][0], "tok_start": 1, "tok_end": end_of_text + 3}
    table = pa.Table.from_pylist(rows, schema=prepared.schema)
    named = rf"lexeme 0 of sample {bad} \(image {re.escape(rows[bad]['image_id'])}\) ends after"
    with pytest.raises(ValueError, match=named):
        to_model_batch(table, spec)
