"""Command line: argument parsing only; every command calls the library.

Exit codes: 0 success, 1 when any image failed or a command could not finish (the work
that succeeded is kept), 2 for usage errors (bad flags, bad settings). Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

PROG = "flax-captioner"

# (flag, type, help) for every generation setting; each maps to a GenerationSettings field.
GENERATION_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--num-beams", int, "beams per image (1 = greedy) [4]"),
    ("--max-length", int, "maximum caption length in tokens, decoder_start included [16]"),
    ("--max-new-tokens", int, "maximum generated tokens (overrides --max-length)"),
    ("--min-length", int, "minimum length before EOS is allowed"),
    ("--length-penalty", float, "beam score = logp / length ** penalty [1.0]"),
    ("--early-stopping", "early_stopping", "true, false or never [false]"),
    ("--num-return-sequences", int, "captions returned per image (<= num beams) [1]"),
    ("--no-repeat-ngram-size", int, "forbid repeating n-grams of this size"),
    ("--repetition-penalty", float, "CTRL-style repetition penalty (1.0 = none)"),
    ("--bad-words-ids", "json", "JSON list of forbidden token-id sequences, e.g. '[[12],[7,9]]'"),
    ("--do-sample", "flag", "sample instead of searching"),
    ("--temperature", float, "sampling temperature"),
    ("--top-k", int, "sample from the k most likely tokens"),
    ("--top-p", float, "sample from the smallest set with this probability mass"),
)


def _early_stopping(text: str) -> bool | str:
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")
    return value


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    for flag, kind, help_text in GENERATION_FLAGS:
        if kind == "flag":
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parse = {"early_stopping": _early_stopping, "json": _json_value}.get(kind, kind)
            group.add_argument(flag, type=parse, default=None, help=help_text)
    group.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling [0]")


def _generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags the user set, as GenerationSettings keyword arguments."""
    names = [flag[2:].replace("-", "_") for flag, _, _ in GENERATION_FLAGS]
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "bad_words_ids" in settings:
        settings["bad_words_ids"] = tuple(tuple(ids) for ids in settings["bad_words_ids"])
    return settings


def _add_model_flags(parser: argparse.ArgumentParser, *, default_model: bool = True) -> None:
    from flax_captioner.loading import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL if default_model else None,
                        required=not default_model,
                        help=f"hub id or checkpoint directory [{DEFAULT_MODEL}]")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype [float32]")
    parser.add_argument("--parallelism", choices=("mesh", "pmap", "none"), default="mesh",
                        help="how batches are sharded over local devices [mesh]")
    parser.add_argument("--compilation-cache", metavar="DIR", default=None,
                        help="JAX persistent compilation cache directory (cuts restarts)")


def _load_captioner(args: argparse.Namespace) -> Any:
    import jax.numpy as jnp

    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import enable_compilation_cache

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    return Captioner.from_pretrained(args.model, revision=args.revision, dtype=dtype,
                                     parallelism=args.parallelism)


def cmd_caption(args: argparse.Namespace) -> int:
    from flax_captioner.pipeline import check_run, run_pipeline

    if args.distributed:
        import jax

        jax.distributed.initialize()
    check_run(args.inputs, args.output, args.format)  # bad inputs fail before the model loads
    captioner = _load_captioner(args)
    stats = run_pipeline(
        captioner, args.inputs, args.output, batch_size=args.batch_size,
        output_format=args.format, resume=not args.no_resume, num_threads=args.threads,
        seed=args.seed, settings=_generation_settings(args))
    return 1 if stats.errors else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from flax_captioner.writers import merge_shards

    merge_shards(args.output)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from flax_captioner.loading import convert

    destination = convert(args.source, args.destination, to_pytorch=args.to_pytorch,
                          revision=args.revision, overwrite=args.overwrite)
    kind = "PyTorch" if args.to_pytorch else "Flax"
    print(f"wrote a {kind} checkpoint to {destination}", file=sys.stderr)
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from flax_captioner.captioner import Captioner
    from flax_captioner.errors import CaptionerError
    from flax_captioner.loading import torch_available
    from flax_captioner.parity import compare_with_pytorch, format_report

    if not torch_available():
        raise CaptionerError("parity runs PyTorch generate beside this generator; install "
                             "PyTorch (pip install 'flax-captioner[torch]')")
    captioner = Captioner.from_pretrained(args.model, revision=args.revision, parallelism="none")
    settings = captioner.settings(**{"num_beams": 4, "max_length": 16,
                                     **_generation_settings(args)})
    pixel_values = captioner.preprocess(args.images)
    report = compare_with_pytorch(captioner, pixel_values, settings)
    print(format_report(report, names=args.images))
    return 0 if report.all_match else 1


