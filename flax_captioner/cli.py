"""Command line: argument parsing and checks only; every command calls the library.

Every flag value, the inputs and the output are checked before JAX, transformers or a model
loads, so ``--help`` and a typo answer at once. Errors are one line on stderr, never a
traceback; a library error's ``fix`` keys become flag hints, and an ``OptionError``'s field
the flag that sets it. The ``caption`` flags are ``CaptionOptions``' fields.

Exit status, distinct for a scheduler: 0 every image captioned (the command did its work);
1 the command could not finish, an error (the work that succeeded is kept); 2 a usage error
(bad flags, bad settings); 3 it finished, but some inputs became error rows (``caption``) or
could not be read (``parity``, which also exits 1 when a caption differs); 128 + the signal's
number when stopped by one, in every phase (130 SIGINT, 143 SIGTERM; 141 when stdout closes
early, as in ``| head``).

Signals: the executable (``main(own_process=True)``) ends at once on SIGINT or SIGTERM, with
one line on stderr, except in a caption run's captioning loop, where a first signal finishes
the batches on the device and flushes their rows (a second ends it at once). Ending at once
loses nothing a rerun does not redo: every output commit is atomic and resumes exactly, as
after a kill -9. ``main`` called from Python raises and returns instead, and leaves SIGINT to
Python.
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

from flax_captioner.errors import CaptionerError, DataError, OptionError, PipelineInterrupted
from flax_captioner.options import CaptionOptions, output_format
from flax_captioner.train_config import TrainConfig

if typing.TYPE_CHECKING:  # imported at run time only once the flags are checked
    from flax_captioner.captioner import Captioner
    from flax_captioner.sources import CheckedInputs

PROG = "flax-captioner"

# Exit statuses besides 0 and 128 + a signal's number (the module docstring says when).
EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED = 1, 2, 3
EXIT_STATUS_HELP = ("exit status: 0 every image captioned; 1 the run could not finish (an "
                    "error; rows written so far stay); 2 a usage error; 3 the run finished, but "
                    "some inputs became error rows; 130 (SIGINT) or 143 (SIGTERM) when stopped "
                    "by a signal (the same command resumes)")
# CaptionOptions fields that caption has no flag for: per-step arrays of Captioner.generate,
# which rows do not hold (run_pipeline refuses them; rows carry --token-logprobs instead).
CAPTION_EXCLUDED = ("output_scores", "output_logits")
# Generation fields parity has no flag for: it compares deterministic searches.
PARITY_EXCLUDED = ("do_sample", "seed")

# errors.FIXES key -> the flags that apply it (a test keeps the keys in step).
FIX_HINTS = {
    "start_over": "start over with --no-resume",
    "other_output": "write to another --output",
    "extend": "add only the inputs it lacks with --extend",
    "overwrite": "replace it with --overwrite",
    "resume_processes": "rerun the stopped processes with the same --output, then "
                        f"`{PROG} merge`",
    "lower_learning_rate": "lower --learning-rate or raise --warmup-steps",
    "smaller_batch": "use a smaller --batch-size N",
}

# Flag groups' descriptions (a field's ``group`` metadata names its group).
GROUPS = {"generation": "unset settings come from the checkpoint's generation config; the "
                        "values in brackets are the default model's"}


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


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
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


_count, _index = _at_least(1), _at_least(0)


def _host_port(text: str) -> str:
    """An argparse type: HOST:PORT, the port in 1-65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, e.g. 10.0.0.1:1234, got {text!r}")
    return text


# A field's ``kind`` metadata -> the argparse type that reads its flag.
KINDS: dict[str, Callable[[str], Any]] = {
    "count": _count, "seconds": _positive_seconds, "json": _json_value,
    "json_object": _json_object, "early_stopping": _early_stopping}


