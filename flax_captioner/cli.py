"""Command line: argument parsing and checks only; every command calls the library.

Every flag value, the inputs and the output are checked before JAX, transformers or a model
loads, so ``--help`` and a typo answer at once. Errors are one line on stderr, never a
traceback; a library error's ``fix`` keys become flag hints.

Exit status: 0 success; 1 when any image failed or a command could not finish (the work that
succeeded is kept); 2 for usage errors (bad flags, bad settings); 128 + the signal's number
when stopped by one (130 SIGINT, 143 SIGTERM; 141 when stdout closes early, as in ``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from flax_captioner.defaults import DEFAULT_MODEL
from flax_captioner.errors import CaptionerError, DataError, PipelineInterrupted
from flax_captioner.train_config import TrainConfig

if typing.TYPE_CHECKING:  # imported at run time only once the flags are checked
    from flax_captioner.sources import CheckedInputs

PROG = "flax-captioner"

# errors.FIXES key -> the flags that apply it (a test keeps the keys in step).
FIX_HINTS = {
    "start_over": "start over with --no-resume",
    "other_output": "write to another --output",
    "overwrite": "replace it with --overwrite",
    "resume_processes": "rerun the stopped processes with the same --output, then "
                        f"`{PROG} merge`",
    "lower_learning_rate": "lower --learning-rate or raise --warmup-steps",
    "smaller_batch": "use a smaller --batch-size N",
}

OUTPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

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
    ("--min-p", float, "sample only tokens with >= this fraction of the top token's probability"),
    ("--typical-p", float, "locally typical sampling mass (1.0 = off)"),
    ("--epsilon-cutoff", float, "sample only tokens with probability >= this (0 = off)"),
    ("--eta-cutoff", float, "eta sampling cutoff (0 = off)"),
    ("--sequence-bias", "json", "JSON list of [token ids, bias] pairs, e.g. '[[[7], -2.0]]'"),
    ("--forced-bos-token-id", int, "token forced as the first generated token"),
    ("--forced-eos-token-id", int, "token forced as the last token at max length"),
    ("--exponential-decay-length-penalty", "json",
     "JSON [start_index, decay_factor]: raise the EOS score after start_index tokens"),
    ("--suppress-tokens", "json", "JSON list of token ids never generated, e.g. '[7, 9]'"),
    ("--begin-suppress-tokens", "json", "JSON list of token ids not generated first"),
    ("--renormalize-logits", "flag", "log-softmax the scores after all processors"),
    ("--remove-invalid-values", "flag", "replace nan/inf scores by finite values"),
    ("--output-scores", "flag", "also return the processed scores of every step"),
    ("--output-logits", "flag", "also return the raw logits of every step"),
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


def _storage_options(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


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
    # List values stay JSON lists: GenerationSettings.resolve checks their shape and makes
    # them tuples (a flat "[12]" for bad_words_ids is a one-line error there, not a crash).
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_generation_flags(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first generation flag whose value no model accepts, by
    the library's own rules (``GenerationSettings.check_overrides``: plain Python, no JAX)."""
    from flax_captioner.settings import GenerationSettings

    GenerationSettings.check_overrides(**_generation_settings(args))


def _add_model_flags(parser: argparse.ArgumentParser, *, default_model: bool = True) -> None:
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


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def output_format(output: str | None, requested: str | None, *,
                  format_flag: bool = True) -> str | None:
    """The format named by ``requested`` (``--format``), else by the suffix of ``output``;
    None for stdout. ``format_flag``: the command has ``--format`` (the message offers it).

    Raises:
      ValueError: an output whose suffix names no format this tool writes.
    """
    if requested is not None or output is None:
        return requested
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{output}: unknown output suffix {suffix!r}; use .jsonl, .json, "
                         f".parquet or .pq" + (", or --format" if format_flag else ""))
    return OUTPUT_SUFFIXES[suffix]


def check_caption_run(args: argparse.Namespace) -> tuple[str, CheckedInputs]:
    """Everything a caption run can get wrong before the model loads: flag values, inputs
    (a glob matching nothing, no image at all) and the output. Returns the output format and
    the checked inputs (the run lists no glob again). Imports no JAX (the point: a typo
    answers in a second, not after loading)."""
    check_generation_flags(args)
    if not 0 <= args.seed < 2**63:  # what a JAX PRNG key takes
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    cache = args.compilation_cache
    if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
        raise ValueError(f"--compilation-cache {cache}: not a folder")
    requested_format = output_format(args.output, args.format)
    # Imported here, after the flag checks: PIL, numpy and pyarrow take most of a second.
    from flax_captioner.preflight import check_run

    inputs, resolved = check_run(args.inputs, args.output, requested_format,
                                 storage_options=args.storage_options,
                                 image_column=args.image_column, id_column=args.id_column)
    return resolved, inputs


