"""The embedded default data set: seeded "shapes" images with captions and boxes, in COCO format.

It is written as a real COCO folder (images/, captions.json, instances.json) so it goes through
exactly the path real COCO does. Every image is a pure function of (seed, image id, size, captions
per image), so the same arguments give byte-identical files, and image k does not depend on how
many images are written.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw
from tqdm import tqdm

from harmoclip.batch import COLORS, SHAPES
from harmoclip.storage import is_remote, resolve

SIZES = ("small", "large")
RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (255, 255, 255), "black": (0, 0, 0),
}
# Side of an object's square as a fraction of the image side; the gap keeps the two sizes apart.
SIDE_FRACTION = {"small": (0.14, 0.22), "large": (0.30, 0.40)}
# Background grey levels: far from black and white and never equal to a (saturated) object colour.
BACKGROUND_RANGE = (88, 168)
MAX_OBJECTS = 4
PLACEMENT_TRIES = 100
RELATION_CHANCE = 0.4
SIZE_CHANCE = 0.4
COUNT_WORDS = ("one", "two", "three", "four")
PLAIN_TEMPLATES = (
    "{objects}",
    "a picture with {objects}",
    "there is {objects}.",
    "an image of {objects}",
    "{objects} on a textured background",
    "a photo showing {objects}.",
    "{count} {shapes}: {objects}",
)
RELATION_TEMPLATES = (
    "there is {a} {relation} {b}.",
    "{a} {relation} {b}",
    "a picture with {a} {relation} {b}",
    "{a} is {relation} {b}",
)
REST_SUFFIXES = (", and {rest}", ". there is also {rest}.", ", with {rest}")
CATEGORIES = [{"id": index + 1, "name": f"{color} {shape}", "supercategory": "shape", "isthing": 1}
              for index, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES)]
CATEGORY_ID = {category["name"]: category["id"] for category in CATEGORIES}
INFO = {"description": "HarmoCLIP synthetic shapes", "version": "1.0"}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; `box` is the tight (x0, y0, x1, y1) pixel box, x1/y1 exclusive."""

    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]
    area: int  # drawn pixels, COCO's segmentation area

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def phrase(self, with_size: bool) -> str:
        words = f"{self.size} {self.name}" if with_size else self.name
        return f"{article(words)} {words}"


@dataclass(frozen=True)
class Caption:
    """A caption and, when it states one, its relation as (object index, word, object index)."""

    text: str
    relation: tuple[int, str, int] | None = None


@dataclass(frozen=True)
class Scene:
    """One generated image with the structured record its COCO entries are written from."""

    image: Image.Image
    objects: list[ShapeObject]
    captions: list[Caption]


