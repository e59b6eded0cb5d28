"""The synthetic shapes data: valid COCO, deterministic, and captions/boxes that match the drawing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from harmoclip.batch import COLORS, SHAPES
from jobs.make_synthetic import main
from pipeline.sources import categories, find_source
from pipeline.synthetic import RGB, ShapeObject, make_scene, relations, write_shapes_dataset

IMAGES = 12


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(out), IMAGES, seed=7)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path) -> tuple[dict, dict]:
    return (json.loads((root / "captions.json").read_text()), json.loads((root / "instances.json").read_text()))


def test_files_are_valid_coco(shapes: Path):
    captions, instances = _load(shapes)
    images = {image["id"]: image for image in captions["images"]}
    assert len(images) == IMAGES and instances["images"] == captions["images"]
    for image in images.values():
        assert re.fullmatch(r"\d{12}\.png", image["file_name"]) and int(image["file_name"][:12]) == image["id"]
        with Image.open(shapes / "images" / image["file_name"]) as png:
            assert png.size == (image["width"], image["height"]) == (64, 64) and png.mode == "RGB"
    assert len(list((shapes / "images").iterdir())) == IMAGES
    assert len(captions["annotations"]) == 5 * IMAGES
    assert all(a["image_id"] in images and a["caption"] for a in captions["annotations"])
    assert len({a["id"] for a in captions["annotations"]}) == len(captions["annotations"])

    names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    assert [c["name"] for c in instances["categories"]] == names
    assert [c["id"] for c in instances["categories"]] == list(range(1, 49))
    assert all(c["isthing"] == 1 and c["supercategory"] == "shape" for c in instances["categories"])
    per_image: dict[int, int] = {}
    for box in instances["annotations"]:
        assert box["image_id"] in images and 1 <= box["category_id"] <= 48 and box["iscrowd"] == 0
        x, y, w, h = box["bbox"]
        assert all(isinstance(v, float) for v in box["bbox"])
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
        assert 0 < box["area"] <= w * h
        per_image[box["image_id"]] = per_image.get(box["image_id"], 0) + 1
    assert set(per_image) == set(images) and all(1 <= n <= 4 for n in per_image.values())
    # The project's own COCO reader accepts the folder as it is.
    source = find_source(str(shapes))
    assert source.instances and len(categories(source.instances)) == 48


def test_same_seed_gives_identical_files_and_another_seed_does_not(shapes: Path, tmp_path: Path):
    write_shapes_dataset(str(tmp_path / "again"), IMAGES, seed=7)
    write_shapes_dataset(str(tmp_path / "other"), IMAGES, seed=8)
    reference = _hashes(shapes)
    assert {"captions.json", "instances.json"} <= set(reference) and len(reference) == IMAGES + 2
    assert _hashes(tmp_path / "again") == reference
    other = _hashes(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert all(other[name] != reference[name] for name in reference)


def test_captions_name_every_object_with_correct_articles(shapes: Path):
    captions, instances = _load(shapes)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[str]] = {}
    for box in instances["annotations"]:
        objects.setdefault(box["image_id"], []).append(names[box["category_id"]])
    texts: dict[int, list[str]] = {}
    for annotation in captions["annotations"]:
        texts.setdefault(annotation["image_id"], []).append(annotation["caption"])
    for image_id, image_captions in texts.items():
        assert len(set(image_captions)) == len(image_captions), image_captions
        for text in image_captions:
            for name in objects[image_id]:
                assert name in text, (name, text)
            assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou]", text), text


def test_boxes_do_not_overlap_and_match_the_drawing(shapes: Path):
    _, instances = _load(shapes)
    colors = {c["id"]: RGB[c["name"].split()[0]] for c in instances["categories"]}
    by_image: dict[int, list[dict]] = {}
    for box in instances["annotations"]:
        by_image.setdefault(box["image_id"], []).append(box)
    for image_id, boxes in by_image.items():
        pixels = np.asarray(Image.open(shapes / "images" / f"{image_id:012d}.png").convert("RGB")).astype(int)
        for i, a in enumerate(boxes):
            ax, ay, aw, ah = a["bbox"]
            for b in boxes[i + 1:]:
                bx, by, bw, bh = b["bbox"]
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (a, b)
            x0, y0, x1, y1 = int(ax), int(ay), int(ax + aw), int(ay + ah)
            is_object = (pixels == colors[a["category_id"]]).all(axis=-1)
            assert is_object[(y0 + y1) // 2, (x0 + x1) // 2], a  # every shape is filled at its box centre
            inside = is_object[y0:y1, x0:x1]
            # Tight box: the object touches all four sides, and all of its pixels are inside.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), a
            assert inside.sum() == a["area"], a  # every drawn pixel has the colour and lies in the box
            ring = is_object[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1]
            assert ring.sum() == inside.sum(), a  # nothing of that colour just outside the box
            if a["category_id"] in {c * len(SHAPES) + SHAPES.index("square") + 1 for c in range(len(COLORS))}:
                assert inside.all(), a  # a square fills its box


def test_relation_words_follow_box_centres():
    def at(x: int, y: int) -> ShapeObject:
        return ShapeObject("red", "circle", "small", (x, y, x + 10, y + 10), 80)

    assert relations(at(0, 0), at(30, 5)) == ("left of", "next to")
    assert relations(at(30, 5), at(0, 0)) == ("right of", "next to")
    assert relations(at(5, 0), at(0, 30)) == ("above",)
    assert relations(at(0, 30), at(5, 0)) == ("below",)

    checks = {"left of": lambda dx, dy: dx < 0 and abs(dx) >= abs(dy),
              "right of": lambda dx, dy: dx > 0 and abs(dx) >= abs(dy),
              "next to": lambda dx, dy: abs(dx) >= abs(dy),
              "above": lambda dx, dy: dy < 0 and abs(dy) > abs(dx),
              "below": lambda dx, dy: dy > 0 and abs(dy) > abs(dx)}
    used = set()
    for image_id in range(1, 41):
        scene = make_scene(3, image_id)
        for caption in scene.captions:
            if caption.relation is None:
                continue
            a, word, b = caption.relation
            (ax, ay), (bx, by) = scene.objects[a].center, scene.objects[b].center
            assert checks[word](ax - bx, ay - by), (caption, scene.objects)
            phrase = re.escape(scene.objects[a].name) + r" (is )?" + word + r" an? (small |large )?" + re.escape(
                scene.objects[b].name)
            assert re.search(phrase, caption.text), caption
            used.add(word)
    assert used == set(checks)


def test_cli_main_writes_the_folder_and_rejects_bad_arguments(tmp_path: Path, capsys):
    counts = main(["--out", str(tmp_path / "cli"), "--num-images", "3", "--seed", "1", "--size", "48",
                   "--captions-per-image", "2"])
    assert counts["images"] == 3 and counts["captions"] == 6 and counts["categories"] == 48
    captions, instances = _load(tmp_path / "cli")
    assert len(captions["annotations"]) == 6 and len(instances["annotations"]) == counts["objects"]
    assert all(image["width"] == image["height"] == 48 for image in captions["images"])
    for bad, message in ((["--num-images", "0"], "images must be >= 1"),
                         (["--num-images", "2", "--size", "16"], "size must be >= 32")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "bad"), *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_writes_to_s3(bucket: str, s3_server: str, tmp_path: Path):
    write_shapes_dataset(f"s3://{bucket}/shapes", 3, seed=7)
    write_shapes_dataset(str(tmp_path / "local"), 3, seed=7)
    client = boto3.client("s3", endpoint_url=s3_server)
    # pyarrow may add empty "folder/" marker objects; only the files matter.
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"] if not o["Key"].endswith("/"))
    local = _hashes(tmp_path / "local")
    assert keys == sorted(f"shapes/{name}" for name in local)
    for name, digest in local.items():
        body = client.get_object(Bucket=bucket, Key=f"shapes/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