def _import_transformers_without_torch() -> None:
    """Imports transformers with its PyTorch integration off (``USE_TORCH=0``), unless it is
    imported already. Captioning needs none (.bin weights are read with torch directly), and
    transformers importing PyTorch costs 5-9 s of every cold start (docs/benchmarks.md). It
    is a choice for the whole process, so only the executable (``main(own_process=True)``,
    one command per process) makes it, never ``main`` called from Python. The variable is
    restored at once, so child processes see the user's environment."""
    if "transformers" in sys.modules or "USE_TORCH" in os.environ:
        return
    os.environ["USE_TORCH"] = "0"
    try:
        import transformers  # noqa: F401  (reads USE_TORCH once, at import)
    finally:
        del os.environ["USE_TORCH"]


def _quiet_transformers() -> None:
    # transformers 4.x warns on every run that v5 drops Flax; the project pins < 5 on purpose.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def _load_captioner(args: argparse.Namespace) -> Any:
    _quiet_transformers()
    import jax.numpy as jnp

    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import enable_compilation_cache

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    return Captioner.from_pretrained(args.model, revision=args.revision, dtype=dtype,
                                     parallelism=args.parallelism)


def cmd_caption(args: argparse.Namespace) -> int:
    resolved_format, inputs = check_caption_run(args)
    if args.own_process:
        _import_transformers_without_torch()
    if args.distributed:
        import jax

        jax.distributed.initialize()
    captioner = _load_captioner(args)
    from flax_captioner.decode_processes import use_processes
    from flax_captioner.feed import decode_threads
    from flax_captioner.pipeline import run_pipeline

    decode_processes = args.decode_processes
    if decode_processes is None:
        decode_processes = use_processes(decode_threads(args.threads))
    stats = run_pipeline(
        captioner, inputs, args.output, batch_size=args.batch_size,
        output_format=resolved_format, resume=not args.no_resume, num_threads=args.threads,
        decode_processes=decode_processes,
        seed=args.seed, settings=_generation_settings(args), exif_transpose=args.exif_transpose,
        fast_decode=args.fast_decode, token_logprobs=args.token_logprobs,
        **({} if args.process_timeout is None else {"process_timeout_s": args.process_timeout}),
        storage_options=args.storage_options, image_column=args.image_column,
        id_column=args.id_column)
    return 1 if stats.errors else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from flax_captioner.writers import find_parts, merge_shards

    format_ = output_format(args.output, None, format_flag=False)
    parts = find_parts(args.output, args.storage_options)
    rows = merge_shards(args.output, format_, args.storage_options)
    print(f"merged {rows} rows from {len(parts)} parts into {args.output}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from flax_captioner.loading import convert

    destination = convert(args.source, args.destination, to_pytorch=args.to_pytorch,
                          revision=args.revision, overwrite=args.overwrite)
    kind = "PyTorch" if args.to_pytorch else "Flax"
    print(f"wrote a {kind} checkpoint to {destination}", file=sys.stderr)
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    check_generation_flags(args)
    for image in args.images:
        if not os.path.isfile(image):
            raise DataError(f"{image}: no such file")
    _quiet_transformers()
    from flax_captioner.captioner import Captioner
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
    config = TrainConfig(**{field.name: getattr(args, field.name)
                            for field in dataclasses.fields(TrainConfig)})
    config.validate()
    config.check_paths()
    _quiet_transformers()
    from flax_captioner.train import train

    result = train(config)
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other error of this tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ViT-GPT2 image captioning in JAX/Flax.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser(
        "caption", help="caption images into JSONL or Parquet",
        description="Caption images. INPUT: image files, directories (recursive), glob "
                    "patterns, .txt/.csv lists of paths, WebDataset .tar shards (brace "
                    "patterns, pipe:COMMAND), or Parquet/Arrow tables of encoded images; "
                    "local paths or fsspec URLs (s3://, gs://, hf://, https://, ...).")
    caption.add_argument("inputs", nargs="+", metavar="INPUT")
    _add_model_flags(caption)
    caption.add_argument("--output", "-o", default=None,
                         help="output file (.jsonl, .json, .parquet or .pq); stdout JSONL "
                              "when omitted")
    caption.add_argument("--format", choices=("jsonl", "parquet"), default=None,
                         help="output format [from the --output suffix, else jsonl]")
    caption.add_argument("--batch-size", type=_count(1), default=None, metavar="N",
                         help="images per batch, split over the local devices [8 on CPU; 256 "
                              "per GPU/TPU chip, fewer if its memory is short]")
    caption.add_argument("--threads", type=_count(1), default=None, metavar="N",
                         help="image decoding threads [all cores]")
    caption.add_argument("--decode-processes", action=argparse.BooleanOptionalAction,
                         default=None,
                         help="each decoding thread hands its images to a worker process, "
                              "past Python's GIL [on with more than 4 threads]")
    caption.add_argument("--no-resume", action="store_true",
                         help="start over instead of continuing an existing --output")
    caption.add_argument("--token-logprobs", action="store_true",
                         help="rows also list the log-probability of every generated token")
    caption.add_argument("--exif-transpose", action="store_true",
                         help="rotate images by their EXIF orientation first, as transformers' "
                              "pipeline does [off: the model card's behaviour, which parity "
                              "with PyTorch assumes]")
    caption.add_argument("--fast-decode", action="store_true",
                         help="decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT domain) when still "
                              "larger than the model's input: faster on large photos, pixels "
                              "close to but not equal to ViTImageProcessor's [off: exact]")
    caption.add_argument("--distributed", action="store_true",
                         help="multi-host: call jax.distributed.initialize() first; each "
                              "process captions its slice, process 0 merges the shards")
    caption.add_argument("--process-timeout", type=_positive_seconds, default=None,
                         metavar="SECONDS",
                         help="--distributed: how long a finished process waits while no "
                              "unfinished process makes progress, before naming them [600]")
    caption.add_argument("--storage-options", type=_storage_options, default=None,
                         metavar="JSON",
                         help="fsspec options for URL inputs and output, e.g. "
                              "'{\"endpoint_url\": \"http://host:9000\"}' [fsspec's config]")
    caption.add_argument("--image-column", default=None, metavar="NAME",
                         help="Parquet/Arrow inputs: column of encoded images [detected]")
    caption.add_argument("--id-column", default=None, metavar="NAME",
                         help="Parquet/Arrow inputs: column naming each row [key, id, ...]")
    _add_runtime_flags(caption)
    _add_generation_flags(caption)
    caption.set_defaults(handler=cmd_caption)

    merge = commands.add_parser(
        "merge", help="merge a multi-host run's per-process shards into one file",
        description="Merge OUTPUT's per-process shards (written under jax.distributed) "
                    "into OUTPUT, in input order.")
    merge.add_argument("output")
    merge.add_argument("--storage-options", type=_storage_options, default=None,
                       metavar="JSON", help="fsspec options for an OUTPUT URL, as in caption")
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
    _add_dataclass_flags(train, TrainConfig)
    train.set_defaults(handler=cmd_train)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)
    return parser


