"""Ray Train runs of a tiny model on a tiny prepared set: 2 gloo workers, determinism, exact resume, NaN, MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError

import open_clip
from harmoclip import register_tiny_configs
from harmoclip.cli import config_from_args, method_from_args, model_from_args
from harmoclip.config import TrainConfig
from jobs import train as train_job
from tests.reference_run import train



def _run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    return client, client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])


def _history(tracking_uri: str, metric: str) -> list[tuple[int, float]]:
    client, runs = _run(tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, metric))


def _weights(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]


def test_two_gloo_workers_train_checkpoint_and_log(clean_run):
    out = clean_run["checkpoint"].rsplit("/", 1)[0]
    assert clean_run["step"] == 12
    assert sorted(p.name for p in Path(out).glob("checkpoint_*") if p.is_dir()) == ["checkpoint_000008",
                                                                                    "checkpoint_000012"]
    losses = [v for _, v in _history(clean_run["tracking_uri"], "loss")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss goes down
    client, (run,) = _run(clean_run["tracking_uri"])
    assert run.data.params["method.lambda_lrc"] == "1.0" and run.data.params["train.workers"] == "2"
    assert run.data.params["method.region_pooling"] == "max" and run.info.status == "FINISHED"
    assert {"gc", "lrc", "gr", "lr", "samples_per_s", "epoch"} <= set(run.data.metrics)
    # per-term gradient norms before clipping, and the total after clipping (grad_clip = 1)
    assert {"grad_norm_gc", "grad_norm_lrc", "grad_norm_gr", "grad_norm", "grad_norm_clipped"} <= set(run.data.metrics)
    # Clipping was exercised and bounded every step: the total after clipping never exceeds 1, a
    # norm under 1 is left alone, and at least one step of this run had a norm above 1 to clip.
    before, after = _history(clean_run["tracking_uri"], "grad_norm"), _history(clean_run["tracking_uri"],
                                                                                 "grad_norm_clipped")
    assert [step for step, _ in before] == [step for step, _ in after] and len(after) == 12
    assert all(clipped <= 1.0 + 1e-5 for _, clipped in after)
    assert all(abs(clipped - norm) < 1e-5 for (_, norm), (_, clipped) in zip(before, after) if norm < 1.0)
    assert any(norm > 1.0 for _, norm in before)
    register_tiny_configs()
    clip = open_clip.create_model("harmo-micro", pretrained=clean_run["checkpoint"])
    assert torch.isfinite(clip.logit_scale)


def test_same_seed_gives_identical_losses_even_under_load(prepared, clean_run, tmp_path, cpu_burner):
    with cpu_burner():
        loaded = train(prepared, tmp_path / "loaded")
    for metric in ("loss", "gc", "lrc", "gr"):
        assert _history(loaded["tracking_uri"], metric) == _history(clean_run["tracking_uri"], metric), metric
    weights, reference = _weights(loaded), _weights(clean_run)  # and the same final weights, bit for bit
    assert weights.keys() == reference.keys()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights.items())


# A worker lost mid-run (its whole node, in fact) and the run restored from its last checkpoint to
# the uninterrupted run's weights: tests/test_cluster.py (node loss) and tests/test_s3_faults.py.

def test_the_same_command_on_a_finished_run_trains_nothing(prepared, clean_run, capsys):
    out = Path(clean_run["checkpoint"]).parent
    final = out / "checkpoint_000012" / "open_clip_weights.pt"
    written = (sorted(p.name for p in out.glob("checkpoint_*")), final.stat().st_mtime_ns)
    again = train(prepared, out)  # nothing left to do: the same final checkpoint
    assert again["step"] == 12 and again["loss"] == clean_run["loss"]
    assert f"{out} holds a finished run (step 12): nothing left to train" in capsys.readouterr().out
    assert (sorted(p.name for p in out.glob("checkpoint_*")), final.stat().st_mtime_ns) == written  # not retrained
    reference = _weights(clean_run)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in _weights(again).items())


def _recorded(args) -> dict:
    """The run record a parsed command line would write."""
    return train_job.run_record(args.data, model_from_args(args), method_from_args(args),
                                config_from_args(args, TrainConfig))


def test_a_nan_run_keeps_its_checkpoint_and_goes_on_under_other_settings_only_with_resume(prepared, tmp_path,
                                                                                        capsys):
    """What a user does after a NaN: the run stops naming the step and keeps its last checkpoint;
    the same folder with a lower --lr is refused unless --resume, which goes on from that
    checkpoint; the recorded settings replay the run (one run folder for all of it: each Ray Train
    run costs a controller and workers)."""
    out = tmp_path / "run"
    argv = ["--data", prepared, "--out", str(out), "--model", "harmo-micro", "--method", "gc_only", "--steps", "4",
            "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1", "--warmup-steps", "0"]
    with pytest.raises(TrainingFailedError, match="loss is nan at step 3"):
        train_job.main([*argv, "--inject-nan-at-step", "3", "--max-failures", "0"])
    assert sorted(p.name for p in out.glob("checkpoint_0*")) == ["checkpoint_000002"]
    register_tiny_configs()
    open_clip.create_model("harmo-micro", pretrained=str(out / "checkpoint_000002" / "open_clip_weights.pt"))
    record = json.loads((out / "config.json").read_text())
    assert record == _recorded(train_job.parse_command_line([*argv, "--inject-nan-at-step", "3", "--max-failures",
                                                            "0"])) and record["data"] == prepared

    with pytest.raises(SystemExit) as refused:  # before Ray is asked for anything
        train_job.main([*argv, "--lr", "1e-3"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0005 -> 0.001" in err and "inject_nan" not in err  # test-only settings are not compared
    assert json.loads((out / "config.json").read_text()) == record  # the run is untouched

    resumed = train_job.main([*argv, "--lr", "1e-3", "--steps", "3", "--resume"])  # goes on from step 2
    assert resumed["step"] == 3 and math.isfinite(resumed["loss"])  # step 3 again, finite this time
    # One MLflow run for the folder: steps 1-2, then only step 3 (from the checkpoint, not from 0).
    assert [step for step, _ in _history(resumed["tracking_uri"], "loss")] == [1, 2, 3]
    record = json.loads((out / "config.json").read_text())
    assert (record["train"]["lr"], record["train"]["steps"]) == (1e-3, 3)

    replay = train_job.parse_command_line(["--config", str(out / "config.json"), "--out", str(tmp_path / "again")])
    assert _recorded(replay) == record
    changed = train_job.parse_command_line(["--config", str(out), "--out", str(tmp_path / "again"), "--seed", "1"])
    assert train_job.changed_settings(record, _recorded(changed)) == ["train.seed: 0 -> 1"]
