"""Reading what users have: a COCO folder, the real COCO layout, a manifest, WebDataset shards or
a sharded manifest -> one row per image.

All structural problems (bad JSON, missing keys, missing columns) are raised here, naming the
file and the key, before any Ray work starts. Row-level problems (a caption pointing to an
unknown image) become rejected rows later, so nothing disappears. WebDataset shards and sharded
manifests are only located here (`find_source`); Ray Data tasks read them (`pipeline/shards.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from harmoclip.storage import S3_SCHEME, is_remote, join, resolve

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SHARDED_MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")  # not .json: folders also hold stats files
WEBDATASET_SUFFIX = ".tar"
URL_SCHEMES = ("http://", "https://")
PREPARED_MARKER = "dataset.json"  # pipeline.prepare.DATASET_FILE: its Parquet is not a manifest
# Source.kind: where the rows come from. The first two are read by this process (read_image_rows),
# the last two by Ray Data tasks (pipeline.shards).
COCO, MANIFEST, WEBDATASET, SHARDED_MANIFEST = "coco", "manifest", "webdataset", "sharded_manifest"


def is_url(uri: str) -> bool:
    """An http(s) URL: fetched with a timeout and retries (pipeline.images.fetch_url)."""
    return uri.startswith(URL_SCHEMES)


class SourceError(ValueError):
    """The input cannot be read at all: names the file (and key) so the user can fix it."""


@dataclass(frozen=True)
class Source:
    """Where the raw data is. `captions` is a COCO captions file, a manifest, or (WebDataset, sharded
    manifest) what SRC named, with the shard files it holds in `shards`."""

    captions: str
    images: Optional[str] = None  # image folder for COCO; None for a manifest
    instances: Optional[str] = None
    image_column: str = "image"
    caption_column: str = "caption"  # a manifest's column, or the field of a WebDataset sample's .json
    kind: str = COCO
    shards: tuple[str, ...] = ()  # WebDataset .tar files or manifest files, sorted by URI

    @property
    def is_manifest(self) -> bool:
        return self.images is None

    @property
    def name(self) -> str:
        return self.captions.rstrip("/").rsplit("/", 1)[-1]


def _exists(uri: str) -> bool:
    try:
        filesystem, path = resolve(uri)
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise SourceError(f"cannot reach {uri}: {err}") from err


def _listed_files(src: str) -> list[str]:
    """The files of folder SRC, or those whose name starts with SRC's last part (an S3 or path
    prefix such as `s3://bucket/laion/part-`), as sorted URIs; not recursive; names starting with
    '.' or '_' (checksums, _SUCCESS) left out. Empty when there is nothing to list."""
    try:
        filesystem, path = resolve(src)
        if filesystem.get_file_info(path).type == pafs.FileType.Directory:
            folder, prefix = path, ""
        else:
            folder, _, prefix = path.rpartition("/")
            if not folder or not prefix:
                return []
        entries = filesystem.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
    except OSError:
        return []
    paths = sorted(e.path for e in entries if e.type == pafs.FileType.File and e.base_name.startswith(prefix)
                   and not e.base_name.startswith((".", "_")))
    return [S3_SCHEME + p if is_remote(src) else p for p in paths]


def _sharded_source(src: str, image_column: str, caption_column: str) -> Optional[Source]:
    """SRC as WebDataset shards (any `*.tar` there: img2dataset writes a .parquet and a _stats.json
    beside each) or as a sharded manifest (`*.jsonl`, `*.csv` or `*.parquet`, one kind), or None."""
    files = _listed_files(src)
    if any(f.rsplit("/", 1)[-1] == PREPARED_MARKER for f in files):
        raise SourceError(f"{src} is a prepared dataset (it holds {PREPARED_MARKER}); --input takes raw data")
    tars = tuple(f for f in files if f.endswith(WEBDATASET_SUFFIX))
    if tars:
        return Source(captions=src, caption_column=caption_column, kind=WEBDATASET, shards=tars)
    manifests = [f for f in files if f.endswith(SHARDED_MANIFEST_SUFFIXES)]
    suffixes = sorted({f.rsplit(".", 1)[-1] for f in manifests})
    if len(suffixes) > 1:
        raise SourceError(f"{src} holds manifests of {len(suffixes)} kinds ({', '.join(suffixes)}); "
                          "a sharded manifest is files of one kind")
    if manifests:
        return Source(captions=src, image_column=image_column, caption_column=caption_column,
                      kind=SHARDED_MANIFEST, shards=tuple(manifests))
    return None


def find_source(src: str, images: str | None = None, captions: str | None = None,
                instances: str | None = None, image_column: str = "image",
                caption_column: str = "caption") -> Source:
    """Work out the layout from SRC (a COCO folder, a manifest file, a WebDataset `.tar`, or a
    folder or prefix of WebDataset shards or manifest files) or explicit COCO paths."""
    if captions:
        if not images:
            raise SourceError("--captions needs --images (the image folder of the real COCO layout)")
        source = Source(captions=captions, images=images, instances=instances)
    elif src.endswith(WEBDATASET_SUFFIX):
        if not _exists(src):
            raise SourceError(f"{src} does not exist (expected a WebDataset .tar shard)")
        return Source(captions=src, caption_column=caption_column, kind=WEBDATASET, shards=(src,))
    elif src.endswith(MANIFEST_SUFFIXES) and not src.endswith("captions.json"):
        source = Source(captions=src, image_column=image_column, caption_column=caption_column, kind=MANIFEST)
    elif not _exists(join(src, "captions.json")) and (sharded := _sharded_source(src, image_column, caption_column)):
        return sharded
    else:
        folder_instances = join(src, "instances.json")
        source = Source(captions=join(src, "captions.json"), images=join(src, "images"),
                        instances=instances or (folder_instances if _exists(folder_instances) else None))
    for uri in (source.captions, source.instances):
        if uri and not _exists(uri):
            raise SourceError(f"{uri} does not exist (expected a COCO folder with images/ and captions.json, "
                              f"the real COCO layout via --images/--captions, a {'/'.join(MANIFEST_SUFFIXES)} "
                              "manifest, or WebDataset .tar shards or manifest files in a folder or prefix)")
    return source


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _load_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as err:
        raise SourceError(f"{uri} is not valid JSON: {err}") from err
    except OSError as err:
        raise SourceError(f"cannot read {uri}: {err}") from err


def _require(items: Any, uri: str, key: str, fields: Iterable[str]) -> list[dict]:
    """`items` must be a list of objects each holding `fields`; the error names file, key and index."""
    if not isinstance(items, list):
        raise SourceError(f"{uri}: '{key}' must be a list, got {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise SourceError(f"{uri}: {key}[{index}] must be an object, got {type(item).__name__}")
        missing = [f for f in fields if f not in item]
        if missing:
            raise SourceError(f"{uri}: {key}[{index}] has no '{missing[0]}'")
    return items


def _coco_section(document: Any, uri: str, key: str, fields: Iterable[str]) -> list[dict]:
    if not isinstance(document, dict):
        raise SourceError(f"{uri}: expected a COCO JSON object, got {type(document).__name__}")
    if key not in document:
        raise SourceError(f"{uri}: missing key '{key}'")
    return _require(document[key], uri, key, fields)


def blank_caption(text: Optional[str]) -> Optional[tuple[str, str]]:
    """The reject (reason, detail) of a caption with no text, or None: one rule for every job."""
    if text is None or not text.strip():
        return "empty_caption", f"caption {text!r} is empty or whitespace"
    return None


def sample_id(source_name: str, image_key: str, caption_index: int) -> str:
    """Stable across runs and machines: source + image + caption index."""
    return hashlib.blake2b(f"{source_name}|{image_key}|{caption_index}".encode(), digest_size=8).hexdigest()


def _boxes_by_image(uri: str | None, key_fields: tuple[str, ...], section: str = "annotations") -> dict[Any, list]:
    if not uri:
        return {}
    document = _load_json(uri)
    items = (_require(document, uri, "(top level)", key_fields) if isinstance(document, list)
             else _coco_section(document, uri, section, key_fields))
    by_image: dict[Any, list] = defaultdict(list)
    for index, item in enumerate(items):
        box = item["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise SourceError(f"{uri}: {section}[{index}].bbox must be [x, y, w, h] numbers, got {box!r}")
        by_image[item["image_id"]].append(item)
    return by_image


def is_crowd(item: dict) -> bool:
    """COCO's `iscrowd` boxes cover a group of objects (a crowd, a pile of bananas) with one label.
    COCO's own evaluation ignores them, and so does this project: they are never a gt region
    (prepare, embed) nor a scored box (evaluate), and evaluation reports how many were left out."""
    return bool(item.get("iscrowd", 0))


def crowd_boxes(instances_uri: str | None) -> int:
    """How many `iscrowd` boxes an instances file holds (left out everywhere, see is_crowd)."""
    if not instances_uri:
        return 0
    return sum(is_crowd(item) for item in _load_json(instances_uri).get("annotations", []))


def categories(instances_uri: str | None) -> list[dict]:
    """The COCO categories (id, name, optional isthing) of an instances file, for evaluation."""
    if not instances_uri:
        return []
    return _coco_section(_load_json(instances_uri), instances_uri, "categories", ("id", "name"))


IMAGE_ROW_SCHEMA = pa.schema([
    ("image_key", pa.string()),
    ("image_uri", pa.string()),
    ("captions", pa.list_(pa.struct([("caption_index", pa.int32()), ("caption", pa.string()),
                                     ("sample_id", pa.string())]))),
    ("gt_boxes", pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()),
                                     ("h", pa.float64()), ("category_id", pa.int32())]))),
    ("proposals", pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64()), ("w", pa.float64()),
                                      ("h", pa.float64()), ("score", pa.float64())]))),
    ("reject_reason", pa.string()),  # set when the row is already known to be bad
    ("reject_detail", pa.string()),
])


def xywh(item: dict, extra: str, default: float | int) -> dict:
    x, y, w, h = (float(v) for v in item["bbox"])
    return {"x": x, "y": y, "w": w, "h": h, extra: item.get(extra, default)}


def _coco_rows(source: Source, proposals_uri: str | None) -> list[dict]:
    document = _load_json(source.captions)
    images = _coco_section(document, source.captions, "images", ("id", "file_name"))
    annotations = _coco_section(document, source.captions, "annotations", ("image_id", "caption"))
    gt = _boxes_by_image(source.instances, ("image_id", "bbox", "category_id"))
    proposals = _boxes_by_image(proposals_uri, ("image_id", "bbox"))
    captions_by_image: dict[Any, list[str]] = defaultdict(list)
    for annotation in annotations:
        captions_by_image[annotation["image_id"]].append(annotation["caption"])
    known = {image["id"] for image in images}

    rows = []
    for image in sorted(images, key=lambda im: str(im["file_name"])):
        rows.append(image_row(source, str(image["file_name"]), join(source.images, str(image["file_name"])),
                               captions_by_image.get(image["id"], []),
                               [xywh(b, "category_id", 0) for b in gt.get(image["id"], []) if not is_crowd(b)]
                               if source.instances else None,
                               [xywh(b, "score", 1.0) for b in proposals.get(image["id"], [])] if proposals_uri else None))
    for image_id in sorted((i for i in captions_by_image if i not in known), key=str):
        rows.append(image_row(source, f"unknown-image-id:{image_id}", "", captions_by_image[image_id], None, None,
                               reject=("unknown_image_id", f"caption refers to image_id {image_id!r}, which "
                                                           f"is not in {source.captions} 'images'")))
    return rows


def image_row(source: Source, key: str, uri: str, captions: list, gt_boxes, proposals,
              reject: tuple[str, str] | None = None) -> dict:
    """One IMAGE_ROW_SCHEMA row: the image and its captions, each with its stable sample id."""
    return {
        "image_key": key,
        "image_uri": uri,
        "captions": [{"caption_index": i, "caption": None if c is None else str(c),
                      "sample_id": sample_id(source.name, key, i)} for i, c in enumerate(captions)],
        "gt_boxes": gt_boxes,
        "proposals": proposals,
        "reject_reason": reject[0] if reject else None,
        "reject_detail": reject[1] if reject else None,
    }


def _read_manifest_table(uri: str) -> pa.Table:
    filesystem, path = resolve(uri)
    try:
        if uri.endswith(".parquet"):
            return pq.read_table(path, filesystem=filesystem)
        with filesystem.open_input_stream(path) as stream:
            return pacsv.read_csv(stream) if uri.endswith(".csv") else pajson.read_json(stream)
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"cannot read manifest {uri}: {err}") from err


def parse_manifest(data: bytes, uri: str) -> pa.Table:
    """A manifest file's bytes (read by a Ray Data task) as a table, read as `_read_manifest_table` does."""
    try:
        if uri.endswith(".parquet"):
            return pq.read_table(pa.BufferReader(data))
        reader = pacsv.read_csv if uri.endswith(".csv") else pajson.read_json
        return reader(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"cannot read manifest {uri}: {err}") from err


