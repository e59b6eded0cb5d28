"""The fine-tune regime end to end (small): jobs.demo, then bench.harmony extending it into a
study over two seeds in the same folder, reusing the demo's data, base model and seed-0 arms."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bench import harmony
from harmoclip import HarmoCLIP, MethodConfig, ModelConfig, create_clip
from harmoclip.metrics import class_text_embeddings
from harmoclip.model import pool_regions
from harmoclip.predict import Predictor
from jobs import demo as demo_job
from jobs import evaluate as evaluate_job
from jobs import predict as predict_job
from jobs.regime import Regime

SMALL = ["--base-images", "24", "--base-steps", "4", "--train-images", "24", "--val-images", "12", "--steps", "4",
         "--batch-size", "8", "--checkpoint-every", "4", "--log-every", "2", "--warmup-steps", "2", "--regions", "grid"]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, demo_job.main(["--out", str(out), *SMALL])


def test_demo_fine_tunes_every_arm_from_one_base(demo):
    out, results = demo
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"base", "baseline", "harmoclip"}
    assert saved["base"]["checkpoint"] == str(out / "base")
    for name, config in (("baseline", "gc_only"), ("harmoclip", "harmoclip")):
        assert saved[name]["checkpoint"] == str(out / "runs" / config / "seed0")
        trained = json.loads((out / "runs" / config / "seed0" / "harmoclip.json").read_text())
        assert trained["model"]["init_from"] == str(out / "base")  # every arm fine-tunes the base
        assert trained["method"]["lambda_gc"] == 1.0
    stamp = json.loads((out / "runs" / "harmoclip" / "seed0" / "arm.json").read_text())
    assert stamp["finetune"]["lr"] == Regime.finetune.lr  # flags not given keep the regime's values
    again = evaluate_job.evaluate(saved["harmoclip"]["checkpoint"], str(out / "data" / "val"))
    assert again["box"]["top1"] == saved["harmoclip"]["box"]["top1"]  # the demo's numbers are the checkpoint's
    assert (out / "demo.png").stat().st_size > 10_000
    assert results["baseline"]["protocol"]["model"] == "harmo-tiny"


def test_a_second_demo_into_the_same_folder_prints_the_finished_table(demo, capsys):
    out, results = demo
    stamp = (out / "runs" / "harmoclip" / "seed0" / "open_clip_weights.pt").stat().st_mtime
    again = demo_job.main(["--out", str(out), *SMALL])
    assert again == json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert "holds a finished demo" in printed and demo_job.side_by_side(results).splitlines()[0] in printed
    assert (out / "runs" / "harmoclip" / "seed0" / "open_clip_weights.pt").stat().st_mtime == stamp


def test_demo_draws_val_boxes_labelled_by_both_models(demo):
    out, _ = demo
    examples = out / "examples.png"
    assert examples.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and examples.stat().st_size > 20_000
    pixels = np.asarray(Image.open(examples).convert("RGB"), np.float32)
    assert pixels.shape[1] > 600 and pixels.shape[0] > 2 * pixels.shape[1]  # 4 images, two columns
    assert pixels.std() > 20  # drawn images, not an empty canvas


def _val_boxes(val) -> list[tuple[str, list[dict], list[tuple[float, ...]], list[str]]]:
    """Per val image: its path, its COCO annotations, their boxes normalised by hand, their category names."""
    instances = json.loads((val / "instances.json").read_text())
    name_of = {c["id"]: c["name"] for c in instances["categories"]}
    found = []
    for image in instances["images"]:
        annotations = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
        width, height = image["width"], image["height"]
        boxes = [(x / width, y / height, (x + w) / width, (y + h) / height) for x, y, w, h in
                 (a["bbox"] for a in annotations)]
        found.append((str(val / "images" / image["file_name"]), annotations, boxes,
                      [name_of[a["category_id"]] for a in annotations]))
    return found


class _ByHand:
    """HarmoCLIP read directly, without harmoclip.pixels or harmoclip.predict: the image resized
    whole with PIL and normalised here, pool_regions, the template ensemble, the query's embedding."""

    def __init__(self, checkpoint: str, labels: list[str]) -> None:
        self.model = HarmoCLIP(create_clip(ModelConfig(name="harmo-tiny", init_from=checkpoint))).eval()
        self.tokenizer = open_clip.get_tokenizer("harmo-tiny")
        with torch.no_grad():
            self.labels = class_text_embeddings(lambda texts: self.model.encode_text(self.tokenizer(texts))[0], labels)

    @torch.no_grad()
    def dense(self, path: str) -> torch.Tensor:
        preprocess = self.model.clip.visual.preprocess_cfg
        pixels = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC), np.float32)
        pixels = (pixels / 255 - np.array(preprocess["mean"], np.float32)) / np.array(preprocess["std"], np.float32)
        return self.model.encode_image(torch.from_numpy(pixels.transpose(2, 0, 1))[None]).dense

    def cosines(self, path: str, boxes: list) -> torch.Tensor:
        """(boxes, labels) cosine similarities."""
        mask = torch.ones(1, len(boxes), dtype=torch.bool)
        return pool_regions(self.dense(path), torch.tensor([boxes]), mask)[0] @ self.labels.T

    @torch.no_grad()
    def heat(self, path: str, query: str) -> torch.Tensor:
        text = self.model.encode_text(self.tokenizer([query]))[0][0]
        return torch.einsum("d,dhw->hw", text, self.dense(path)[0])


