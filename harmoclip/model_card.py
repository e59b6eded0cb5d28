"""What a finished run leaves for people and other tools: `model.safetensors` (the open_clip
weights in the format hubs and inference servers expect) and `MODEL_CARD.md` (what the model is,
how it was made, how to load it), beside the open_clip checkpoint."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from safetensors.torch import save

from .config import MethodConfig, ModelConfig, TrainConfig
from .presets import METHOD_PRESETS
from .storage import join, write_bytes

SAFETENSORS_FILENAME = "model.safetensors"
CARD_FILENAME = "MODEL_CARD.md"


def preset_of(method: MethodConfig) -> str:
    """The preset these fields equal, or a description of how they differ from the default."""
    for name, preset in METHOD_PRESETS.items():
        if preset == method:
            return f"`{name}`"
    default = MethodConfig()
    changed = [f"{f.name}={getattr(method, f.name)}" for f in dataclasses.fields(MethodConfig)
               if getattr(method, f.name) != getattr(default, f.name)]
    return "custom: " + ", ".join(changed)


def write_safetensors(state_dict: dict[str, torch.Tensor], out: str) -> str:
    """OUT/model.safetensors: loadable by `open_clip.create_model(name, pretrained=path)`."""
    uri = join(out, SAFETENSORS_FILENAME)
    write_bytes(uri, save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}))
    return uri


def write_model_card(out: str, data: str, model: ModelConfig, method: MethodConfig, train: TrainConfig,
                     steps: int, metrics: dict[str, Any]) -> str:
    """OUT/MODEL_CARD.md from the run's own record."""
    start = model.init_from or model.pretrained or "random initialisation"
    teacher = ("yes: GR anchor mode pulls the global embeddings towards the starting model's (targets cached "
               "once per dataset)" if method.needs_anchor else "no")
    losses = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "gc", "lrc", "gr") if k in metrics)
    fields = "\n".join(f"| `{f.name}` | `{getattr(method, f.name)}` |" for f in dataclasses.fields(MethodConfig))
    card = io.StringIO()
    card.write(f"""# {model.name} fine-tuned with HarmoCLIP

A region-aware CLIP model trained with HarmoCLIP (global contrastive, lexeme-region contrastive and
global-region alignment losses; arXiv 2511.22594) by `jobs.train` of HarmoCLIP on Ray.

| | |
|---|---|
| architecture | open_clip `{model.name}`, {f"{model.image_size} px input" if model.image_size else "its own input size"} |
| starting weights | {start} |
| method | {preset_of(method)} |
| teacher in the objective | {teacher} |
| training data | `{data}` |
| steps | {steps} (batch {train.batch_size} per worker x {train.workers} workers, lr {train.lr}, seed {train.seed}) |
| final training losses | {losses} |

Evaluate it (retrieval both ways, box classification) with
`python -m jobs.evaluate --checkpoint {out} --data YOUR_VAL`: training losses say little about
either. One seed is one run; compare methods over several seeds (`python -m bench.harmony`).

## Load it

```python
import open_clip
clip = open_clip.create_model("{model.name}", pretrained="{join(out, SAFETENSORS_FILENAME)}")
```

(`open_clip_weights.pt` beside it holds the same weights as a torch file; `harmoclip.json` the
run's config. This project's tiny architectures need `harmoclip.register_tiny_configs()` first.)

## Method fields

| field | value |
|---|---|
{fields}
""")
    uri = join(out, CARD_FILENAME)
    write_bytes(uri, card.getvalue().encode())
    return uri
