"""Command-line flags generated from the config dataclasses, so `--help` shows every field's doc."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from .config import ModelConfig

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
        return (lambda text: text.lower() in ("1", "true", "yes", "on")), {"metavar": "{true,false}"}
    return annotation, {}


def parse_field_value(annotation: Any, text: str) -> Any:
    """A config field's value from its command-line text (as its flag would parse it)."""
    parse, extra = _parser_type(annotation)
    value = parse(text)
    if "choices" in extra and value not in extra["choices"]:
        raise ValueError(f"{text!r} is not one of {extra['choices']}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, prefix: str = "",
                         flags: dict[str, str] | None = None) -> None:
    """One `--prefix-field-name` flag per dataclass field (or the name `flags` gives it), with its
    help text and default."""
    group = parser.add_argument_group(f"{config_type.__name__}: {config_type.__doc__.strip().splitlines()[0].rstrip('.')}")
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        parse, extra = _parser_type(hints[field.name])
        flag = (flags or {}).get(field.name) or "--" + (prefix + field.name).replace("_", "-")
        group.add_argument(flag, dest=prefix + field.name, type=parse, default=field.default,
                           help=field.metadata.get("help", ""), **extra)


def config_from_args(args: argparse.Namespace, config_type: type[T], prefix: str = "") -> T:
    return config_type(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(config_type)})


MODEL_FLAGS = {"name": "--model", "pretrained": "--pretrained", "init_from": "--init-from"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--pretrained`, `--init-from`: the same spelling in every job that loads a model."""
    add_config_arguments(parser, ModelConfig, prefix="model_", flags=MODEL_FLAGS)


def model_from_args(args: argparse.Namespace) -> ModelConfig:
    return config_from_args(args, ModelConfig, prefix="model_")
