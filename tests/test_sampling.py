"""The epoch plan (pipeline.sampling) and the batches Ray Data builds from it, on a real prepared
set with five captions per image."""

from __future__ import annotations

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest

from harmoclip import MethodConfig, ModelConfig, create_clip
from harmoclip.batch import stable_key
from harmoclip.config import TrainConfig
from harmoclip.model import register_tiny_configs
from jobs.train import batch_spec
from pipeline.sampling import Schedule, epoch_plan
from pipeline.dataset import shard_files
from pipeline.train_data import content_words, training_index, worker_batches

MODEL = ModelConfig(name="harmo-micro")


@pytest.fixture(scope="module")
def spec():
    return batch_spec(create_clip(MODEL), MODEL, MethodConfig(), TrainConfig())


@pytest.fixture(scope="module")
def index(prepared, spec):
    return training_index(prepared, spec)[0]


def _image_ids(prepared: str) -> list[str]:
    filesystem, files = shard_files(prepared)
    return [i for f in files for i in pq.read_table(f, filesystem=filesystem, columns=["image_id"])["image_id"].to_pylist()]


def test_an_epoch_draws_every_image_once_with_one_of_its_captions(prepared, index):
    assert index.rows == 80 and index.images == 16  # 5 captions per image
    plan = epoch_plan(index, seed=0, epoch=0, world_size=1, batch_size=1, shuffle_window=1024)
    rows = plan.rows[0]
    assert plan.steps == 16 and sorted(index.image_of_row[rows].tolist()) == list(range(16))
    later = [epoch_plan(index, 0, epoch, 1, 1, 1024).rows[0] for epoch in range(1, 6)]
    assert any(set(r.tolist()) != set(rows.tolist()) for r in later)  # other captions in other epochs
    assert all(sorted(index.image_of_row[r].tolist()) == list(range(16)) for r in later)


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 4), (3, 2)])
def test_workers_get_disjoint_images_and_the_same_number_of_steps(index, world_size, batch_size):
    for epoch in range(4):
        plan = epoch_plan(index, seed=3, epoch=epoch, world_size=world_size, batch_size=batch_size, shuffle_window=8)
        assert plan.steps >= 1
        assert all(len(rows) == plan.steps * batch_size for rows in plan.rows)
        images = np.concatenate([index.image_of_row[rows] for rows in plan.rows])
        assert len(set(images.tolist())) == len(images)  # no image twice in an epoch, across workers


def test_the_plan_is_a_function_of_seed_and_epoch_only(index):
    first = epoch_plan(index, seed=7, epoch=2, world_size=2, batch_size=4, shuffle_window=8)
    again = epoch_plan(index, seed=7, epoch=2, world_size=2, batch_size=4, shuffle_window=8)
    other = epoch_plan(index, seed=8, epoch=2, world_size=2, batch_size=4, shuffle_window=8)
    assert all(np.array_equal(a, b) for a, b in zip(first.rows, again.rows))
    assert not all(np.array_equal(a, b) for a, b in zip(first.rows, other.rows))


def test_resuming_mid_epoch_continues_with_the_next_batch(index):
    schedule = Schedule(index, seed=0, world_size=2, batch_size=2, shuffle_window=4)
    steps = schedule.plan(0).steps
    assert schedule.locate(steps + 1) == (1, 1)
    plan = schedule.plan(1)
    assert np.array_equal(plan.batches(1, 2, start_step=1), plan.batches(1, 2)[1:])
    assert schedule.steps_in_epochs(2) == steps + plan.steps


def test_ray_data_batches_follow_the_plan_and_hold_no_image_twice(prepared, index, spec):
    schedule = Schedule(index, seed=1, world_size=2, batch_size=4, shuffle_window=4)
    plan = schedule.plan(0)
    image_ids = _image_ids(prepared)
    per_worker = []
    for rank in range(2):
        batches = list(worker_batches(prepared, index, schedule, rank, 0, plan.steps, spec).iter_batches(
            batch_size=4, batch_format="numpy"))
        expected = [[stable_key(image_ids[r]) for r in rows] for rows in plan.batches(rank, 4)]
        assert [b["image_ids"].tolist() for b in batches] == expected and len(batches) == plan.steps
        per_worker.append([b["image_ids"] for b in batches])
    for parts in zip(*per_worker):  # the global batch of one step, as the loss gathers it
        ids = np.concatenate(parts).tolist()
        assert len(set(ids)) == len(ids)


def test_one_stream_runs_across_epochs_from_any_step(prepared, index, spec):
    schedule = Schedule(index, seed=1, world_size=2, batch_size=4, shuffle_window=4)
    first, second = schedule.plan(0), schedule.plan(1)
    start, end = first.steps - 1, first.steps + second.steps  # the last batch of epoch 0, then all of epoch 1
    batches = list(worker_batches(prepared, index, schedule, 1, start, end, spec).iter_batches(
        batch_size=4, batch_format="numpy"))
    image_ids = _image_ids(prepared)
    expected = [first.batches(1, 4)[-1], *second.batches(1, 4)]
    assert [b["image_ids"].tolist() for b in batches] == [[stable_key(image_ids[r]) for r in rows] for rows in expected]
    assert schedule.epoch_starts(end) == [0, first.steps]


def test_word_units_split_a_chunk_into_content_words():
    register_tiny_configs()
    tokenizer = open_clip.get_tokenizer("harmo-micro")
    caption = "two large red circles"
    tokens = tokenizer.encode(caption)
    chunk = {"text": caption, "lemma": "circle", "phrase_lemma": "two large red circle",
             "tok_start": 1, "tok_end": 1 + len(tokens)}
    units = content_words(chunk, "harmo-micro")
    assert [u["key"] for u in units] == ["large", "red", "circle"]  # 'two' is a stop word
    for unit in units:
        assert tokenizer.decode(tokens[unit["tok_start"] - 1:unit["tok_end"] - 1]).strip() == unit["text"]
    odd = {**chunk, "phrase_lemma": "large red circle"}  # words and lemmas do not line up
    assert content_words(odd, "harmo-micro") == [{**odd, "key": "circle"}]
