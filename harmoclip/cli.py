"""Command-line flags generated from the config dataclasses, so `--help` shows every field's doc,
and the one convention every job's flags follow: FLAGS (one spelling per concept, one meaning per
spelling), strict booleans (parse_bool), hidden deprecated aliases (add_deprecated_alias).
docs/cli.md is the reader's copy; tests/test_cli.py holds every job's parser to it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from .checkpoint import model_to_use
from .config import REGION_SOURCES, REGIONS_HELP, MethodConfig, ModelConfig
from .model import check_model_name
from .presets import DEFAULT_METHOD, METHOD_PRESETS, method_preset

T = TypeVar("T")

# One flag per concept across every job, and one meaning per flag: wherever a job has one of these
# flags, its help starts with these words (the job may add what it reads, writes or defaults to).
FLAGS: dict[str, str] = {
    "--input": "Raw data to prepare",  # jobs.prepare only: a COCO folder or manifest, never a prepared dataset
    "--images": "Image folder of the real COCO layout",  # jobs.prepare, with --captions
    "--data": "Dataset to read",  # what train, tune, evaluate and embed read (each says which forms it takes)
    "--val-data": "Validation dataset",
    "--image": "One image",
    "--num-images": "Number of images",
    "--out": "Where to write",
    "--overwrite": "Replace what --out holds",
    "--checkpoint": "A trained model",
    "--model": "open_clip model name",
    "--pretrained": "Pretrained weights",
    "--image-size": "Input side in pixels",
    "--classes": "Vocabulary: class names",
    "--labels": "Class names given inline",
    "--templates": "Prompt templates",
    "--regions": "Region proposals",
    "--max-regions": "At most this many regions per image",
    "--min-region-size": "Regions whose width or height is below this fraction of the image side are dropped",
    "--rows-per-batch": "Rows per Ray Data batch",
    "--rows-per-shard": "Rows per output Parquet shard",
    "--batch-size": "Training samples per worker per step",
    "--steps": "Optimizer steps",
    "--seed": "Random seed",
    "--gpu": "Use GPUs",
    "--actors": "Model actors per stage",  # jobs.evaluate, jobs.embed (InferenceConfig.actors)
    "--max-concurrent": "Trials run at once",  # jobs.tune
    "--bf16": "bfloat16 autocast",
    "--verbose": "Also print Ray's own INFO logs",
}
# Other spellings of those concepts: never a visible flag of any job. Where a published command
# used one, the job keeps it as a hidden alias that warns (add_deprecated_alias).
SYNONYMS: dict[str, str] = {
    "--val": "--val-data", "--validation-data": "--val-data",
    "--labels-file": "--classes", "--classes-file": "--classes", "--vocabulary": "--classes",
    "--device": "--gpu", "--cuda": "--gpu",
    "--inference-batch-size": "--rows-per-batch", "--n-images": "--num-images",
    "--output": "--out", "--output-dir": "--out", "--dataset": "--data", "--prepared": "--data",
    "--num-actors": "--actors", "--max-concurrent-trials": "--max-concurrent",
}


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
        return parse_bool, BOOL_FLAG
    return annotation, {}


BOOL_FLAG = {"metavar": "{true,false}", "nargs": "?", "const": True}


def add_bool_argument(container: Any, flag: str, help: str, default: bool = False, **kwargs: Any) -> argparse.Action:
    """A boolean flag as every job spells one: `--flag` or `--flag true` is true, `--flag false`
    false, any other word an error naming the flag."""
    return container.add_argument(flag, type=parse_bool, default=default, help=help, **BOOL_FLAG, **kwargs)


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
        if "choices" not in extra and "metavar" not in extra:
            extra = {**extra, "metavar": flag[2:].replace("-", "_").upper()}  # named as the flag, not the field
        group.add_argument(flag, dest=prefix + field.name, type=parse,
                           default=field.default if defaults is None else defaults,
                           help=argparse.SUPPRESS if field.metadata.get("hidden") else field.metadata.get("help", ""),
                           **extra)
    return group


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: hidden from --help, it sets the new flag's value and says on stderr
    which flag to use instead."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(container: Any, old: str, new: str, dest: str, type: Any = None) -> argparse.Action:
    """Keep `old` (a spelling a published command used) working as a hidden alias of `new`, whose
    value lands in `dest` (`type` turns the old flag's text into the new flag's value). Add it to
    `new`'s mutually exclusive group where there is one: a required flag needs such a group, so
    that the alias counts as giving it."""
    return container.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, type=type,
                                  default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def device_is_gpu(text: str) -> bool:
    """The deprecated `--device` value as `--gpu`'s: cpu is false, cuda (or cuda:N) true."""
    if text == "cpu":
        return False
    if text == "cuda" or text.startswith("cuda:"):
        return True
    raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r} (use --gpu true|false)")