def flag_of(field: dataclasses.Field) -> str | None:
    """The command-line flag that sets a dataclass field (None: none does)."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type,
                         only: Callable[[dataclasses.Field], bool] | None = None) -> None:
    """One flag per dataclass field (``only`` those it accepts), typed and documented from
    the field: its type, and its metadata (``options._option``: flag, action, kind, choices,
    metavar, help, default_text, group). The flag's destination is the field's name."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        flag, meta = flag_of(field), field.metadata
        if flag is None or (only is not None and not only(field)):
            continue
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())  # type: ignore[misc]
        types = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        is_bool = bool in types and types <= {bool, type(None)}  # bool, or bool | None
        action = meta.get("action", "optional" if is_bool else None)
        if "default_text" in meta:
            shown = f" [{meta['default_text']}]"
        elif default in (None, "") or action in ("store_true", "store_false"):
            shown = ""  # unset, or said by the flag itself
        else:
            shown = f" [{default}]"
        options: dict[str, Any] = {"dest": field.name, "default": default,
                                   "help": meta.get("help", "") + shown}
        if action == "optional":
            options["action"] = argparse.BooleanOptionalAction
        elif action is not None:
            options["action"] = action
        else:
            hint = hints[field.name]
            inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            if typing.get_origin(hint) is tuple:
                hint, options["nargs"] = inner[0], "*"
            elif inner:
                hint = inner[0]
            options["type"] = KINDS[meta["kind"]] if "kind" in meta else (
                hint if hint in (int, float, str) else str)
            options.update({key: meta[key] for key in ("choices", "metavar") if key in meta})
        group = meta.get("group")
        if group is not None and group not in groups:
            groups[group] = parser.add_argument_group(group, GROUPS.get(group))
        (groups[group] if group is not None else parser).add_argument(flag, **options)


def _caption_options(args: argparse.Namespace) -> CaptionOptions:
    """The ``CaptionOptions`` the flags give (fields without a flag keep their default).

    Raises:
      OptionError: a value no run accepts (the field is shown as its flag).
    """
    return CaptionOptions(**{field.name: getattr(args, field.name)
                             for field in dataclasses.fields(CaptionOptions)
                             if hasattr(args, field.name)})


def check_caption_run(args: argparse.Namespace,
                      options: CaptionOptions) -> CheckedInputs:
    """Everything a caption run can get wrong before the model loads: the compilation
    cache, inputs (a glob matching nothing, no image at all) and the output (its name and
    format first). Returns the checked inputs (the run lists no glob again). Imports no JAX
    (the point: a typo answers in a second, not after loading)."""
    options.check_paths()
    output_format(args.output, options.output_format, format_hint="or --format")
    # Imported here, after the flag checks: PIL, numpy and pyarrow take most of a second.
    from flax_captioner.preflight import check_run

    inputs, _ = check_run(args.inputs, args.output, options)
    return inputs


def _import_transformers_without_torch() -> None:
    """Imports transformers with its PyTorch integration off (``USE_TORCH=0``), unless it is
    imported already. Captioning needs none (.bin weights are read with torch directly), and
    transformers importing PyTorch costs seconds of every cold start (docs/results/history.md,
    "Start-up and compilation"). It
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


def _load_captioner(options: CaptionOptions) -> Captioner:
    _quiet_transformers()
    from flax_captioner.captioner import Captioner

    return Captioner.from_options(options)


def cmd_caption(args: argparse.Namespace) -> int:
    options = _caption_options(args)
    _check_distributed_flags(args)
    inputs = check_caption_run(args, options)
    if args.own_process:
        _import_transformers_without_torch()
    if args.distributed:
        _initialize_distributed(args)
    captioner = _load_captioner(options)
    from flax_captioner.pipeline import run_pipeline

    try:
        stats = run_pipeline(inputs, args.output, options, captioner)
    except PipelineInterrupted as error:
        if error.stats is not None:  # None: a second signal cut the run short
            print(error.stats.summary(), file=sys.stderr)
        raise
    print(stats.summary(), file=sys.stderr)
    return EXIT_SOME_FAILED if stats.errors else 0


# jax.distributed.initialize keyword argument -> the caption flag that sets it.
DISTRIBUTED_FLAGS = {"coordinator_address": "--coordinator-address",
                     "num_processes": "--num-processes", "process_id": "--process-id"}


def _check_distributed_flags(args: argparse.Namespace) -> None:
    """Raises ValueError (a usage error) for a process flag without --distributed, or a
    process id past the process count; before anything loads."""
    given = [flag for name, flag in DISTRIBUTED_FLAGS.items() if getattr(args, name) is not None]
    if given and not args.distributed:
        raise ValueError(f"{given[0]} is for a multi-process run: add --distributed")
    if args.num_processes is not None and args.process_id is not None and \
            args.process_id >= args.num_processes:
        raise ValueError(f"--process-id must be < --num-processes ({args.num_processes}), "
                         f"got {args.process_id}")


def _initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with the flags given; what they leave unset comes from
    the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)."""
    import jax

    try:
        jax.distributed.initialize(**{name: getattr(args, name) for name in DISTRIBUTED_FLAGS})
    except ValueError as error:  # no cluster told what the flags leave unset
        raise ValueError(f"--distributed: {_one_line(str(error)).rstrip('.')}; outside Cloud "
                         "TPU, SLURM, Open MPI and Kubernetes pass --coordinator-address, "
                         "--num-processes and --process-id") from None
    except RuntimeError as error:  # the coordinator did not answer in time
        raise CaptionerError(f"--distributed: {_one_line(str(error))}") from None


