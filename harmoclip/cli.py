"""Command-line flags generated from the config dataclasses, so `--help` shows every field's doc."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from .checkpoint import model_to_use
from .config import MethodConfig, ModelConfig
from .presets import DEFAULT_METHOD, METHOD_PRESETS, method_preset

T = TypeVar("T")


def _parser_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        parse, extra = _parser_type(inner)
        return (lambda text: None if text.lower() == "none" else parse(text)), extra
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if annotation is bool:
        # `--gpu` alone means true; `--gpu false` spells the default out; any other word is an error.
        return parse_bool, {"metavar": "{true,false}", "nargs": "?", "const": True}
    return annotation, {}


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """A strict boolean: `--gpu ture` is refused (argparse names the flag), never read as false."""
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_field_value(annotation: Any, text: str) -> Any:
    """A config field's value from its command-line text (as its flag would parse it)."""
    parse, extra = _parser_type(annotation)
    value = parse(text)
    if "choices" in extra and value not in extra["choices"]:
        raise ValueError(f"{text!r} is not one of {extra['choices']}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, prefix: str = "",
                         flags: dict[str, str] | None = None, defaults: Any = None) -> argparse._ArgumentGroup:
    """One `--prefix-field-name` flag per dataclass field (or the name `flags` gives it), with its
    help text and default (the field's, or argparse.SUPPRESS when `defaults` is that: then only
    the flags a user gave reach the namespace)."""
    group = parser.add_argument_group(f"{config_type.__name__}: {config_type.__doc__.strip().splitlines()[0].rstrip('.')}")
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        parse, extra = _parser_type(hints[field.name])
        flag = (flags or {}).get(field.name) or "--" + (prefix + field.name).replace("_", "-")
        group.add_argument(flag, dest=prefix + field.name, type=parse,
                           default=field.default if defaults is None else defaults,
                           help=field.metadata.get("help", ""), **extra)
    return group


def config_from_args(args: argparse.Namespace, config_type: type[T], prefix: str = "") -> T:
    return config_type(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(config_type)})


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """`--method NAME` (a preset of harmoclip.presets) and one flag per MethodConfig field, each
    overriding that field of the preset when given."""
    group = add_config_arguments(parser, MethodConfig, defaults=argparse.SUPPRESS)
    presets = ", ".join(METHOD_PRESETS)
    group.description = (f"Start from the preset --method names ({presets}; default {DEFAULT_METHOD}); each "
                         "field flag below overrides that field. docs/method.md lists every preset's fields.")
    group.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHOD_PRESETS),
                       help="named MethodConfig preset the field flags start from")


def method_from_args(args: argparse.Namespace) -> MethodConfig:
    """The preset named by --method with the field flags that were given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MethodConfig) if hasattr(args, f.name)}
    return dataclasses.replace(method_preset(args.method), **given)


MODEL_FLAGS = {"name": "--model", "pretrained": "--pretrained", "init_from": "--init-from",
               "image_size": "--image-size"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--pretrained`, `--init-from`, `--image-size`: the same spelling in every job
    that loads a model."""
    add_config_arguments(parser, ModelConfig, prefix="model_", flags=MODEL_FLAGS)


def model_from_args(args: argparse.Namespace) -> ModelConfig:
    return config_from_args(args, ModelConfig, prefix="model_")


def add_inference_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model an inference job (evaluate, embed, predict) uses: `--checkpoint`, or a base model
    by `--model` and `--pretrained`, spelled as in the training jobs."""
    group = parser.add_argument_group("model to use")
    group.add_argument("--checkpoint", default=None,
                       help="a jobs.train run or checkpoint folder, or an open_clip weights file (then also "
                            "--model), local or s3://")
    group.add_argument(MODEL_FLAGS["name"], dest="model_name", default=None,
                       help="open_clip model name; read from the run folder when --checkpoint is one")
    group.add_argument(MODEL_FLAGS["pretrained"], dest="model_pretrained", default=None,
                       help="instead of --checkpoint: an open_clip pretrained tag or weights file for --model "
                            "(to measure the base model)")
    group.add_argument(MODEL_FLAGS["image_size"], dest="model_image_size", type=int, default=None,
                       help="input side in pixels; default: the one the run was trained at, else the "
                            "architecture's own")


def inference_model_from_args(args: argparse.Namespace) -> ModelConfig:
    return model_to_use(args.checkpoint, args.model_name, args.model_pretrained, args.model_image_size)
