"""Command-line flags generated from the config dataclasses, so `--help` shows every field's doc."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

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


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, prefix: str = "") -> None:
    """One `--prefix-field-name` flag per dataclass field, with its help text and default."""
    group = parser.add_argument_group(f"{config_type.__name__}: {config_type.__doc__.strip().splitlines()[0].rstrip('.')}")
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        parse, extra = _parser_type(hints[field.name])
        flag = "--" + (prefix + field.name).replace("_", "-")
        group.add_argument(flag, dest=prefix + field.name, type=parse, default=field.default,
                           help=field.metadata.get("help", ""), **extra)


def config_from_args(args: argparse.Namespace, config_type: type[T], prefix: str = "") -> T:
    return config_type(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(config_type)})
