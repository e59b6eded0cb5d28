"""Small COCO-format folders written by the tests, including every kind of bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


def shape_image(index: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    image = Image.new("RGB", size, (120 + index % 50, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 30, 30], fill=(255, 0, 0))
    draw.ellipse([40, 20, 70, 50], fill=(0, 0, 255))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_coco(root: Path, images: list[dict], captions: list[dict], boxes: list[dict]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    categories = [{"id": 1, "name": "red square", "isthing": 1}, {"id": 2, "name": "blue circle", "isthing": 1}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": boxes, "categories": categories}))
    return root


def good_coco(root: Path, count: int = 6) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, captions, boxes = [], [], []
    for i in range(1, count + 1):
        name = f"{i:04d}.png"
        shape_image(i).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": 80, "height": 60})
        captions += [{"id": 10 * i, "image_id": i, "caption": "A red square left of a blue circle."},
                     {"id": 10 * i + 1, "image_id": i, "caption": "the blue circle and two red squares"}]
        boxes += [{"id": 100 * i, "image_id": i, "bbox": [10, 10, 21, 21], "category_id": 1},
                  {"id": 100 * i + 1, "image_id": i, "bbox": [40, 20, 31, 31], "category_id": 2}]
    return write_coco(root, images, captions, boxes)


BAD_IMAGES = {
    # file name -> (bytes to write or None for no file, expected reason)
    "missing.png": (None, "missing_image"),
    "corrupt.png": (b"this is not an image at all" * 10, "corrupt_image"),
    "truncated.png": ("truncate", "corrupt_image"),
    "empty.png": (b"", "empty_image_file"),
    "huge.png": ("huge", "too_many_pixels"),
}
ODD_CAPTIONS = {
    # caption -> expected fate
    "": "empty_caption",
    "   \n\t": "empty_caption",
    "it is what it is": "kept, no lexemes",
    "un chat noir sur le canapé": "kept",
    "🐶🎉✨": "kept, no lexemes",
}


def bad_coco(root: Path) -> Path:
    """Two good images, every bad-image kind, odd captions, and bad boxes on image 1."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, captions, boxes = [], [], []
    for i, name in enumerate(["good1.png", "good2.png", *BAD_IMAGES], start=1):
        images.append({"id": i, "file_name": name})
        captions.append({"id": 10 * i, "image_id": i, "caption": f"a red square number {i}"})
        if name.startswith("good"):
            shape_image(i).save(root / "images" / name)
            continue
        content = BAD_IMAGES[name][0]
        if content == "truncate":
            content = png_bytes(shape_image(i, (200, 150)))[:300]
        elif content == "huge":
            content = png_bytes(Image.new("RGB", (400, 400), (1, 2, 3)))
        if content is not None:
            (root / "images" / name).write_bytes(content)
    for j, caption in enumerate(ODD_CAPTIONS):
        captions.append({"id": 1000 + j, "image_id": 2, "caption": caption})
    captions.append({"id": 2000, "image_id": 99, "caption": "a caption for an image that is not listed"})
    boxes = [
        {"id": 1, "image_id": 1, "bbox": [10, 10, 21, 21], "category_id": 1},   # fine
        {"id": 2, "image_id": 1, "bbox": [60, 40, 40, 40], "category_id": 2},   # past the corner: clipped
        {"id": 3, "image_id": 1, "bbox": [20, 20, 0, 10], "category_id": 2},    # zero width: dropped
        {"id": 4, "image_id": 1, "bbox": [200, 200, 10, 10], "category_id": 1},  # wholly outside: dropped
    ]
    return write_coco(root, images, captions, boxes)
