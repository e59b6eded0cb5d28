"""jobs.evaluate on a COCO folder and on its prepared twin; the Ray Data path checked by an oracle."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from ray.data import DataContext

from harmoclip import ModelConfig
from harmoclip.config import InferenceConfig, PrepareConfig
from harmoclip.metrics import retrieval_recall
from harmoclip.model import ImageFeatures, model_shape
from jobs import evaluate as evaluate_job
from pipeline.embedders import ImageEmbedder, TextEmbedder
from pipeline.eval_data import gather
from pipeline.inference_data import read_inference_input
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset

REQUIRED = [("retrieval", "i2t", "r1"), ("retrieval", "i2t", "r5"), ("retrieval", "i2t", "r10"),
            ("retrieval", "t2i", "r1"), ("retrieval", "t2i", "r5"), ("retrieval", "t2i", "r10"),
            ("box", "top1"), ("box", "top5"), ("box", "macc1"), ("box", "macc5"), ("harmony",)]


def _value(results: dict, path: tuple[str, ...]) -> float:
    for key in path:
        results = results[key]
    return results


@pytest.fixture(scope="module")
def weights(micro_weights) -> str:
    return micro_weights


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "val"
    write_shapes_dataset(str(folder), images=12, seed=3, size=48, captions_per_image=2)
    return folder


def test_coco_folder_and_prepared_twin_give_the_same_numbers(ray_local, weights, coco, tmp_path, capsys):
    prepare(find_source(str(coco)), str(tmp_path / "prepared"),
            PrepareConfig(regions="gt", image_format="png", tokenizer="harmo-micro"))
    out = tmp_path / "results.json"
    from_coco = evaluate_job.main(["--checkpoint", weights, "--model", "harmo-micro", "--data", str(coco),
                                   "--out", str(out)])
    from_prepared = evaluate_job.evaluate(weights, str(tmp_path / "prepared"), model_name="harmo-micro")
    for path in REQUIRED:
        assert 0.0 <= _value(from_coco, path) <= 1.0
        assert _value(from_coco, path) == pytest.approx(_value(from_prepared, path), abs=1e-6), path
    protocol = from_coco["protocol"]
    assert protocol["images"] == 12 and protocol["captions"] == 24 and protocol["classes"] == 48
    assert from_coco["box"]["thing"]["top1"] == from_coco["box"]["top1"]  # all shapes are things
    assert json.loads(out.read_text())["retrieval"]["i2t"]["r10"] == from_coco["retrieval"]["i2t"]["r10"]
    printed = capsys.readouterr().out
    assert "12 images, 24 captions" in printed and "harmony" in printed


def test_bare_weights_file_needs_the_model_name(weights):
    with pytest.raises(SystemExit):
        evaluate_job.main(["--checkpoint", weights, "--data", "/nonexistent"])


def test_custom_vocabulary_and_templates_are_used_and_recorded(ray_local, weights, coco, tmp_path, capsys):
    instances = json.loads((coco / "instances.json").read_text())
    name_of = {c["id"]: c["name"] for c in instances["categories"]}
    boxes_per_class = Counter(name_of[a["category_id"]] for a in instances["annotations"])
    chosen = sorted(boxes_per_class)[:2]
    vocabulary = tmp_path / "classes.txt"
    vocabulary.write_text("\n".join([*chosen, "purple elephant"]) + "\n\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a drawing of a {}.\nthe {} shape.\n")
    argv = ["--checkpoint", weights, "--model", "harmo-micro", "--data", str(coco)]

    protocol = evaluate_job.main([*argv, "--classes", str(vocabulary), "--templates", str(templates)])["protocol"]
    assert protocol["classes"] == 3 and protocol["vocabulary"] == str(vocabulary)
    assert protocol["boxes"] == sum(boxes_per_class[name] for name in chosen)
    assert protocol["boxes_left_out"] == sum(boxes_per_class.values()) - protocol["boxes"]
    assert protocol["templates"] == ["a drawing of a {}.", "the {} shape."]
    assert f"({protocol['boxes_left_out']} left out: class not in the vocabulary)" in capsys.readouterr().out

    # A COCO categories json is a vocabulary too; one that names no box's class is refused up front.
    assert evaluate_job.read_vocabulary(str(coco / "instances.json")) == list(name_of.values())
    (tmp_path / "none.txt").write_text("purple elephant\n")
    with pytest.raises(SystemExit):
        evaluate_job.main([*argv, "--classes", str(tmp_path / "none.txt")])
    assert "none of its 1 names is a category of" in capsys.readouterr().err


def _numbered_coco(root) -> None:
    """Image n is one flat colour (red = 20 n + 10), named out of order, with captions "picture n
    ...": an oracle can read n from either side. Picture 5's file is corrupt and one caption is
    blank, so the left-out paths run too."""
    (root / "images").mkdir(parents=True)
    images, captions, boxes = [], [], []
    for n in range(12):
        name = f"{(7 * n) % 12:02d}-photo.png"
        if n == 5:
            (root / "images" / name).write_bytes(b"not a png")
        else:
            Image.new("RGB", (40 + n, 30), (20 * n + 10, 90, 90)).save(root / "images" / name)
        images.append({"id": n, "file_name": name})
        captions += [{"id": 10 * n + k, "image_id": n, "caption": f"picture {n} view {k}"} for k in range(2)]
        boxes.append({"id": n, "image_id": n, "bbox": [2, 2, 20, 20], "category_id": 1})
    captions.append({"id": 999, "image_id": 3, "caption": "  "})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": boxes,
                                                     "categories": [{"id": 1, "name": "patch"}]}))


@pytest.mark.parametrize("in_process_below", [0, 64], ids=["ray_data_actors", "in_process"])
def test_oracle_embedder_gets_every_image_and_caption_right(ray_local, tmp_path, in_process_below):
    """An embedder that maps picture n and each of its captions to the same one-hot vector must
    score R@1 = 1 both ways: anything that misaligns captions, images or ids in the Ray Data path
    (order, rejected rows, batching), or in the in-process path of a small set, breaks it."""
    _numbered_coco(tmp_path / "numbered")
    dim = model_shape(ModelConfig(name="harmo-micro"))[1]

    class OracleImages(ImageEmbedder):
        def encode(self, pixels: torch.Tensor, dense: bool) -> ImageFeatures:
            red = (pixels[:, 0] * self.std[0] + self.mean[0]).mean(dim=(1, 2)) * 255
            number = torch.round((red - 10) / 20).long().clamp(0, dim - 1)
            return ImageFeatures(F.one_hot(number, dim).float(), super().encode(pixels, dense).dense)

    class OracleTexts(TextEmbedder):
        def encode(self, captions: list[str]) -> torch.Tensor:
            return F.one_hot(torch.tensor([int(c.split()[1]) for c in captions]), dim).float()

    global_context = DataContext.get_current().execution_options.preserve_order
    inputs = read_inference_input(str(tmp_path / "numbered"), batch_size=4)
    embeddings = gather(inputs, ModelConfig(name="harmo-micro"), InferenceConfig(batch_size=4),
                        image_embedder=OracleImages, text_embedder=OracleTexts, in_process_below=in_process_below)
    recall = retrieval_recall(embeddings.images, embeddings.texts, embeddings.text_to_image)
    assert recall["i2t"]["r1"] == 1.0 and recall["t2i"]["r1"] == 1.0
    assert embeddings.images.shape[0] == 11 and embeddings.texts.shape[0] == 22
    assert embeddings.skipped == {"image_rejected": 2, "corrupt_image": 1, "empty_caption": 1}
    assert embeddings.regions.shape == (11, dim) and embeddings.labels.tolist() == [1] * 11
    assert DataContext.get_current().execution_options.preserve_order == global_context


def test_a_small_set_embedded_in_process_equals_the_actors_bit_for_bit(ray_local, weights, coco):
    model = ModelConfig(name="harmo-micro", pretrained=weights)
    inputs = read_inference_input(str(coco), batch_size=5)  # 12 images: batches of 5, 5 and 2
    by_actors, in_process = (gather(inputs, model, InferenceConfig(batch_size=5), in_process_below=below)
                             for below in (0, 64))
    for name in ("images", "texts", "text_to_image", "regions", "crops", "labels"):
        assert torch.equal(getattr(in_process, name), getattr(by_actors, name)), name
    assert in_process.skipped == by_actors.skipped


def test_a_set_without_one_readable_image_is_refused_with_the_reasons(ray_local, weights, tmp_path, capsys):
    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"not a png")
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "a shape"}, {"id": 2, "image_id": 2, "caption": "another"}]}))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": [],
                                                     "categories": [{"id": 1, "name": "patch"}]}))
    with pytest.raises(SystemExit) as refused:
        evaluate_job.main(["--checkpoint", weights, "--model", "harmo-micro", "--data", str(root)])
    assert refused.value.code == 2
    assert "no usable image to evaluate on (left out: {'corrupt_image': 1, 'missing_image': 1})" in \
        capsys.readouterr().err
