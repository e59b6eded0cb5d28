"""Train HarmoCLIP (or the GC-only baseline: --lambda-lrc 0 --lambda-gr 0) with Ray Train.

Reads a prepared dataset (jobs.prepare): every epoch draws each image once, with one of its
captions chosen by the seed, in an order fixed by the seed alone (pipeline.sampling); Ray Data
reads and decodes each worker's rows. Trains on N workers with DDP (gloo on CPU, nccl + bf16
autocast with --gpu), checkpoints every --checkpoint-every steps to OUT (local path or s3://), and
resumes exactly (weights, optimizer, data position) from the latest checkpoint after a worker
failure or when the same command is run again (OUT/config.json records every setting when a run
starts; another setting is refused unless --resume, and --config OUT/config.json replays a run
with it). --init-from fine-tunes a trained model. Rank 0
logs the whole config and per-step metrics to MLflow. OUT ends up holding open_clip_weights.pt
(loadable with open_clip.create_model(name, pretrained=...)) and harmoclip.json for jobs.evaluate.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, CheckpointUploadMode, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.checkpoint import CONFIG_FILENAME, WEIGHTS_FILENAME, load_checkpoint, write_checkpoint
from harmoclip.cli import (HelpFormatter, add_bool_argument, add_config_arguments, add_method_arguments,
                           add_model_arguments, config_from_args, method_from_args, model_from_args)
from harmoclip.config import TrainConfig, as_flat_dict
from harmoclip.model_card import write_model_card, write_safetensors
from harmoclip.optim import adamw, apply_gradients, term_gradient_norms, warmup_cosine
from harmoclip.storage import is_remote, join, resolve, upload_directory, write_bytes
from jobs.common import (add_shared_fs_argument, add_verbose_argument, check_cluster_storage, init_ray, log_level,
                         quiet_libraries, run_storage, set_verbose, user_errors)
from jobs.tracking import RunTracker, default_tracking_uri
from pipeline.sampling import DatasetIndex, Schedule, build_index
from pipeline.dataset import DatasetError, read_dataset_manifest, shard_files
from pipeline.anchor_targets import ensure_anchor_targets
from pipeline.train_data import BatchSpec, training_index, worker_batches

LOSS_TERMS = ("loss", "gc", "lrc", "gr")
UPLOAD_MODES = {"async": CheckpointUploadMode.ASYNC, "sync": CheckpointUploadMode.SYNC}
PROGRESS_LINES = 10  # rank 0 prints about this many progress lines per run, however long
RUN_RECORD = "config.json"  # OUT/config.json: every setting of the run, written when it starts
# Settings that change how a run is carried out, not what it trains: a re-run may change them
# without --resume (a longer --max-failures after a crash, say).
NOT_COMPARED = frozenset(f"train.{name}" for name in ("max_failures", "checkpoint_upload", "placement",
                                                      "inject_nan_at_step"))


def worker_progress(level: int) -> logging.Logger:
    """The logger a worker's progress lines go to, with Ray's and open_clip's INFO lines held at `level`.

    Ray Train sends a worker's print() through the root logger at INFO, and open_clip logs model
    construction there too; a dedicated logger keeps our lines when the root is held at WARNING.
    """
    quiet_libraries(level)
    logging.getLogger().setLevel(level)
    progress = logging.getLogger("harmoclip.progress")
    progress.setLevel(logging.INFO)
    return progress


def progress_line(metrics: dict[str, float], total_steps: int) -> str:
    terms = " ".join(f"{k} {metrics[k]:.3f}" for k in LOSS_TERMS[1:] if k in metrics)
    return (f"step {metrics['step']}/{total_steps} (epoch {metrics['epoch']}): loss {metrics['loss']:.3f} "
            f"({terms}), {metrics['wall_samples_per_s']:.0f} samples/s")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs, sent through the object store as Ray Train's `train_loop_config`."""

    data: str
    out: str
    model: ModelConfig
    method: MethodConfig
    train: TrainConfig
    batch: BatchSpec
    index: Any  # ObjectRef of the prepared dataset's DatasetIndex (shared, not copied per worker)
    total_steps: int
    schedule_steps: int
    tracking_uri: str
    parent_run_id: str | None = None
    log_level: int = logging.WARNING  # Ray's and open_clip's console logs in the workers

    def params(self) -> dict[str, Any]:
        return {"data": self.data, "out": self.out, "total_steps": self.total_steps,
                **as_flat_dict(self.model, self.method, self.train)}