def test_predictor_reproduces_the_evaluated_box_accuracy(demo):
    out, results = demo
    predictor = Predictor.from_checkpoint(results["harmoclip"]["checkpoint"])
    labels = [c["name"] for c in json.loads((out / "data" / "val" / "instances.json").read_text())["categories"]]
    ranks, by_class = [], {}
    for path, _, boxes, truths in _val_boxes(out / "data" / "val"):
        for box, truth in zip(predictor.classify(Image.open(path), boxes, labels, top_k=5), truths):
            top = [t.label for t in box.top]
            ranks.append(top.index(truth) if truth in top else len(top))
            by_class.setdefault(truth, []).append(ranks[-1] == 0)
    box = results["harmoclip"]["box"]
    assert len(ranks) == box["num_boxes"]
    assert sum(r < 1 for r in ranks) == round(box["top1"] * len(ranks))  # what jobs.evaluate measured
    assert sum(r < 5 for r in ranks) == round(box["top5"] * len(ranks))
    # class by class, not only in total: the same boxes are right, not just as many
    assert {name: (len(hits), sum(hits)) for name, hits in by_class.items()} == \
        {name: (c["boxes"], round(c["top1"] * c["boxes"])) for name, c in box["per_class"].items() if c["boxes"]}


def test_predict_labels_the_box_the_model_knows_and_maps_a_phrase(demo, tmp_path, capsys):
    out, results = demo
    checkpoint = results["harmoclip"]["checkpoint"]
    val = out / "data" / "val"
    labels = [c["name"] for c in json.loads((val / "instances.json").read_text())["categories"]]
    by_hand = _ByHand(checkpoint, labels)
    # The box whose true category the model ranks highest, judged by hand (on our machine the tiny
    # demo model gets 1 of the 26 val boxes right: this one, at rank 0).
    candidates = []
    for path, annotations, boxes, truths in _val_boxes(val):
        cosine = by_hand.cosines(path, boxes)
        for index, truth in enumerate(truths):
            rank = int((cosine[index] > cosine[index, labels.index(truth)]).sum())
            candidates.append((rank, path, annotations, boxes, index, truth))
    rank, path, annotations, boxes, index, truth = min(candidates, key=lambda c: c[0])
    assert rank < 5, "the demo's model ranks no val box's category in its top 5"
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(annotations))  # COCO annotation objects, read by their "bbox"
    query = "a red square"
    predictions = predict_job.main(["--checkpoint", checkpoint, "--image", path, "--boxes", str(boxes_file),
                                    "--labels", ",".join(labels), "--query", query, "--out", str(tmp_path / "out")])

    assert predictions == json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [b["box"] for b in predictions["boxes"]] == [a["bbox"] for a in annotations]
    assert [t["label"] for t in predictions["boxes"][index]["top"]][rank] == truth
    scale = by_hand.model.clip.logit_scale.detach().exp().item()
    for box, row in zip(predictions["boxes"], by_hand.cosines(path, boxes)):
        assert box["top"][0]["label"] == labels[int(row.argmax())]
        assert box["top"][0]["score"] == pytest.approx(float((scale * row).softmax(-1).max()), abs=1e-5)
    heat = by_hand.heat(path, query)
    np.testing.assert_allclose(predictions["queries"][0]["similarity"], heat.numpy(), atol=1e-5)
    assert predictions["queries"][0]["max"] == pytest.approx(float(heat.max()), abs=1e-5)
    for name in ("predictions.png", "query-1.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 300
    best = predictions["boxes"][index]["top"][0]
    assert f"| {best['label']} | {best['score']:.3f} |" in capsys.readouterr().out


def test_harmony_study_extends_the_demo_and_reports_paired_differences(demo, capsys):
    out, demo_results = demo
    base_weights = out / "base" / "open_clip_weights.pt"
    arm_weights = out / "runs" / "harmoclip" / "seed0" / "open_clip_weights.pt"
    stamps = base_weights.stat().st_mtime, arm_weights.stat().st_mtime
    # A WiSE-FT blend of seed 0 first (one evaluation), then seed 1 beside it.
    harmony.main(["--out", str(out), *SMALL, "--seeds", "0", "--only", "gc_only", "harmoclip", "--wise", "harmoclip",
                  "--wise-alphas", "0.5"])
    capsys.readouterr()  # the table below is the second run's
    study = harmony.main(["--out", str(out), *SMALL, "--seeds", "0", "1", "--only", "gc_only", "harmoclip"])
    assert (base_weights.stat().st_mtime, arm_weights.stat().st_mtime) == stamps  # reused, not retrained

    saved = json.loads((out / "harmony.json").read_text())
    assert saved["baseline"] == "gc_only" and set(saved["configs"]) == {"gc_only", "harmoclip", "harmoclip_wise0.5"}
    half = saved["configs"]["harmoclip_wise0.5"]
    assert half["wise"] == {"of": "harmoclip", "alpha": 0.5} and [r["seed"] for r in half["runs"]] == [0]
    blend = json.loads((out / "runs" / "harmoclip_wise0.5" / "seed0" / "harmoclip.json").read_text())
    assert blend["interpolation"]["alpha"] == 0.5 and blend["interpolation"]["start"] == str(out / "base")
    runs = saved["configs"]["harmoclip"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["checkpoint"] == str(out / "runs" / "harmoclip" / "seed0")
    assert runs[0]["val"]["box"]["top1"] == demo_results["harmoclip"]["box"]["top1"]
    assert saved["configs"]["harmoclip"]["method"] == dataclasses.asdict(MethodConfig())
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| harmoclip |"))
    gc = [r["val"] for r in saved["configs"]["gc_only"]["runs"]]
    expected = sum(100 * (r["val"]["box"]["top1"] - g["box"]["top1"]) for r, g in zip(runs, gc)) / 2
    assert f"{expected:+.1f} ±" in row  # the paired box difference, with its interval
    assert study["configs"]["harmoclip"]["runs"][1]["seed"] == 1
    assert "per class, the " in printed and (out / "examples.png").stat().st_size > 0


def test_a_folder_made_with_other_settings_is_refused(demo):
    out, _ = demo
    other = [*SMALL]
    other[other.index("--train-images") + 1] = "30"
    with pytest.raises(SystemExit, match="other settings .*train_images"):
        harmony.main(["--out", str(out), *other, "--seeds", "0"])


@pytest.mark.parametrize("text,message", [("x:lambda_lrc=0.5,gr_mode=distribution", None),
                                          ("x:no_such_field=1", "not a MethodConfig field"),
                                          ("x:gr_mode=sideways", "not one of")])
def test_config_overrides_are_parsed_by_field_type(text, message):
    if message is None:
        name, method = harmony.parse_config(text)
        assert name == "x" and method.lambda_lrc == 0.5 and method.gr_mode == "distribution"
    else:
        with pytest.raises((SystemExit, ValueError), match=message):
            harmony.parse_config(text)


def _results(r1: float, box: float, per_class: float = 0.05) -> dict:
    return {"retrieval": {"i2t": {"r1": r1}, "t2i": {"r1": r1}}, "box": {"top1": box, "macc1": per_class}}


def test_summary_reports_each_split_with_paired_differences():
    study = {"baseline": "gc_only", "base_results": {"holdout": _results(0.4, 0.1)}, "configs": {
        "gc_only": {"runs": [{"seed": s, "val": _results(0.5, 0.1), "holdout": _results(0.5, 0.1 + s / 100)}
                             for s in (0, 1)]},
        "x": {"runs": [{"seed": s, "val": _results(0.5, 0.2), "holdout": _results(0.4, 0.3 + s / 100)}
                       for s in (0, 1)]}}}
    table = harmony.summary_table(study, "holdout")
    assert "| base (no fine-tuning) | - | 40.0 | 10.0 | 5.0 | | | |" in table
    assert "| x | 2 | 40.0 ± 0.0 | 30.5 ± 0.7 | 5.0 ± 0.0 | -10.0 ± 0.0 | +20.0 ± 0.0 | +0.0 ± 0.0 |" in table


def test_per_class_table_pairs_gc_only_with_the_arm_over_common_seeds():
    def run(seed: int, person: float, table: float) -> dict:
        return {"seed": seed, "val": {"box": {"per_class": {"person": {"boxes": 9, "top1": person},
                                                            "dining table": {"boxes": 2, "top1": table}}}}}
    study = {"configs": {"gc_only": {"runs": [run(0, 0.5, 0.0), run(1, 0.7, 0.5)]},
                         "harmoclip": {"runs": [run(0, 0.4, 0.5), run(1, 0.6, 1.0), run(2, 0.1, 0.1)]}}}
    table = harmony.per_class_table(study)
    assert "(seeds 0, 1)" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "boxes" not in line]
    assert rows == ["| person | 9 | 60.0 | 50.0 | -10.0 |", "| dining table | 2 | 25.0 | 75.0 | +50.0 |"]


def test_paired_interval_is_the_t_interval_of_the_differences():
    mean, half = harmony.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4: sd 1
    assert mean == 3.0 and half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) = 4.3027