def add_regions_argument(container: Any, default: str | None, use: str,
                         choices: tuple[str, ...] = REGION_SOURCES) -> argparse.Action:
    """`--regions` as every job spells it: the same values with the same meaning (REGIONS_HELP);
    `use` says what this job does with the boxes and its default, `choices` the values it takes."""
    assert set(choices) <= set(REGION_SOURCES), choices
    return container.add_argument("--regions", default=default, choices=list(choices), help=f"{REGIONS_HELP}. {use}")


def help_value(value: Any) -> str:
    """A default as --help shows it: booleans and None as the words the flags take (true, false,
    none), lists space-separated, and `%` escaped (argparse %-formats help texts)."""
    if isinstance(value, (list, tuple)):
        text = " ".join(map(str, value))
    else:
        text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return text.replace("%", "%%")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every job's --help: the description as written, and each flag's default after its help
    (unless the help already says it, or there is none to show), so no default is hidden."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, argparse.SUPPRESS, "", []) or "default" in text.lower() or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: {help_value(default)})".lstrip()


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
    shipped = METHOD_PRESETS[DEFAULT_METHOD]
    for action in group._group_actions:  # the field flags' defaults are the preset's: show the shipped one's
        if action.help and action.help is not argparse.SUPPRESS and hasattr(shipped, action.dest):
            action.help += f" ({DEFAULT_METHOD}: {help_value(getattr(shipped, action.dest))})"


def method_from_args(args: argparse.Namespace) -> MethodConfig:
    """The preset named by --method with the field flags that were given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MethodConfig) if hasattr(args, f.name)}
    return dataclasses.replace(method_preset(args.method), **given)


MODEL_FLAGS = {"name": "--model", "pretrained": "--pretrained", "init_from": "--init-from",
               "image_size": "--image-size"}
# InferenceConfig.batch_size is rows of a Ray Data batch, as PrepareConfig.batch_size is: the flag
# --rows-per-batch in jobs.prepare, jobs.evaluate and jobs.embed (--batch-size is a training batch).
INFERENCE_FLAGS = PREPARE_FLAGS = {"batch_size": "--rows-per-batch"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--pretrained`, `--init-from`, `--image-size`: the same spelling in every job
    that loads a model."""
    add_config_arguments(parser, ModelConfig, prefix="model_", flags=MODEL_FLAGS)


def model_from_args(args: argparse.Namespace) -> ModelConfig:
    """The model flags of a training job; a misspelt --model is refused here, before Ray starts."""
    model = config_from_args(args, ModelConfig, prefix="model_")
    check_model_name(model.name)
    return model


def add_inference_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model an inference job (evaluate, embed, predict) uses: `--checkpoint`, or a base model
    by `--model` and `--pretrained`, spelled as in the training jobs."""
    group = parser.add_argument_group("model to use")
    group.add_argument("--checkpoint", default=None,
                       help="A trained model: a jobs.train run or checkpoint folder, or an open_clip weights file "
                            "(then also --model), local or s3://")
    group.add_argument(MODEL_FLAGS["name"], dest="model_name", default=None, metavar="MODEL",
                       help="open_clip model name; read from the run folder when --checkpoint is one")
    group.add_argument(MODEL_FLAGS["pretrained"], dest="model_pretrained", default=None, metavar="PRETRAINED",
                       help="Pretrained weights for --model, instead of --checkpoint: an open_clip pretrained tag "
                            "or weights file (to measure the base model)")
    group.add_argument(MODEL_FLAGS["image_size"], dest="model_image_size", type=int, default=None,
                       metavar="IMAGE_SIZE",
                       help="Input side in pixels; default: the one the run was trained at, else the architecture's own")


def inference_model_from_args(args: argparse.Namespace) -> ModelConfig:
    """The model an inference job loads; a misspelt --model is refused here, before Ray starts."""
    model = model_to_use(args.checkpoint, args.model_name, args.model_pretrained, args.model_image_size)
    check_model_name(model.name)
    return model