def train_worker(config: dict[str, ray.ObjectRef]) -> None:
    """One Ray Train worker: 1. model and state, 2. its rows, 3. steps, 4. report and checkpoint."""
    spec: RunSpec = ray.get(config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train = spec.train
    progress = worker_progress(spec.log_level)
    progress.info(f"worker rank {rank}/{world_size} on node {ray.get_runtime_context().get_node_id()}")

    # 1. The node's cores shared by its workers (Ray would pin each to one thread), the same
    #    initial weights on every worker, then the latest checkpoint if there is one.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    torch.manual_seed(train.seed)
    # Batches were checked by Ray Data, and carry GR's anchor targets when the method needs them.
    model = HarmoCLIP(create_clip(spec.model), spec.method, check_inputs=False,
                      anchor_from_batch=spec.batch.anchor_targets is not None)
    ddp_model = ray.train.torch.prepare_model(model)  # moves `model` to the device; loads below follow it
    optimizer = adamw(model, train.lr, train.weight_decay, spec.method.l2sp)
    scheduler = warmup_cosine(optimizer, train.warmup_steps, spec.schedule_steps)
    step, checkpoint = 0, ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = load_checkpoint(directory, model, optimizer, scheduler)
        if rank == 0:
            progress.info(f"restored {os.path.basename(checkpoint.path.rstrip('/'))}: going on from step {step}")
    loss_fn = HarmoCLIPLoss(spec.method)
    device = ray.train.torch.get_device()
    tracker = (RunTracker(spec.tracking_uri, train.experiment, spec.out, os.path.basename(spec.out.rstrip("/")),
                          spec.params(), spec.parent_run_id) if rank == 0 else None)

    # 2. The rows of every remaining step, in the order the plan gives for this seed and worker.
    index: DatasetIndex = ray.get(spec.index)
    schedule = Schedule(index, train.seed, world_size, train.batch_size, train.shuffle_window)
    rows = worker_batches(spec.data, index, schedule, rank, step, spec.total_steps, spec.batch)
    epoch_starts = schedule.epoch_starts(spec.total_steps)
    global_batch = train.batch_size * world_size
    first_step, first_step_done = step + 1, None  # throughput is measured from the end of the first step
    progress_every = max(1, (spec.total_steps - step) // PROGRESS_LINES)
    next_progress = step + progress_every
    lexemes_over_cap = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: no host sync
    for batch in rows.iter_torch_batches(batch_size=train.batch_size, device=device, prefetch_batches=4):
        # 3. One optimizer step.
        step += 1
        lexemes_over_cap += batch["lexemes_over_cap"].sum()
        start = time.perf_counter()
        final = step >= spec.total_steps
        log_step = step % train.log_every == 0 or step % train.checkpoint_every == 0 or final
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=train.gpu):
            losses = loss_fn(ddp_model(batch))
        loss = losses["loss"].float()
        if train.inject_nan_at_step == step:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping. The checkpoints of "
                                     f"earlier steps in {spec.out} are intact (lower --lr or check the data)")
        term_norms = (term_gradient_norms(loss_fn.weighted(losses), model)
                      if log_step and train.grad_norms else {})
        grad_norm = apply_gradients(loss, model, optimizer, scheduler, train.grad_clip)
        if first_step_done is None:
            first_step_done = time.perf_counter()

        # 4. Metrics every log_every steps, a checkpoint every checkpoint_every steps and at the end.
        if not log_step:
            continue
        metrics = {k: float(losses[k].detach()) for k in LOSS_TERMS if k in losses}
        metrics.update(step=step, epoch=bisect.bisect_right(epoch_starts, step - 1) - 1,
                       lexemes_over_cap=int(lexemes_over_cap),  # this worker's, since the run (re)started
                       lr=scheduler.get_last_lr()[0], logit_scale=model.clip.logit_scale.exp().item(),
                       samples_per_s=global_batch / (time.perf_counter() - start),
                       wall_samples_per_s=(step - first_step) * global_batch
                       / max(time.perf_counter() - first_step_done, 1e-9),
                       **{f"grad_norm_{k}": v for k, v in term_norms.items()},
                       **{name: param.exp().item() for name, param in model.loss_parameters().items()},
                       **{k: float(v) for k, v in losses.items() if k.endswith(("_empty", "_lexemes", "_images"))})
        if grad_norm is not None:
            metrics.update(grad_norm=float(grad_norm), grad_norm_clipped=min(float(grad_norm), train.grad_clip))
        if tracker:
            tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)
        if rank == 0 and (step >= next_progress or final):
            next_progress = step + progress_every
            progress.info(progress_line(metrics, spec.total_steps))
        # Ray Train hears of checkpoints only (per-step metrics go to MLflow above): its controller
        # takes one report per worker every 2 s and a worker's next report waits for that, so a
        # report every step would hold training to one step per 2 s.
        if step % train.checkpoint_every == 0 or final:
            checkpoint = None
            if rank == 0:  # written now, uploaded (and then deleted) by Ray Train, maybe in the background
                directory = tempfile.mkdtemp(prefix="harmoclip-checkpoint-")
                write_checkpoint(directory, model.clip, optimizer, scheduler, step,
                                 {"model": dataclasses.asdict(spec.model),
                                  "method": dataclasses.asdict(spec.method)}, model.loss_parameters())
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}",
                             checkpoint_upload_fn=_upload_checkpoint, delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_mode=UPLOAD_MODES[train.checkpoint_upload])
    if tracker:
        tracker.finish()


