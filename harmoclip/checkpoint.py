"""Weights files that open_clip itself loads: `open_clip.create_model(name, pretrained=path)`."""

from __future__ import annotations

import io
import json

import torch
from open_clip.model import CLIP

from .storage import is_remote, resolve

WEIGHTS_FILENAME = "open_clip_weights.pt"


def save_open_clip_weights(clip: CLIP, uri: str) -> str:
    """Write `{"state_dict": ...}` to a local path or s3:// URI; a reader never sees half a file."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in clip.state_dict().items()}}, buffer)
    filesystem, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    target = path if is_remote(uri) else path + ".partial"
    with filesystem.open_output_stream(target) as stream:
        stream.write(buffer.getvalue())
    if target != path:
        filesystem.move(target, path)
    return uri


STATE_FILENAME = "training_state.pt"
CONFIG_FILENAME = "harmoclip.json"


def write_checkpoint(directory: str, clip: CLIP, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, config: dict) -> None:
    """A resumable checkpoint (optimizer, scheduler, step, config) that also holds plain open_clip
    weights and the model name, so `jobs.evaluate` and open_clip can use it directly."""
    save_open_clip_weights(clip, f"{directory}/{WEIGHTS_FILENAME}")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               f"{directory}/{STATE_FILENAME}")
    with open(f"{directory}/{CONFIG_FILENAME}", "w") as handle:
        json.dump({**config, "step": step}, handle, indent=2, sort_keys=True, default=str)


def read_checkpoint_config(directory: str) -> dict:
    filesystem, path = resolve(f"{directory.rstrip('/')}/{CONFIG_FILENAME}")
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{directory} is not a HarmoCLIP checkpoint: no {CONFIG_FILENAME}") from err


def read_training_state(directory: str) -> dict:
    return torch.load(f"{directory}/{STATE_FILENAME}", map_location="cpu", weights_only=True)
