"""harmoclip.predict.Predictor and jobs.predict on a tiny random model: what is computed, what is
kept between images, and how bad input is refused."""

from __future__ import annotations

import json
import re

import boto3
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from harmoclip.metrics import class_text_embeddings
from harmoclip.pixels import squash, squash_batch
from harmoclip.predict import Predictor
from jobs import predict as predict_job
from pipeline.synthetic import write_shapes_dataset

LABELS = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def predictor(micro_weights) -> Predictor:
    return Predictor.from_checkpoint(micro_weights, "harmo-micro")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(folder), images=3, seed=3, size=48, captions_per_image=1)
    return sorted((folder / "images").iterdir())


def _run(weights: str, out, *argv: str) -> dict:
    return predict_job.main(["--checkpoint", weights, "--model", "harmo-micro", "--out", str(out), *argv])


def _direct_scores(predictor: Predictor, image: Image.Image, boxes: list, labels: list[str]) -> torch.Tensor:
    """The box scores written out by hand: torchvision's RoIAlign on the dense map, cosine with the
    template ensembles, softmax of logit_scale x cosine."""
    model = predictor.model
    with torch.no_grad():
        dense = model.encode_image(squash_batch([image], model.clip)).dense
        _, _, height, width = dense.shape
        rois = torch.tensor([[0, x0 * width, y0 * height, x1 * width, y1 * height] for x0, y0, x1, y1 in boxes])
        regions = F.normalize(roi_align(dense, rois, 1, 1.0, -1, True).flatten(1), dim=-1)
        text = class_text_embeddings(lambda texts: model.encode_text(predictor.tokenizer(texts))[0], labels)
        return (model.clip.logit_scale.exp() * regions @ text.T).softmax(-1)