def _upload_checkpoint(checkpoint: ray.train.Checkpoint, directory_name: str) -> ray.train.Checkpoint:
    """Ray Train's upload step: every file written or an error (then Ray retries the upload, and a
    failure that persists fails the worker, which restores from the last complete checkpoint)."""
    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/{directory_name}"
    upload_directory(checkpoint.path, storage.storage_filesystem, path)
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


def _copy_final(checkpoint_path: str, filesystem, out: str) -> None:
    """OUT/open_clip_weights.pt and OUT/harmoclip.json: the usable result, next to the checkpoints."""
    out_fs, out_path = resolve(out)
    for name in (WEIGHTS_FILENAME, CONFIG_FILENAME):
        with filesystem.open_input_stream(f"{checkpoint_path}/{name}") as src, \
                out_fs.open_output_stream(f"{out_path}/{name}") as dst:
            dst.write(src.read())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", help="Dataset to read: a prepared dataset (jobs.prepare output), local or s3:// "
                                       "(required unless --config gives it)")
    parser.add_argument("--out", required=True, help="Where to write: the run folder for checkpoints and results, "
                                                     "local or s3://")
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--config", metavar="RUN/config.json",
                        help="replay a recorded run: every setting from its config.json (or its run folder), "
                             "the flags given here on top")
    add_bool_argument(parser, "--resume",
                      help="continue the run in --out under these settings even where they differ from the "
                           "ones it was started with (default: such a re-run is refused, listing what differs)")
    add_shared_fs_argument(parser)
    add_verbose_argument(parser)
    return parser


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, on top of a recorded run's settings when --config names one: the record becomes
    the parser's defaults, so a flag given here wins. With --method given here, the recorded
    method fields are left out (the preset, and its field flags, replace them)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    for flag in ("--config", "--method"):
        first.add_argument(flag)
    given, _ = first.parse_known_args(argv)
    if given.config:
        record = read_run_record(given.config if given.config.endswith(".json") else join(given.config, RUN_RECORD))
        if record is None:
            raise FileNotFoundError(f"--config {given.config}: no such run record")
        parser.set_defaults(data=record["data"], **{f"model_{k}": v for k, v in record["model"].items()},
                            **({} if given.method else record["method"]), **record["train"])
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("the following arguments are required: --data (or --config RUN/config.json)")
    return args