def manifest_pairs(table: pa.Table, uri: str, image_column: str, caption_column: str) -> list[tuple[str, str, Any]]:
    """(image key, image URI, caption) per manifest row, in file order: the key is the image column
    as written ("" when empty); the URI resolves a relative path against the manifest's folder."""
    for column in (image_column, caption_column):
        if column not in table.column_names:
            raise SourceError(f"{uri}: no column '{column}' (columns: {table.column_names}); "
                              "set --image-column / --caption-column")
    kind = table.schema.field(image_column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_nested(kind):
        raise SourceError(f"{uri}: column '{image_column}' holds {kind}, not image paths or URIs; "
                          "set --image-column")
    base = uri.rsplit("/", 1)[0]
    pairs = []
    for image, caption in zip(table[image_column].to_pylist(), table[caption_column].to_pylist()):
        key = "" if image is None else str(image)
        pairs.append((key, image_uri(base, key), caption))
    return pairs


def image_uri(base: str, image: str) -> str:
    """Where a manifest's image path points: itself if absolute (/..., s3://, http(s)://), else
    relative to the manifest's folder `base`."""
    return image if (is_remote(image) or is_url(image) or image.startswith("/")) else join(base, image)


def empty_image_path(key: str) -> Optional[tuple[str, str]]:
    return None if key else ("empty_image_path", "the manifest row has no image path")


def _manifest_rows(source: Source) -> list[dict]:
    pairs = manifest_pairs(_read_manifest_table(source.captions), source.captions, source.image_column,
                           source.caption_column)
    captions_by_image: dict[str, list] = defaultdict(list)
    uris = {}
    for key, uri, caption in pairs:
        captions_by_image[key].append(caption)
        uris[key] = uri
    return [image_row(source, key, uris[key], captions_by_image[key], None, None, reject=empty_image_path(key))
            for key in sorted(captions_by_image)]


def read_image_rows(source: Source, proposals_uri: str | None = None) -> pa.Table:
    """One row per image with all its captions, in a stable order (sorted by image key), for the
    sources this process reads (a COCO folder, one manifest); pipeline.shards.image_rows reads all."""
    if source.kind in (WEBDATASET, SHARDED_MANIFEST):
        raise SourceError(f"{source.captions} is a {source.kind.replace('_', ' ')}: Ray Data reads it "
                          "(pipeline.shards.image_rows)")
    rows = _manifest_rows(source) if source.is_manifest else _coco_rows(source, proposals_uri)
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW_SCHEMA)