def article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def relations(a: ShapeObject, b: ShapeObject) -> tuple[str, ...]:
    """Every relation word true of `a` with respect to `b`, judged by box centres.

    The dominant axis of the centre offset decides: left of / right of (and next to) when the
    objects are more side by side than stacked, else above / below.
    """
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= abs(dy):
        return ("left of" if dx < 0 else "right of", "next to")
    return ("above" if dy < 0 else "below",)


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int) -> None:
    """Draw `shape` (fill 255) inside the square [x, x + side) x [y, y + side)."""
    x1, y1 = x + side - 1, y + side - 1
    cx, cy = x + (side - 1) / 2, y + (side - 1) / 2
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=255)
    elif shape == "star":
        outer, inner = (side - 1) / 2, (side - 1) / 2 * 0.45
        points = []
        for k in range(10):
            radius, angle = (outer if k % 2 == 0 else inner), np.pi * (-0.5 + k / 5)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "cross":
        third = side // 3
        draw.rectangle([x, y + third, x1, y1 - third], fill=255)
        draw.rectangle([x + third, y, x1 - third, y1], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-contrast grey stripes plus noise, so the background is textured but never an object colour."""
    low, high = BACKGROUND_RANGE
    base = rng.uniform(low + 20, high - 20)
    angle, period = rng.uniform(0, np.pi), rng.uniform(size / 8, size / 3)
    ys, xs = np.mgrid[0:size, 0:size]
    stripes = 10 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    grey = np.clip(base + stripes + rng.normal(0, 5, (size, size)), low, high).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


def _place(rng: random.Random, boxes: list[tuple[int, int, int, int]], side: int, size: int,
           margin: int) -> tuple[int, int] | None:
    """A top-left corner for a side x side square that keeps `margin` from the edges and other boxes."""
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side)
        if all(x + side + margin <= bx0 or bx1 + margin <= x or y + side + margin <= by0 or by1 + margin <= y
               for bx0, by0, bx1, by1 in boxes):
            return x, y
    return None


def _layout(rng: random.Random, np_rng: np.random.Generator, size: int) -> tuple[Image.Image, list[ShapeObject]]:
    image = _background(np_rng, size)
    margin = max(2, size // 32)
    names = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, MAX_OBJECTS))
    squares: list[tuple[int, int, int, int]] = []
    objects = []
    for color, shape in names:
        # A large object that does not fit falls back to small; one that still does not fit is dropped.
        for size_name in dict.fromkeys((rng.choice(SIZES), "small")):
            lo, hi = SIDE_FRACTION[size_name]
            side = rng.randint(round(lo * size), round(hi * size))
            corner = _place(rng, squares, side, size, margin)
            if corner is None:
                continue
            x, y = corner
            squares.append((x, y, x + side, y + side))
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), shape, x, y, side)
            image.paste(RGB[color], (0, 0, size, size), mask)
            area = int(np.count_nonzero(np.asarray(mask)))
            objects.append(ShapeObject(color, shape, size_name, mask.getbbox(), area))
            break
    return image, objects


def _caption(rng: random.Random, objects: list[ShapeObject]) -> Caption:
    """One caption naming every object, sometimes with sizes and one relation between two objects."""
    with_size = rng.random() < SIZE_CHANCE
    order = rng.sample(range(len(objects)), len(objects))
    phrases = {i: objects[i].phrase(with_size) for i in order}
    if len(objects) >= 2 and rng.random() < RELATION_CHANCE:
        a, b, *rest = order
        word = rng.choice(relations(objects[a], objects[b]))
        text = rng.choice(RELATION_TEMPLATES).format(a=phrases[a], relation=word, b=phrases[b])
        if rest:
            text = text.rstrip(".") + rng.choice(REST_SUFFIXES).format(rest=join_phrases([phrases[i] for i in rest]))
        return Caption(text, (a, word, b))
    count = len(objects)
    text = rng.choice(PLAIN_TEMPLATES).format(objects=join_phrases([phrases[i] for i in order]),
                                               count=COUNT_WORDS[count - 1], shapes="shape" if count == 1 else "shapes")
    return Caption(text)


def make_scene(seed: int, image_id: int, size: int = 64, captions_per_image: int = 5) -> Scene:
    """The image, objects and captions of one image id; seeded by (seed, image_id) alone."""
    rng = random.Random(f"shapes:{seed}:{image_id}")
    image, objects = _layout(rng, np.random.default_rng([seed, image_id]), size)
    captions: list[Caption] = []
    for _ in range(captions_per_image):
        # Captions of one image differ where the templates allow; after enough tries a repeat is kept.
        for _ in range(50):
            caption = _caption(rng, objects)
            if caption.text not in {c.text for c in captions}:
                break
        captions.append(caption)
    return Scene(image, objects, captions)


def _write_local(out_dir: Path, images: int, seed: int, size: int, captions_per_image: int) -> dict[str, int]:
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    image_entries, caption_entries, box_entries = [], [], []
    for image_id in tqdm(range(1, images + 1), desc="shapes images", unit="img"):
        scene = make_scene(seed, image_id, size, captions_per_image)
        file_name = f"{image_id:012d}.png"
        scene.image.save(out_dir / "images" / file_name, format="PNG", compress_level=6)
        image_entries.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for caption in scene.captions:
            caption_entries.append({"id": len(caption_entries) + 1, "image_id": image_id, "caption": caption.text})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            box_entries.append({"id": len(box_entries) + 1, "image_id": image_id,
                                "category_id": CATEGORY_ID[obj.name],
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "area": float(obj.area), "iscrowd": 0})
    info = {**INFO, "seed": seed, "image_size": size}
    _write_json(out_dir / "captions.json", {"info": info, "images": image_entries, "annotations": caption_entries})
    _write_json(out_dir / "instances.json", {"info": info, "images": image_entries, "annotations": box_entries,
                                             "categories": CATEGORIES})
    return {"images": images, "captions": len(caption_entries), "objects": len(box_entries),
            "categories": len(CATEGORIES)}


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, sort_keys=True, indent=None, separators=(",", ":")) + "\n",
                    encoding="utf-8")


def write_shapes_dataset(out_dir: str, images: int, seed: int = 0, size: int = 64,
                         captions_per_image: int = 5) -> dict[str, int]:
    """Write the shapes COCO folder to a local path or s3:// URI; returns counts written.

    An s3:// destination is generated in a local temporary folder and then uploaded, so the
    generator itself only ever writes local files.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (smaller objects become unreadable), got {size}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not is_remote(out_dir):
        return _write_local(Path(out_dir), images, seed, size, captions_per_image)
    filesystem, path = resolve(out_dir)
    with tempfile.TemporaryDirectory(prefix="shapes-") as local:
        counts = _write_local(Path(local), images, seed, size, captions_per_image)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    return counts