def run_record(data: str, model: ModelConfig, method: MethodConfig, train: TrainConfig) -> dict[str, Any]:
    """What OUT/config.json holds: every setting of a run (a local --data as an absolute path, so
    that the record names the same data from any directory)."""
    return {"data": data if is_remote(data) else os.path.abspath(data), "model": dataclasses.asdict(model),
            "method": dataclasses.asdict(method), "train": dataclasses.asdict(train)}


def read_run_record(uri: str) -> dict[str, Any] | None:
    """A run's config.json, or None where there is none (a new run, or one made before runs kept it)."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as `section.field -> value` (the names MLflow's params have)."""
    return {"data": record["data"], **{f"{section}.{key}": value for section in ("model", "method", "train")
                                       for key, value in record[section].items()}}


def changed_settings(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.field: old -> new` for every compared setting that differs between two records."""
    old, now = _flat(recorded), _flat(new)
    return [f"{key}: {old.get(key)} -> {now.get(key)}" for key in sorted(old.keys() | now.keys())
            if key not in NOT_COMPARED and old.get(key) != now.get(key)]


def check_rerun(out: str, record: dict[str, Any], resume: bool) -> None:
    """Refuse to continue the run in `out` under other settings than it started with, unless
    --resume: its checkpoints would silently go on under the new ones, one set of weights made by
    two configurations. The same settings continue it (or find it finished) as before."""
    recorded = read_run_record(join(out, RUN_RECORD))
    changed = changed_settings(recorded, record) if recorded and not resume else []
    if changed:
        raise ValueError(f"--out {out} holds a run started with other settings:\n  " + "\n  ".join(changed)
                         + "\npass --resume to continue it with the new ones, or another --out for a new run")


def epochs_as_steps(data: str, train: TrainConfig) -> int:
    """The steps run() trains for `train.epochs` on `data`, from the dataset's layout alone (no
    model, no Ray): jobs.tune cuts its rungs from the real length before any trial starts."""
    read_dataset_manifest(data)  # a missing or unfinished dataset is named
    schedule = Schedule(build_index(*shard_files(data)), train.seed, train.workers, train.batch_size,
                        train.shuffle_window)
    steps = schedule.steps_in_epochs(train.epochs)
    if steps == 0:
        raise DatasetError(f"{data}: an epoch has no full global batch ({train.batch_size} x {train.workers} workers)")
    return steps


def batch_spec(clip: torch.nn.Module, model: ModelConfig, method: MethodConfig, train: TrainConfig) -> BatchSpec:
    """What the data pipeline must produce for this model and objective (also used by bench.train)."""
    preprocess = clip.visual.preprocess_cfg
    return BatchSpec(image_size=clip.visual.image_size[0], mean=tuple(preprocess["mean"]),
                     std=tuple(preprocess["std"]), max_regions=train.max_regions, max_lexemes=train.max_lexemes,
                     context_length=clip.context_length, tokenizer=model.name, negative_key=method.negative_key,
                     lexeme_unit=method.lexeme_unit, separate_text=method.lexeme_embedding == "separate_text")


def run(data: str, out: str, model: ModelConfig, method: MethodConfig, train: TrainConfig,
        parent_run_id: str | None = None) -> dict[str, Any]:
    """Train on the current Ray cluster; returns the final metrics (also used by jobs.tune)."""
    clip = create_clip(model)  # fail here, not in a worker, on a bad model name or weights
    if method.needs_anchor and not (model.pretrained or model.init_from):
        print("note: --gr-mode anchor keeps the global embeddings near the starting weights, and these are "
              "random (no --pretrained or --init-from); to train from scratch pass --gr-mode contrastive or "
              "--lambda-gr 0", file=sys.stderr, flush=True)
    spec = batch_spec(clip, model, method, train)
    index, _ = training_index(data, spec)
    if method.needs_anchor:  # the starting model's embeddings, once per dataset: no teacher in the step
        spec = dataclasses.replace(spec, anchor_targets=ensure_anchor_targets(data, index.files, model, train.seed,
                                                                              spec, train.gpu))
    schedule = Schedule(index, train.seed, train.workers, train.batch_size, train.shuffle_window)
    if schedule.plan(0).steps == 0:
        raise DatasetError(f"{data} has {index.images} images: fewer than one global batch "
                           f"({train.batch_size} x {train.workers} workers); each step draws distinct images")
    total_steps = schedule.steps_in_epochs(train.epochs) if train.epochs else train.steps
    run_spec = RunSpec(data, out, model, method, train, spec, ray.put(index), total_steps,
                       max(total_steps, train.schedule_steps or 0), train.mlflow_uri or default_tracking_uri(out),
                       parent_run_id, log_level())
    write_bytes(join(out, RUN_RECORD), json.dumps(run_record(data, model, method, train), indent=2).encode())
    result = finished_result(out, total_steps)
    if result:
        print(f"{out} holds a finished run (step {total_steps}): nothing left to train", flush=True)
    else:
        result = _fit(run_spec)
    _copy_final(result.checkpoint.path, result.checkpoint.filesystem, out)
    weights_fs, weights_path = resolve(join(out, WEIGHTS_FILENAME))
    with weights_fs.open_input_stream(weights_path) as stream:
        write_safetensors(torch.load(io.BytesIO(stream.read()), map_location="cpu", weights_only=True)["state_dict"],
                          out)
    write_model_card(out, data, model, method, train, result.metrics["step"], result.metrics)
    return {**result.metrics, "checkpoint": join(out, WEIGHTS_FILENAME), "tracking_uri": run_spec.tracking_uri}


def finished_result(out: str, total_steps: int) -> ray.train.Result | None:
    """The result of the run in `out` when its latest checkpoint is already at `total_steps`, read
    back from Ray Train's own record of the run; None for a new or unfinished run.

    The same command on a finished run then returns at once instead of starting a controller and
    workers (about 20 s on a laptop) only for them to restore the last checkpoint and stop."""
    storage_path, name, filesystem = run_storage(out)
    try:
        result = ray.train.Result.from_path(join(storage_path, name), storage_filesystem=filesystem)
    except RuntimeError:  # no run there yet, or none that reached a checkpoint
        return None
    return result if result.checkpoint and (result.metrics or {}).get("step") == total_steps else None


def _fit(run_spec: RunSpec) -> ray.train.Result:
    """Train (or go on from the run's last checkpoint) with Ray Train."""
    train = run_spec.train
    storage_path, name, filesystem = run_storage(run_spec.out)
    trainer = TorchTrainer(
        train_worker,
        # Ray Train's controller unpickles train_loop_config too: as an ObjectRef, the RunSpec (a
        # jobs.train class) is unpickled by the workers only, and the controller, which every run
        # waits for, no longer imports jobs.train first (open_clip, MLflow: about 3 s on 2 cores).
        train_loop_config={"spec": ray.put(run_spec)},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.gpu,
                                     placement_strategy=train.placement),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             logging_config=LoggingConfig(log_level=logging.getLevelName(log_level())),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    with user_errors(DatasetError, ValueError, FileNotFoundError):
        args = parse_command_line(argv)
        set_verbose(args.verbose)
        model = model_from_args(args)
        method, train = method_from_args(args), config_from_args(args, TrainConfig)
        check_rerun(args.out, run_record(args.data, model, method, train), args.resume)
        read_dataset_manifest(args.data)  # a missing or unfinished dataset is named before Ray starts
        init_ray()
        check_cluster_storage(args.out, args.shared_fs)
        metrics = run(args.data, args.out, model, method, train)
    print(summary_line(metrics))
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    terms = ", ".join(f"{k} {metrics[k]:.4f}" for k in LOSS_TERMS if k in metrics)
    return (f"done: {metrics['step']} steps, final {terms}; weights {metrics['checkpoint']}; "
            f"MLflow {metrics['tracking_uri']}")


if __name__ == "__main__":
    main()
