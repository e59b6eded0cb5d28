"""GR's anchor targets cached once per dataset (pipeline.anchor_targets): what the training feed
reads equals what the frozen starting model computes, a step with them equals a step with the
frozen copy, the folder is reused, and a folder that no longer mirrors the data is refused."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.config import TrainConfig
from jobs import train as train_job
from pipeline.anchor_targets import ANCHOR_FILE, ensure_anchor_targets
from pipeline.sampling import Schedule
from pipeline.train_data import training_index, worker_batches
from tests.conftest import TEST_MODEL

START = ModelConfig(name=TEST_MODEL)
SEED = 3


@pytest.fixture(scope="module")
def cached(prepared, tmp_path_factory):
    """The prepared dataset copied (targets are written beside it), its anchor targets for the
    harmo-micro start, and the first batches the training feed builds with them."""
    data = str(tmp_path_factory.mktemp("anchor") / "data")
    shutil.copytree(prepared, data)
    clip = create_clip(START)
    spec = train_job.batch_spec(clip, START, MethodConfig(), TrainConfig(batch_size=4, seed=SEED))
    index, _ = training_index(data, spec)
    folder = ensure_anchor_targets(data, list(index.files), START, SEED, spec)
    spec = dataclasses.replace(spec, anchor_targets=folder)
    schedule = Schedule(index, SEED, 1, 4, 8)
    batches = list(worker_batches(data, index, schedule, 0, 0, 2, spec).iter_torch_batches(batch_size=4))
    return {"data": data, "folder": folder, "spec": spec, "index": index, "schedule": schedule, "batches": batches}


def _starting_model() -> torch.nn.Module:
    torch.manual_seed(SEED)  # a training worker seeds before building the (here random) start
    return create_clip(START).eval()


def test_cached_targets_are_the_starting_models_embeddings_of_the_fed_inputs(cached):
    clip = _starting_model()
    with torch.no_grad():
        for batch in cached["batches"]:
            torch.testing.assert_close(batch["anchor_image_features"], clip.encode_image(batch["images"], normalize=True),
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(batch["anchor_text_features"], clip.encode_text(batch["tokens"], normalize=True),
                                       atol=1e-5, rtol=0)


def test_a_step_with_cached_targets_equals_a_step_with_the_frozen_copy(cached):
    method = MethodConfig()
    assert method.needs_anchor
    torch.manual_seed(SEED)
    online = HarmoCLIP(create_clip(START), method)
    torch.manual_seed(SEED)
    from_batch = HarmoCLIP(create_clip(START), method, anchor_from_batch=True)
    assert online.anchor is not None and from_batch.anchor is None
    loss_fn = HarmoCLIPLoss(method)
    batch = cached["batches"][0]
    with_targets, with_copy = loss_fn(from_batch(batch)), loss_fn(online(batch))
    assert with_copy["gr"].item() == pytest.approx(with_targets["gr"].item(), abs=1e-6)
    assert with_copy["loss"].item() == pytest.approx(with_targets["loss"].item(), abs=1e-5)
    without = {k: v for k, v in batch.items() if not k.startswith("anchor_")}
    with pytest.raises(KeyError, match="anchor_image_features"):
        from_batch(without)


def test_targets_are_reused_and_a_folder_that_no_longer_mirrors_the_data_is_refused(cached):
    folder, spec = cached["folder"], cached["spec"]
    anchor_json = os.path.join(folder, ANCHOR_FILE)
    before = os.stat(anchor_json).st_mtime_ns
    again = ensure_anchor_targets(cached["data"], list(cached["index"].files), START, SEED,
                                  dataclasses.replace(spec, anchor_targets=None))
    assert again == folder and os.stat(anchor_json).st_mtime_ns == before  # not recomputed
    # Other starting weights give another folder, never these targets.
    other = ensure_anchor_targets(cached["data"], list(cached["index"].files), START, SEED + 1,
                                  dataclasses.replace(spec, anchor_targets=None))
    assert other != folder
    # A mirror shard cut short is refused when training reads it, naming the folder.
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))[0]
    table = pq.read_table(os.path.join(folder, shard))
    pq.write_table(table.slice(0, table.num_rows - 1), os.path.join(folder, shard))
    with pytest.raises(Exception, match="stale anchor targets") as err:
        list(worker_batches(cached["data"], cached["index"], cached["schedule"], 0, 0, 2, spec).iter_batches())
    assert folder in str(err.value)
