"""WiSE-FT: blend a fine-tuned run's weights with the weights it started from.

`(1 - alpha) * start + alpha * fine-tuned`, tensor by tensor, at one or more alphas; each blend
becomes a run folder (`OUT/alpha0.5/`) that jobs.evaluate, jobs.embed and jobs.predict load with
`--checkpoint` like any run. It costs no training and keeps no second model: the classic way to
keep what the starting model knew while taking part of what fine-tuning added. The starting
weights are the run's own `--init-from` or `--pretrained`, read from its recorded config.

    python -m jobs.interpolate --checkpoint outputs/run --alpha 0.25 0.5 0.75 --out outputs/run-wise
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from harmoclip import ModelConfig, create_clip
from harmoclip.cli import HelpFormatter
from harmoclip.checkpoint import (CONFIG_FILENAME, WEIGHTS_FILENAME, interpolate_weights, model_to_use,
                                  read_checkpoint_config, save_open_clip_weights)
from jobs.common import add_verbose_argument, set_verbose, user_errors


def starting_model(run: str) -> ModelConfig:
    """The weights `run` was fine-tuned from, as its recorded config names them."""
    trained = read_checkpoint_config(run)["model"]
    if not (trained.get("init_from") or trained.get("pretrained")):
        raise ValueError(f"{run} was trained from random weights (no --init-from or --pretrained): there is "
                         "nothing to interpolate towards")
    return ModelConfig(name=trained["name"], pretrained=trained.get("pretrained"),
                       init_from=trained.get("init_from"), image_size=trained.get("image_size"))


def interpolate_run(run: str, alphas: list[float], out: str) -> list[str]:
    """Write one run folder per alpha, `out/alpha<A>/`; returns their paths."""
    return write_blends(run, {alpha: os.path.join(out, f"alpha{alpha:g}") for alpha in alphas})


def write_blends(run: str, folders: dict[float, str]) -> list[str]:
    """The blends of `run` with its starting weights, one run folder per alpha (`folders`: alpha ->
    folder); the run and its start are loaded once for all of them."""
    for alpha in folders:
        if not 0 <= alpha <= 1:
            raise ValueError(f"--alpha {alpha}: must be in [0, 1] (0 is the starting model, 1 the run)")
    if not folders:
        return []
    config, source = read_checkpoint_config(run), starting_model(run)
    start = create_clip(source).state_dict()
    end = create_clip(model_to_use(run, None, None)).state_dict()
    clip = create_clip(ModelConfig(name=config["model"]["name"], image_size=config["model"].get("image_size")))
    for alpha, folder in folders.items():
        clip.load_state_dict(interpolate_weights(start, end, alpha))
        save_open_clip_weights(clip, f"{folder}/{WEIGHTS_FILENAME}")
        with open(f"{folder}/{CONFIG_FILENAME}", "w") as handle:
            json.dump({**config, "interpolation": {"start": source.init_from or source.pretrained, "run": run,
                                                   "alpha": alpha}}, handle, indent=2, sort_keys=True, default=str)
        print(f"alpha {alpha:g}: {folder}", flush=True)
    return list(folders.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.interpolate", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="A trained model: a jobs.train run folder (local; it names its start)")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5],
                        help="weight of the fine-tuned run in each blend (0: the starting model, 1: the run)")
    parser.add_argument("--out", required=True, help="Where to write: one run folder per alpha (alpha0.5/, ...)")
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(ValueError, OSError), torch.no_grad():  # OSError: a run or --out that cannot be read or written
        return interpolate_run(args.checkpoint, args.alpha, args.out)


if __name__ == "__main__":
    main()
