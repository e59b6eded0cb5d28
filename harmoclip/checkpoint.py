"""Weights files that open_clip itself loads: `open_clip.create_model(name, pretrained=path)`."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

import torch
from open_clip.model import CLIP

if TYPE_CHECKING:
    from .model import HarmoCLIP

from .config import ModelConfig
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
                     scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, config: dict,
                     loss_parameters: dict[str, torch.Tensor] | None = None) -> None:
    """A resumable checkpoint (optimizer, scheduler, step, loss temperatures, config) that also
    holds plain open_clip weights and the model name, so `jobs.evaluate` and open_clip can use it
    directly."""
    save_open_clip_weights(clip, f"{directory}/{WEIGHTS_FILENAME}")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "loss_parameters": {k: v.detach().cpu() for k, v in (loss_parameters or {}).items()}},
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


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def weights_of_run(uri: str, model_name: str) -> str:
    """The weights file of a run or checkpoint folder (checking it holds `model_name`), or `uri`
    itself when it already names a weights file."""
    if uri.endswith(WEIGHT_SUFFIXES):
        return uri
    trained = read_checkpoint_config(uri)["model"]["name"]
    if trained != model_name:
        raise ValueError(f"{uri} holds a {trained} model, not {model_name}: pass --model {trained}")
    return f"{uri.rstrip('/')}/{WEIGHTS_FILENAME}"


def model_to_use(checkpoint: str | None, model_name: str | None, pretrained: str | None,
                 image_size: int | None = None) -> ModelConfig:
    """The model an inference job loads: a jobs.train run or checkpoint folder (it names its
    architecture and input size), a bare weights file with its architecture, or a base open_clip
    model (`model_name` with an open_clip tag or weights file as `pretrained`)."""
    if checkpoint and pretrained:
        raise ValueError("--checkpoint and --pretrained both name the weights to use; pass one")
    if checkpoint is None:
        if not (model_name and pretrained):
            raise ValueError("say which model to use: --checkpoint RUN_OR_WEIGHTS, or --model NAME with "
                             "--pretrained TAG_OR_FILE for a base open_clip model")
        return ModelConfig(name=model_name, pretrained=pretrained, image_size=image_size)
    if checkpoint.endswith(WEIGHT_SUFFIXES):
        if not model_name:
            raise ValueError(f"{checkpoint} is a weights file: say which architecture it is with --model")
        return ModelConfig(name=model_name, pretrained=checkpoint, image_size=image_size)
    trained = read_checkpoint_config(checkpoint)["model"]
    return ModelConfig(name=model_name or trained["name"], init_from=checkpoint,
                       image_size=image_size or trained.get("image_size"))


def interpolate_weights(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: `(1 - alpha) * start + alpha * end` for every floating tensor of two state dicts of
    one architecture (integer buffers are taken from `end`). torch.lerp is exact at both ends, so
    alpha 0 gives `start` and alpha 1 gives `end` bit for bit."""
    if start.keys() != end.keys():
        raise ValueError(f"the two weights differ in tensors: {sorted(set(start) ^ set(end))[:5]}")
    blended = {}
    for name, end_value in end.items():
        if start[name].shape != end_value.shape:
            raise ValueError(f"{name}: shape {tuple(start[name].shape)} vs {tuple(end_value.shape)}")
        blended[name] = (torch.lerp(start[name].to(end_value.dtype), end_value, alpha)
                         if end_value.is_floating_point() else end_value)
    return blended


def read_training_state(directory: str) -> dict:
    return torch.load(f"{directory}/{STATE_FILENAME}", map_location="cpu", weights_only=True)


def load_checkpoint(directory: str, model: HarmoCLIP, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore everything `write_checkpoint` saved into a fresh model, optimizer and scheduler
    (built as for a new run); returns the step to continue after."""
    model.clip.load_state_dict(torch.load(f"{directory}/{WEIGHTS_FILENAME}", map_location="cpu",
                                          weights_only=True)["state_dict"])
    state = read_training_state(directory)
    with torch.no_grad():
        for name, param in model.loss_parameters().items():
            param.copy_(state["loss_parameters"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