def test_scores_are_a_softmax_over_the_labels_and_top_k_is_ordered(predictor, shapes):
    image = Image.open(shapes[0])
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.1, 0.2, 0.5, 0.9), (0.5, 0.5, 0.75, 0.6)]
    scores = predictor.box_scores(image, boxes, LABELS)
    assert scores.shape == (3, 3)
    assert torch.allclose(scores.sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(scores, _direct_scores(predictor, image, boxes, LABELS), atol=1e-6)
    labelled = predictor.classify(image, boxes, LABELS, top_k=2)
    for row, box in enumerate(labelled):
        assert box.box == boxes[row] and len(box.top) == 2
        expected = sorted(zip(scores[row].tolist(), LABELS), reverse=True)[:2]
        assert [(t.label, t.score) for t in box.top] == [(label, pytest.approx(s)) for s, label in expected]
    assert len(predictor.classify(image, boxes[:1], LABELS, top_k=10)[0].top) == 3  # capped at the label count


def test_label_embeddings_are_encoded_once_for_many_images(micro_weights, shapes):
    predictor = Predictor.from_checkpoint(micro_weights, "harmo-micro")
    encoded = []
    encode_text = predictor.model.encode_text
    predictor.model.encode_text = lambda tokens: encoded.append(len(tokens)) or encode_text(tokens)
    results = [predictor.classify(Image.open(path), [(0.0, 0.0, 1.0, 1.0)], LABELS) for path in shapes]
    assert encoded == [3 * 6]  # one pass over 3 labels x 6 templates, for all three images
    assert predictor.label_embeddings(LABELS) is predictor.label_embeddings(list(LABELS))
    predictor.classify(Image.open(shapes[0]), [(0.0, 0.0, 1.0, 1.0)], LABELS[:2])
    assert encoded == [18, 12]  # another label list is encoded on its own
    assert len({r[0].top[0].score for r in results}) > 1  # the images did differ


def test_heatmap_is_the_cosine_of_the_text_with_each_dense_location(predictor, shapes):
    image = Image.open(shapes[1])
    heat = predictor.heatmap(image, "a red circle")
    with torch.no_grad():
        dense = predictor.model.encode_image(squash_batch([image], predictor.model.clip)).dense[0]
        text = predictor.model.encode_text(predictor.tokenizer(["a red circle"]))[0][0]
    assert heat.shape == (4, 4)  # harmo-micro: 32 px, patches of 8
    expected = np.array([[float(dense[:, i, j] @ text) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(heat, expected, atol=1e-6)
    assert np.abs(heat).max() <= 1.0 + 1e-6


def test_the_whole_image_is_squashed_not_cropped():
    pixels = np.full((20, 80, 3), 128, np.uint8)
    pixels[:, -8:] = (255, 0, 0)  # a red stripe at the right edge, which a centre crop would cut away
    squashed = squash(Image.fromarray(pixels), 16)
    assert squashed.shape == (16, 16, 3) and squashed.dtype == np.uint8
    assert (squashed[:, -1] == (255, 0, 0)).all() and (squashed[:, 0] == 128).all()


@pytest.mark.parametrize("boxes,labels,message", [
    ([], LABELS, "no boxes"),
    ([(0.1, 0.1, 1.2, 0.5)], LABELS, r"box 0 is outside \[0, 1\]: \[0.1.*, 1.2.*\]"),
    ([(0.0, 0.0, 1.0, 1.0), (0.5, 0.1, 0.5, 0.4)], LABELS, r"box 1 has x1 <= x0: \[0.5, 0.1.*, 0.5, 0.4.*\]"),
    ([(0.0, 0.6, 1.0, 0.4)], LABELS, "box 0 has y1 <= y0"),
    ([(0.0, 0.0, 1.0)], LABELS, "box 0 has 3 numbers, not 4"),
    ([(0.0, 0.0, 1.0, 1.0)], [], "the label list is empty"),
    ([(0.0, 0.0, 1.0, 1.0)], ["red circle", "blue square", "red circle"], r"more than once: \['red circle'\]"),
    ([(0.0, 0.0, 1.0, 1.0)], ["red circle", " "], "blank name at position 1"),
])
def test_predictor_names_bad_boxes_and_labels(predictor, shapes, boxes, labels, message):
    with pytest.raises(ValueError, match=message):
        predictor.classify(Image.open(shapes[0]), boxes, labels)


def test_cli_labels_boxes_and_writes_what_it_printed(micro_weights, predictor, shapes, tmp_path, capsys):
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps([[0, 0, 48, 48], {"bbox": [6, 12, 24.5, 30], "score": 0.9}]))
    out = tmp_path / "out"
    predictions = _run(micro_weights, out, "--image", str(shapes[0]), "--boxes", str(boxes_file),
                       "--labels", "red circle, blue square,green star,", "--top-k", "2",
                       "--query", "a red circle", "--query", "a blue square")
    assert predictions == json.loads((out / "predictions.json").read_text())
    assert predictions["labels"] == LABELS and (predictions["width"], predictions["height"]) == (48, 48)
    assert [b["box"] for b in predictions["boxes"]] == [[0, 0, 48, 48], [6, 12, 24.5, 30]]
    image = Image.open(shapes[0])
    direct = _direct_scores(predictor, image, [(0, 0, 1, 1), (6 / 48, 12 / 48, 30.5 / 48, 42 / 48)], LABELS)
    for box, scores in zip(predictions["boxes"], direct):
        best = scores.argsort(descending=True)[:2].tolist()
        assert [t["label"] for t in box["top"]] == [LABELS[c] for c in best]
        assert [t["score"] for t in box["top"]] == pytest.approx(scores[best].tolist(), abs=1e-6)
    for number, query in enumerate(predictions["queries"], 1):
        assert query["heatmap"] == f"query-{number}.png"
        np.testing.assert_allclose(query["similarity"], predictor.heatmap(image, query["query"]), atol=1e-6)
        assert query["max"] == pytest.approx(np.max(query["similarity"]))
        assert Image.open(out / query["heatmap"]).size[0] > 300
    assert Image.open(out / "predictions.png").size[0] > 300
    printed = capsys.readouterr().out
    best = predictions["boxes"][1]["top"][0]
    assert f"| 2 | 6, 12, 24.5, 30 | {best['label']} | {best['score']:.3f} |" in printed
    assert 'query "a blue square"' in printed and str(out / "query-2.png") in printed


def test_cli_labels_region_proposals_or_the_whole_image(micro_weights, shapes, tmp_path):
    grid = _run(micro_weights, tmp_path / "grid", "--image", str(shapes[0]), "--regions", "grid", "--labels", "a,b")
    assert len(grid["boxes"]) == 20 and grid["boxes"][0]["box"] == [0, 0, 48, 48]  # coarse levels first
    assert grid["boxes_from"] == "--regions grid"
    segments = _run(micro_weights, tmp_path / "seg", "--image", str(shapes[1]), "--regions", "felzenszwalb",
                    "--labels", "a,b")
    assert segments["boxes"] and all(0 <= x and 0 <= y and x + w <= 48 and y + h <= 48
                                     for x, y, w, h in (b["box"] for b in segments["boxes"]))
    whole = _run(micro_weights, tmp_path / "whole", "--image", str(shapes[0]), "--labels", "a,b")
    assert [b["box"] for b in whole["boxes"]] == [[0, 0, 48, 48]] and whole["boxes_from"] == "the whole image"


def test_cli_on_a_large_wide_image_keeps_boxes_in_its_pixels(micro_weights, tmp_path):
    pixels = np.full((600, 1600, 3), 90, np.uint8)
    pixels[100:300, 1200:1500] = (220, 30, 30)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    (tmp_path / "boxes.json").write_text(json.dumps([[1200, 100, 300, 200]]))
    predictions = _run(micro_weights, tmp_path / "out", "--image", str(tmp_path / "wide.png"), "--boxes",
                       str(tmp_path / "boxes.json"), "--labels", "a,b", "--query", "red")
    assert (predictions["width"], predictions["height"]) == (1600, 600)
    assert predictions["boxes"][0]["box"] == [1200, 100, 300, 200]
    assert np.shape(predictions["queries"][0]["similarity"]) == (4, 4)
    width, height = Image.open(tmp_path / "out" / "predictions.png").size
    assert width > 2 * height  # drawn in the image's shape, from a shrunk copy


def test_cli_reads_the_image_and_writes_to_s3(micro_weights, shapes, bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="in/x.png", Body=shapes[2].read_bytes())
    predictions = _run(micro_weights, f"s3://{bucket}/out", "--image", f"s3://{bucket}/in/x.png", "--labels", "a,b",
                       "--query", "a")
    written = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert written == {"out/predictions.json", "out/predictions.png", "out/query-1.png"}
    assert json.loads(s3.get_object(Bucket=bucket, Key="out/predictions.json")["Body"].read()) == predictions


@pytest.mark.parametrize("case,message", [
    ("missing image", r"error: \S*nowhere.png does not exist"),
    ("corrupt image", r"error: \S*corrupt.png \(15 bytes\) is not in an image format PIL can read"),
    ("empty labels", "error: the label list is empty"),
    ("repeated label", r"error: the label list names these classes more than once: \['a'\]"),
    ("box outside", r"error: \S*boxes.json: box 1 \[x, y, w, h\] = \[40, 0, 10, 10\] reaches outside the 48x48 image"),
    ("empty box", r"error: \S*boxes.json: box 0 \[x, y, w, h\] = \[4, 4, 0, 10\] has a width or height <= 0"),
    ("not a box", r"error: \S*boxes.json: box 0 must be \[x, y, w, h\] \(4 finite numbers, pixels\), got \[1, 2\]"),
    ("no boxes", r"error: \S*boxes.json holds no boxes"),
    ("bare weights", "error: .*weights.pt is a weights file: say which architecture it is with --model"),
])
def test_cli_refuses_bad_input_with_exit_code_2(micro_weights, shapes, tmp_path, capsys, case, message):
    image, labels, boxes, model = str(shapes[0]), "a,b", None, ["--model", "harmo-micro"]
    if case == "missing image":
        image = str(tmp_path / "nowhere.png")
    elif case == "corrupt image":
        image = str(tmp_path / "corrupt.png")
        (tmp_path / "corrupt.png").write_bytes(b"not a png file!")
    elif case == "empty labels":
        labels = " , "
    elif case == "repeated label":
        labels = "a,b,a"
    elif case == "bare weights":
        model = []
    else:
        boxes = {"box outside": [[0, 0, 10, 10], [40, 0, 10, 10]], "empty box": [[4, 4, 0, 10]],
                 "not a box": [[1, 2]], "no boxes": []}[case]
    argv = ["--checkpoint", micro_weights, *model, "--image", image, "--labels", labels, "--out", str(tmp_path / "out")]
    if boxes is not None:
        (tmp_path / "boxes.json").write_text(json.dumps(boxes))
        argv += ["--boxes", str(tmp_path / "boxes.json")]
    with pytest.raises(SystemExit) as exit_info:
        predict_job.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before anything is written