def cmd_train(args: argparse.Namespace) -> int:
    from flax_captioner.train import TrainConfig, train

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    result = train(TrainConfig(**values))
    print(result.summary(), file=sys.stderr)
    return 0


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per dataclass field, typed and documented from the field."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())  # type: ignore[misc]
        help_text = f"{field.metadata.get('help', '')} [{default}]"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=inner[0], nargs="*", default=default, help=help_text)
            continue
        base = inner[0] if inner else hint
        parser.add_argument(flag, type=base if base in (int, float, str) else str,
                            default=default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="ViT-GPT2 image captioning in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser(
        "caption", help="caption images into JSONL or Parquet",
        description="Caption images. INPUT: image files, directories (recursive), glob "
                    "patterns, .txt/.csv lists of paths, or WebDataset .tar shards.")
    caption.add_argument("inputs", nargs="+", metavar="INPUT")
    _add_model_flags(caption)
    caption.add_argument("--output", "-o", default=None,
                         help="output file (.jsonl or .parquet); stdout JSONL when omitted")
    caption.add_argument("--format", choices=("jsonl", "parquet"), default=None,
                         help="output format [from the --output suffix, else jsonl]")
    caption.add_argument("--batch-size", type=int, default=8, help="images per batch [8]")
    caption.add_argument("--threads", type=int, default=None,
                         help="image decoding threads [all cores]")
    caption.add_argument("--no-resume", action="store_true",
                         help="start over instead of continuing an existing --output")
    caption.add_argument("--distributed", action="store_true",
                         help="multi-host: call jax.distributed.initialize() first; each "
                              "process captions its slice, process 0 merges the shards")
    _add_runtime_flags(caption)
    _add_generation_flags(caption)
    caption.set_defaults(handler=cmd_caption)

    merge = commands.add_parser(
        "merge", help="merge a multi-host run's per-process shards into one file",
        description="Merge OUTPUT's per-process shards (written under jax.distributed) "
                    "into OUTPUT, in input order.")
    merge.add_argument("output")
    merge.set_defaults(handler=cmd_merge)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to Flax-native (or PyTorch) files",
        description="Write SOURCE (hub id or directory) as a Flax-native directory that loads "
                    "without PyTorch, or with --to-pytorch as a PyTorch one.")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--to-pytorch", action="store_true",
                         help="write model.safetensors for VisionEncoderDecoderModel")
    convert.add_argument("--revision", default=None, help="hub branch, tag or commit")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a checkpoint already in DESTINATION")
    convert.set_defaults(handler=cmd_convert)

    parity = commands.add_parser(
        "parity", help="compare captions with PyTorch generate on the same weights",
        description="Run PyTorch generate and this generator on the same images and weights; "
                    "print per image whether the tokens match, the score difference and the "
                    "first differing step. Exit 1 when any caption differs.")
    parity.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_flags(parity)
    _add_generation_flags(parity)
    parity.set_defaults(handler=cmd_parity)

    train = commands.add_parser(
        "train", help="fine-tune with optax (data-parallel, resumable)",
        description="Fine-tune a captioner on JSONL/CSV {image, caption} rows or COCO captions.")
    from flax_captioner.train import TrainConfig

    _add_dataclass_flags(train, TrainConfig)
    train.set_defaults(handler=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from flax_captioner.errors import CaptionerError

    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers 4.x warns on every run that v5 drops Flax; the project pins < 5 on purpose.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    try:
        return args.handler(args)
    except CaptionerError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # invalid settings or flag combinations
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
