"""WebDataset shards (local disk and the S3 test server), http(s) image URLs (a server on
127.0.0.1 that also answers 404 and stalls) and sharded manifests, through `jobs.prepare` on a
real local Ray: every input row is written or rejected with a stable reason, the rows are those of
the same data in COCO form, and a rerun writes the same bytes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from harmoclip.config import PrepareConfig
from harmoclip.storage import resolve
from jobs.prepare import main as prepare_main
from pipeline.images import Rejected, fetch_url
from pipeline.inference_data import read_inference_input
from pipeline.prepare import prepare
from pipeline.shards import webdataset_row
from pipeline.sources import SHARDED_MANIFEST, WEBDATASET, Source, SourceError, find_source, manifest_pairs
from pipeline.synthetic import write_shapes_dataset

CONFIG = PrepareConfig(regions="gt", batch_size=4, rows_per_shard=3, fetch_timeout=1.0, fetch_retries=1)
IMAGES = 4
IDS = ("id", "image_id", "image_uri", "sample_id")


def read_rows(out: str) -> list[dict]:
    filesystem, path = resolve(out)
    files = sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    return [row for f in files for row in pq.read_table(f, filesystem=filesystem).to_pylist()]


def read_rejects(out: str) -> list[dict]:
    return read_rows(out.rstrip("/") + "/rejects")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def without_ids(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in IDS} for r in rows]


def check_accounting(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    assert counts["rows_in"] == counts["rows_written"] + counts["rows_rejected"]
    assert counts["rows_written"] == len(read_rows(out)) and counts["rows_rejected"] == len(read_rejects(out))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The synthetic set at its smallest: 4 images of 32 px, one caption each, with boxes."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(root / "coco"), images=IMAGES, seed=0, size=32, captions_per_image=1)
    return root


@pytest.fixture(scope="module")
def coco_rows(ray_local, shapes, tmp_path_factory) -> list[dict]:
    """The set prepared from its COCO form: what every other form must give."""
    out = tmp_path_factory.mktemp("coco_out") / "prepared"
    prepare(find_source(str(shapes / "coco")), str(out), CONFIG)
    return read_rows(str(out))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(coco: Path, out: Path) -> Path:
    """The COCO folder as two WebDataset shards, as img2dataset lays them out (with a .parquet and
    a _stats.json beside each .tar): the first shard's captions in `.txt`, the second's in the
    `.json`, boxes always in the `.json`; the second ends with a corrupt image and a sample with
    no caption."""
    out.mkdir(parents=True)
    captions = json.loads((coco / "captions.json").read_text())
    instances = json.loads((coco / "instances.json").read_text())
    images = sorted(captions["images"], key=lambda image: image["file_name"])
    for shard, chunk in enumerate((images[:2], images[2:])):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for image in chunk:
                key = image["file_name"].rsplit(".", 1)[0]
                caption = next(a["caption"] for a in captions["annotations"] if a["image_id"] == image["id"])
                boxes = [{"bbox": a["bbox"], "category_id": a["category_id"]}
                         for a in instances["annotations"] if a["image_id"] == image["id"]]
                _add(tar, f"{key}.png", (coco / "images" / image["file_name"]).read_bytes())
                meta = {"key": key, "boxes": boxes, **({"caption": caption} if shard else {})}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                if not shard:
                    _add(tar, f"{key}.txt", caption.encode())
            if shard:
                _add(tar, "zz-corrupt.jpg", b"\xff\xd8\xff not a jpeg")
                _add(tar, "zz-corrupt.txt", b"a picture that cannot be read")
                _add(tar, "zz-no-caption.png", (coco / "images" / images[0]["file_name"]).read_bytes())
        (out / f"{shard:05d}.parquet").write_bytes(b"img2dataset's metadata, not a manifest")
        (out / f"{shard:05d}_stats.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def shards(shapes) -> Path:
    return write_shards(shapes / "coco", shapes / "wds")


@pytest.fixture(scope="module")
def wds_local(ray_local, shards, tmp_path_factory) -> tuple[dict, str]:
    out = str(tmp_path_factory.mktemp("wds_out") / "prepared")
    return prepare_main(["--input", str(shards), "--out", out, "--regions", "gt"]), out


def test_webdataset_shards_give_the_rows_of_their_coco_form(wds_local, coco_rows, shards):
    manifest, out = wds_local
    rows = read_rows(out)
    assert manifest["source"]["kind"] == WEBDATASET and manifest["source"]["shards"] == 2
    assert without_ids(rows) == without_ids(coco_rows)  # pixels, sizes, captions, tokens, lexemes, boxes
    assert [r["image_id"] for r in rows] == ["00000.tar/000000000001", "00000.tar/000000000002",
                                             "00001.tar/000000000003", "00001.tar/000000000004"]
    assert all(r["gt_boxes"] for r in rows) and rows[0]["image_uri"] == f"{shards}/00000.tar#000000000001.png"
    check_accounting(manifest, out)
    assert manifest["counts"]["rows_in"] == IMAGES + 2
    rejects = {r["image_id"]: r for r in read_rejects(out)}
    assert rejects["00001.tar/zz-corrupt"]["reason"] == "corrupt_image"
    assert rejects["00001.tar/zz-corrupt"]["detail"].startswith(f"{shards}/00001.tar#zz-corrupt.jpg ")
    assert rejects["00001.tar/zz-no-caption"]["reason"] == "missing_caption"
    assert rejects["00001.tar/zz-no-caption"]["stage"] == "caption"


def test_webdataset_on_s3_gives_the_local_rows(ray_local, wds_local, shards, bucket):
    filesystem, _ = resolve(f"s3://{bucket}")
    pafs.copy_files(str(shards), f"{bucket}/laion/wds", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)
    prefix = find_source(f"s3://{bucket}/laion/wds/0000")  # a key prefix, not only a folder
    assert prefix.kind == WEBDATASET and prefix.shards == (f"s3://{bucket}/laion/wds/00000.tar",
                                                            f"s3://{bucket}/laion/wds/00001.tar")
    manifest = prepare(find_source(f"s3://{bucket}/laion/wds"), f"s3://{bucket}/prepared", CONFIG)
    local_manifest, local_out = wds_local
    assert manifest["counts"] == local_manifest["counts"]
    rows = read_rows(f"s3://{bucket}/prepared")
    assert rows[0]["image_uri"] == f"s3://{bucket}/laion/wds/00000.tar#000000000001.png"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("image_uri", "detail")} for r in rows]  # noqa: E731
    assert strip(rows) == strip(read_rows(local_out))
    assert strip(read_rejects(f"s3://{bucket}/prepared")) == strip(read_rejects(local_out))


def test_a_sample_is_rejected_for_what_is_wrong_with_it():
    wds = Source(captions="s3://b/wds", kind=WEBDATASET, shards=("s3://b/wds/00000.tar",))

    def row(**members):
        return webdataset_row({"__key__": "k", **members}, "s3://b/wds/00000.tar", wds)

    png = b"\x89PNG..."
    many = row(png=png, json=json.dumps({"caption": ["one", "two"], "boxes": [
        {"bbox": [1, 2, 3, 4], "category_id": 7}, {"bbox": [0, 0, 9, 9], "category_id": 1, "iscrowd": 1}]}).encode())
    assert [c["caption"] for c in many["captions"]] == ["one", "two"] and many["reject_reason"] is None
    assert many["gt_boxes"] == [{"x": 1.0, "y": 2.0, "w": 3.0, "h": 4.0, "category_id": 7}]  # crowd box left out
    assert row(png=png, txt=b"text wins", json=b'{"caption": "json"}')["captions"][0]["caption"] == "text wins"
    assert row(png=png, txt=b"x")["gt_boxes"] is None  # no boxes given, none assumed
    for members, reason, words in [
        ({"txt": b"x"}, "missing_image", "has no image"),
        ({"png": png, "json": b'{"key": "k"}'}, "missing_caption", "no .txt and no 'caption'"),
        ({"png": png, "json": b"{not json"}, "bad_annotation", "k.json is not valid JSON"),
        ({"png": png, "json": b'{"caption": []}'}, "bad_annotation", "non-empty list of strings"),
        ({"png": png, "txt": b"x", "json": b'{"boxes": [{"bbox": [1, 2]}]}'}, "bad_annotation", "'boxes'[0] must be"),
        ({"png": png, "txt": b"\xff\xfe"}, "bad_annotation", "k.txt is not UTF-8"),
    ]:
        rejected = row(**members)
        assert rejected["reject_reason"] == reason and words in rejected["reject_detail"], rejected
        assert rejected["reject_detail"].startswith("s3://b/wds/00000.tar") and rejected["image"] is None


def test_inputs_are_recognised_by_their_layout(shards, tmp_path):
    assert find_source(str(shards / "00001.tar")).shards == (str(shards / "00001.tar"),)
    assert find_source(str(shards)).shards == (str(shards / "00000.tar"), str(shards / "00001.tar"))
    (tmp_path / "m").mkdir()
    for name in ("b.jsonl", "a.jsonl", "_SUCCESS", "stats.json"):
        (tmp_path / "m" / name).write_text("")
    sharded = find_source(str(tmp_path / "m"), image_column="url")
    assert sharded.kind == SHARDED_MANIFEST and sharded.image_column == "url"
    assert sharded.shards == (str(tmp_path / "m/a.jsonl"), str(tmp_path / "m/b.jsonl"))
    (tmp_path / "m" / "c.csv").write_text("")
    with pytest.raises(SourceError, match="manifests of 2 kinds"):
        find_source(str(tmp_path / "m"))
    with pytest.raises(SourceError, match="captions.json does not exist"):
        find_source(str(tmp_path / "empty"))


# -- http(s) URLs ----------------------------------------------------------------------------------

class _Images(http.server.SimpleHTTPRequestHandler):
    """Serves the image folder; `/stall/...` answers nothing until the test is over."""

    stop = threading.Event()

    def do_GET(self) -> None:
        if self.path.startswith("/stall/"):
            self.stop.wait(30)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_images(shapes):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Images, directory=str(shapes / "coco" / "images")))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Images.stop.set()
        server.shutdown()
        server.server_close()


def test_fetch_url_reasons(http_images):
    assert fetch_url(f"{http_images}/000000000001.png", timeout=1, retries=0).startswith(b"\x89PNG")
    for url, reason, detail in [
        (f"{http_images}/gone.png", "missing_image", f"{http_images}/gone.png answered HTTP 404 File not found"),
        (f"{http_images}/stall/1.png", "fetch_timeout", f"{http_images}/stall/1.png: no answer within 0.5 s "
                                                        "(2 attempts)"),
        ("http://127.0.0.1:9/x.png", "fetch_failed", "http://127.0.0.1:9/x.png: cannot connect"),
    ]:
        with pytest.raises(Rejected) as info:
            fetch_url(url, timeout=0.5, retries=1)
        assert info.value.reason == reason and info.value.detail.startswith(detail), info.value


@pytest.fixture(scope="module")
def url_manifest(shapes, http_images) -> Path:
    captions = json.loads((shapes / "coco" / "captions.json").read_text())
    names = {image["id"]: image["file_name"] for image in captions["images"]}
    lines = [{"url": f"{http_images}/{names[a['image_id']]}", "text": a["caption"]} for a in captions["annotations"]]
    lines += [{"url": f"{http_images}/gone.png", "text": "an image that is not there"},
              {"url": f"{http_images}/stall/0001.png", "text": "an image that never comes"},
              {"url": "http://127.0.0.1:9/0001.png", "text": "a server that is not there"}]
    path = shapes / "urls" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def test_url_manifest_every_row_written_or_rejected_and_reruns_identical(ray_local, url_manifest, coco_rows,
                                                                         http_images, tmp_path):
    argv = ["--input", str(url_manifest), "--image-column", "url", "--caption-column", "text", "--regions", "grid",
            "--fetch-timeout", "1", "--fetch-retries", "1"]
    manifest = prepare_main([*argv, "--out", str(tmp_path / "a")])
    check_accounting(manifest, str(tmp_path / "a"))
    assert manifest["counts"]["rows_in"] == IMAGES + 3 and manifest["counts"]["rows_written"] == IMAGES
    assert manifest["counts"]["rejected_by_reason"] == {"fetch_failed": 1, "fetch_timeout": 1, "missing_image": 1}
    rejects = {r["reason"]: r for r in read_rejects(str(tmp_path / "a"))}
    assert rejects["missing_image"]["detail"] == f"{http_images}/gone.png answered HTTP 404 File not found"
    assert rejects["fetch_timeout"]["detail"] == f"{http_images}/stall/0001.png: no answer within 1 s (2 attempts)"
    assert all(r["stage"] == "image" for r in rejects.values())
    rows = read_rows(str(tmp_path / "a"))
    assert [r["image"] for r in rows] == [r["image"] for r in coco_rows]  # the same pixels as from disk
    assert [r["image_uri"] for r in rows] == [r["image_id"] for r in rows]
    prepare_main([*argv, "--out", str(tmp_path / "b")])
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


# -- sharded manifests -----------------------------------------------------------------------------

def test_sharded_manifest_is_read_by_ray_data_and_grouped_by_image(ray_local, shapes, coco_rows, tmp_path):
    """Three JSONL files: an image's captions come together from every file, in (file, line)
    order; images sorted by path, as one manifest would give them."""
    captions = json.loads((shapes / "coco" / "captions.json").read_text())
    names = {image["id"]: image["file_name"] for image in captions["images"]}
    lines = [{"image": f"../coco/images/{names[a['image_id']]}", "caption": a["caption"]}
             for a in sorted(captions["annotations"], key=lambda a: -a["image_id"])]
    lines += [{"image": f"../coco/images/{names[1]}", "caption": "the same image, a second caption"},
              {"image": None, "caption": "a row without an image"},
              {"image": "../coco/images/missing.png", "caption": "an image that is not there"}]
    folder = shapes / "manifests"
    folder.mkdir()
    for n in range(3):
        (folder / f"part-{n}.jsonl").write_text("\n".join(json.dumps(line) for line in lines[n::3]))
    manifest = prepare(find_source(str(folder)), str(tmp_path / "out"), CONFIG)
    assert manifest["source"]["kind"] == SHARDED_MANIFEST and manifest["source"]["shards"] == 3
    check_accounting(manifest, str(tmp_path / "out"))
    assert manifest["counts"]["rows_in"] == len(lines)
    assert manifest["counts"]["rejected_by_reason"] == {"empty_image_path": 1, "missing_image": 1}
    rows = read_rows(str(tmp_path / "out"))
    first = f"../coco/images/{names[1]}"
    assert [(r["image_id"], r["caption_index"]) for r in rows] == \
        [(first, 0), (first, 1)] + [(f"../coco/images/{names[i]}", 0) for i in range(2, IMAGES + 1)]
    assert rows[0]["caption"] == coco_rows[0]["caption"]  # part-0's line 1, then part-1's line 1
    assert rows[1]["caption"] == "the same image, a second caption"
    assert [r["image"] for r in rows if r["caption_index"] == 0] == [r["image"] for r in coco_rows]
    (folder / "part-3.jsonl").write_text(json.dumps({"path": "x.png", "caption": "another column"}))
    with pytest.raises(SourceError, match=r"part-3.jsonl: no column 'image'"):
        prepare(find_source(str(folder)), str(tmp_path / "broken"), CONFIG)


def test_embed_and_evaluate_read_webdataset_shards_too(ray_local, wds_local, shards):
    """jobs.embed/jobs.evaluate read raw data through the same sources: the images come in input
    order with their bytes, the captions with the sample ids preparation gives them."""
    data = read_inference_input(str(shards), batch_size=4)
    manifest, out = wds_local
    assert data.num_images == IMAGES + 2 and data.has_gt_boxes and data.categories == []
    prepared = {r["sample_id"]: r["caption"] for r in read_rows(out) + read_rejects(out)}
    assert dict(zip(data.captions["sample_id"].to_pylist(), data.captions["caption"].to_pylist())) == prepared
    images = data.images.take_all()
    assert [r["image_id"] for r in images] == [f"00000.tar/00000000000{i}" for i in (1, 2)] + \
        [f"00001.tar/00000000000{i}" for i in (3, 4)] + ["00001.tar/zz-corrupt", "00001.tar/zz-no-caption"]
    assert images[0]["image"].startswith(b"\x89PNG") and images[-1]["reject_reason"] == "missing_caption"


def test_a_prepared_dataset_is_not_taken_for_a_sharded_manifest(tmp_path):
    (tmp_path / "part-00000-0.parquet").write_bytes(b"")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(SourceError, match="is a prepared dataset"):
        find_source(str(tmp_path))
    table = pa.table({"image": [b"\xff\xd8"], "caption": ["bytes, not a path"]})
    with pytest.raises(SourceError, match="m.parquet: column 'image' holds binary, not image paths"):
        manifest_pairs(table, "s3://b/m.parquet", "image", "caption")
