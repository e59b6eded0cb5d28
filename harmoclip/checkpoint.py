"""Weights files that open_clip itself loads: `open_clip.create_model(name, pretrained=path)`."""

from __future__ import annotations

import io

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