class _Terminated(BaseException):
    """SIGTERM outside the captioning loop (which stops cleanly on its own), unwinding like
    KeyboardInterrupt does for SIGINT."""


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise _Terminated


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines())


def _with_flag(message: str, command_parser: argparse.ArgumentParser) -> str:
    """``message`` with its leading setting name (``batch_size must ...``, as the library
    words them) replaced by the flag that sets it (``--batch-size must ...``)."""
    name, space, rest = message.partition(" ")
    flag = "--" + name.replace("_", "-")
    known = flag in command_parser._option_string_actions  # noqa: SLF001 (argparse has no API)
    return f"{flag}{space}{rest}" if known else message


def _with_hints(error: CaptionerError) -> str:
    hints = " or ".join(FIX_HINTS[key] for key in error.fix)
    return f"{error}; {hints}" if hints else str(error)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


def _handle(args: argparse.Namespace) -> int:
    """Runs the command; every error it raises on purpose becomes one line and a status."""
    try:
        return args.handler(args)
    except PipelineInterrupted as error:
        return _fail(str(error), 128 + error.signal_number)
    except CaptionerError as error:
        return _fail(_with_hints(error), 1)
    except ValueError as error:  # invalid settings or flag combinations
        return _fail(_with_flag(str(error), args.command_parser), 2)
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, as Unix tools do; rows written so far
        # stay. stdout goes to devnull, or the interpreter's final flush fails once more.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured)
            pass
        return 128 + signal.SIGPIPE
    except OSError as error:  # the environment (a full disk, permissions), not the input
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted by SIGINT", 128 + signal.SIGINT)
    except _Terminated:
        return _fail("interrupted by SIGTERM", 128 + signal.SIGTERM)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Runs the command line; returns the exit status (see the module docstring).

    ``own_process``: the process runs this one command (the executable), so process-wide
    choices such as ``_import_transformers_without_torch`` are allowed.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    args.own_process = own_process
    with _log_lines():
        if threading.current_thread() is not threading.main_thread():
            return _handle(args)  # signal handlers can only be set in the main thread
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return _handle(args)
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _log_lines() -> Iterator[None]:
    """The package's log records as ``flax-captioner: message`` lines on stderr (INFO and up),
    whatever a dependency did to the root logger (``WARNING:module:`` prefixes)."""
    package_logger = logging.getLogger("flax_captioner")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = package_logger.level, package_logger.propagate
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.level, package_logger.propagate = saved


def run() -> NoReturn:
    """The ``flax-captioner`` executable: one command per process."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    run()