def cmd_merge(args: argparse.Namespace) -> int:
    from flax_captioner.writers import find_parts, merge_shards

    format_ = output_format(args.output, None, format_hint=None)
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
    # Deterministic searches only: PyTorch's sampling draws other random numbers.
    options = _caption_options(args).replace(parallelism="none", do_sample=False)
    for image in args.images:
        if _missing_local_path(image):
            raise DataError(f"{image}: no such file")
    # The inputs caption takes; an unreadable image is reported, and the others compared.
    from flax_captioner.preflight import check_run

    inputs, _ = check_run(args.images, None, options)
    _quiet_transformers()
    from flax_captioner.loading import torch_available
    from flax_captioner.parity import compare_inputs, format_report
    from flax_captioner.sources import iter_inputs

    if not torch_available():
        raise CaptionerError("parity runs PyTorch generate beside this generator; install "
                             "PyTorch (pip install 'flax-captioner[torch]')")
    captioner = _load_captioner(options)
    settings = captioner.settings(**options.generation_overrides())
    report = compare_inputs(captioner, iter_inputs(inputs, options.storage_options), settings,
                            options)
    print(format_report(report))
    if not report.all_match:
        return EXIT_ERROR
    return EXIT_SOME_FAILED if report.unreadable else 0


def _missing_local_path(path: str) -> bool:
    """A local path (no URL, glob, brace pattern or ``pipe:`` command) that does not exist."""
    import glob

    from flax_captioner import storage
    from flax_captioner.sources import PIPE_PREFIX, expand_braces

    if storage.is_remote(path) or path.startswith(PIPE_PREFIX):
        return False
    local = storage.local_path(path)
    return not (glob.has_magic(local) or expand_braces(local) != [local]
                or os.path.exists(local))


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
                    "local paths or fsspec URLs (s3://, gs://, hf://, https://, ...).",
        epilog=EXIT_STATUS_HELP)
    caption.add_argument("inputs", nargs="+", metavar="INPUT")
    caption.add_argument("--output", "-o", default=None,
                         help="output file (.jsonl, .parquet or .pq; .json is refused: the "
                              "rows are JSON Lines); stdout JSONL when omitted")
    caption.add_argument("--distributed", action="store_true",
                         help="multi-host: call jax.distributed.initialize() first; each "
                              "process captions its slice, process 0 merges the shards")
    caption.add_argument("--coordinator-address", type=_host_port, metavar="HOST:PORT",
                         help="--distributed: process 0's address, the same in every process "
                              "(unset: from Cloud TPU, SLURM, Open MPI or Kubernetes)")
    caption.add_argument("--num-processes", type=_count, metavar="N",
                         help="--distributed: the number of processes (unset: from the cluster)")
    caption.add_argument("--process-id", type=_index, metavar="I",
                         help="--distributed: this process's index, 0 to N - 1 (unset: from "
                              "the cluster)")
    # Every other flag: a CaptionOptions field.
    _add_dataclass_flags(caption, CaptionOptions,
                         only=lambda field: field.name not in CAPTION_EXCLUDED)
    caption.set_defaults(handler=cmd_caption)

    merge = commands.add_parser(
        "merge", help="merge a multi-host run's per-process shards into one file",
        description="Merge OUTPUT's per-process shards (written under jax.distributed) "
                    "into OUTPUT, in input order.")
    merge.add_argument("output")
    merge.add_argument("--storage-options", type=_json_object, default=None,
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
                    "first differing step. INPUT: what caption takes (image files, "
                    "directories, globs, path lists, tar shards, tables).",
        epilog="exit status: 0 every caption matches; 1 a caption differs, or the comparison "
               "could not run; 2 a usage error; 3 every caption compared matches, but some "
               "images could not be read (listed in the report)")
    parity.add_argument("images", nargs="+", metavar="INPUT")
    _add_dataclass_flags(parity, CaptionOptions, only=lambda field: field.name in (
        "model", "revision") or (field.metadata.get("group") == "generation"
                                 and field.name not in PARITY_EXCLUDED))
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
    KeyboardInterrupt does for SIGINT (``main`` called from Python)."""


def _raise_terminated(signum: int, frame: Any) -> NoReturn:
    raise _Terminated


class _EndAtOnce:
    """The executable's SIGINT and SIGTERM handler: one line on stderr, then the process ends
    with 128 + the signal's number, at once.

    No exception unwinds: one raised while JAX's garbage-collection callback runs is
    swallowed (the run went on to exit 0), and one unwinding while XLA compiles crashed the
    interpreter's exit (SIGSEGV). Ending at once is safe: every output commit is atomic, and a
    rerun resumes from the last one, as after a kill -9. ``ends_process`` tells the captioning
    pipeline, which finishes the batches on the device after a first signal, to call this
    handler at a second one.

    Attributes:
      hint: what the line adds once the command is known (how to resume).
    """

    ends_process = True

    def __init__(self) -> None:
        self.hint = ""

    def __call__(self, signum: int, frame: Any) -> NoReturn:
        with contextlib.suppress(Exception):  # mid-write to stdout: a rerun redoes those rows
            sys.stdout.flush()
        # Decoding processes would print broken-pipe tracebacks as they answered a vanished
        # process.
        multiprocessing = sys.modules.get("multiprocessing")
        for child in multiprocessing.active_children() if multiprocessing else ():
            child.kill()
        # On a terminal the progress bar holds the line. os.write, not print: a signal that
        # arrives mid-print would make print a reentrant call, which raises.
        newline = "\n" if os.isatty(2) else ""
        os.write(2, f"{newline}{PROG}: error: interrupted by {signal.Signals(signum).name}"
                    f"{self.hint}\n".encode())
        os._exit(128 + signum)


def _resume_hint(args: argparse.Namespace) -> str:
    """How a command stopped by a signal goes on: ``_EndAtOnce.hint``."""
    if args.command == "caption" and args.output is not None:
        return "; run the same command again to resume"
    if args.command == "train":
        return "; run the same command again to resume from the last checkpoint"
    return ""


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines())


def _with_flag(error: OptionError, command_parser: argparse.ArgumentParser) -> str:
    """``error``'s message with the flag that sets its field in the field's place
    (``--batch-size must ...``); the field's own name where the command has no such flag."""
    for action in command_parser._actions:  # noqa: SLF001 (argparse has no API for them)
        if action.dest == error.field and action.option_strings:
            return f"{action.option_strings[0]} {error.problem}"
    return str(error)


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
    except OptionError as error:  # a flag's value, or values that exclude each other
        return _fail(_with_flag(error, args.command_parser), EXIT_USAGE)
    except CaptionerError as error:
        return _fail(_with_hints(error), EXIT_ERROR)
    except ValueError as error:  # invalid flag combinations
        return _fail(str(error), EXIT_USAGE)
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
        return _fail(f"{where}{error.strerror or error}", EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted by SIGINT", 128 + signal.SIGINT)
    except _Terminated:
        return _fail("interrupted by SIGTERM", 128 + signal.SIGTERM)


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Runs the command line; returns the exit status (see the module docstring).

    ``own_process``: the process runs this one command (the executable), so process-wide
    choices such as ``_import_transformers_without_torch`` are allowed, and SIGINT and SIGTERM
    end it at once (``_EndAtOnce``; handlers set first, before any import), but for a first
    signal in a caption run's captioning loop.
    """
    end_at_once = _EndAtOnce()
    if own_process:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, end_at_once)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    args.own_process = own_process
    end_at_once.hint = _resume_hint(args)
    with _log_lines():
        # The executable's handlers are set; off the main thread none can be.
        if own_process or threading.current_thread() is not threading.main_thread():
            return _handle(args)
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
