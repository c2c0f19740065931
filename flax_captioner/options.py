"""``CaptionOptions``: every captioning choice, as plain data, and its validation; and the
output-format rule.

Imports nothing heavy (no JAX, numpy or transformers): the command line generates its
``caption`` flags from these fields and rejects a bad value before it loads anything.
``run_pipeline``, ``Captioner.caption`` and ``ray_data.CaptionImages`` take the same object,
so the Python API and the command line share every default, written once, here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from flax_captioner.defaults import DEFAULT_MODEL
from flax_captioner.errors import OptionError

DTYPES = ("float32", "bfloat16")
PARALLELISM = ("mesh", "pmap", "none")
OUTPUT_FORMATS = ("jsonl", "parquet")
JPEG_DECODERS = ("pillow", "nvimagecodec")
# output suffix -> format; a .json output is refused (``output_format``).
OUTPUT_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _option(default: Any, help_text: str, **cli: Any) -> Any:
    """A field with its help. ``cli`` says how the command line shows it (``cli._add_dataclass_
    flags``): ``flag`` (None: no flag), ``action``, ``kind`` (a parser: "count", "seconds",
    "json", "json_object", "early_stopping"), ``choices``, ``metavar``, ``default_text`` (the
    default as the help words it) and ``group``."""
    return dataclasses.field(default=default, metadata={"help": help_text, **cli})


def _setting(help_text: str, **cli: Any) -> Any:
    """A ``GenerationSettings`` override: unset (None), the checkpoint's value applies."""
    return _option(None, help_text, group="generation", setting=True, **cli)


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """Every captioning choice; plain data, validated when made (``OptionError`` naming the
    field). ``replace`` makes a changed copy.

    - Model: ``model``, ``revision``, ``dtype``, ``parallelism``, ``compilation_cache`` choose
      what ``Captioner.from_options`` loads (``run_pipeline`` and ``CaptionImages`` load it;
      given a ``Captioner``, these fields are not used).
    - Input: ``batch_size``, ``decode_threads``, ``decode_processes``, ``exif_transpose``,
      ``fast_decode``, ``resize_on_device``, ``jpeg_decoder``, ``image_column``,
      ``id_column``, ``storage_options``.
    - Output (``run_pipeline``): ``output_format``, ``resume``, ``extend``, ``token_logprobs``,
      ``progress``, ``flush_seconds``, ``process_timeout_seconds``.
    - Generation: every ``GenerationSettings`` field PyTorch's ``generate`` takes, None
      meaning the checkpoint's value (its ``generation_config.json``, else the model card's
      usage); ``seed`` for sampling.
    """

    model: str = _option(DEFAULT_MODEL, "hub id or checkpoint directory")
    revision: str | None = _option(None, "hub branch, tag or commit")
    output_format: str | None = _option(
        None, "output format", flag="--format", choices=OUTPUT_FORMATS,
        default_text="from the --output suffix, else jsonl")
    batch_size: int | None = _option(
        None, "images per batch, split over the local devices", kind="count", metavar="N",
        default_text="8 on CPU; 256 per GPU/TPU chip, fewer if its memory is short")
    decode_threads: int | None = _option(
        None, "image decoding threads", flag="--threads", kind="count", metavar="N",
        default_text="all cores")
    decode_processes: bool | None = _option(
        None, "each decoding thread hands its images to a worker process, past Python's GIL",
        default_text="on with more than 4 threads")
    resume: bool = _option(True, "start over instead of continuing an existing --output",
                           flag="--no-resume", action="store_false")
    extend: bool = _option(
        False, "add rows for the inputs --output lacks (matched by image name) after the "
               "ones it holds, whatever their order; its rows' settings must be this run's",
        action="store_true")
    token_logprobs: bool = _option(
        False, "rows also list the log-probability of every generated token",
        action="store_true")
    exif_transpose: bool = _option(
        False, "rotate images by their EXIF orientation first, as transformers' pipeline does",
        action="store_true",
        default_text="off: the model card's behaviour, which parity with PyTorch assumes")
    fast_decode: bool = _option(
        False, "decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT domain) when still larger than the "
               "model's input: faster on large photos, pixels close to but not equal to "
               "ViTImageProcessor's", action="store_true", default_text="off: exact")
    resize_on_device: bool = _option(
        False, "the host only decodes images; the compiled program resizes and normalises "
               "them with PIL's own arithmetic (the same pixel values, bit for bit)",
        action="store_true",
        default_text="off: the host resizes, faster on CPUs (docs/performance.md, \"Resizing "
                     "on the device\")")
    jpeg_decoder: str | None = _option(
        None, "JPEG decoder: nvimagecodec (NVIDIA nvImageCodec's CPU decoder) gives Pillow's "
              "pixels bit for bit, faster, on the JPEG kinds it takes; Pillow decodes the "
              "rest", choices=JPEG_DECODERS,
        default_text="nvimagecodec when installed (pip install 'flax-captioner[nvimagecodec]'), "
                     "else pillow")
    # Silence, not total wait: long enough for a first compile or a slow batch; a killed
    # process is usually caught sooner by JAX's heartbeat check.
    process_timeout_seconds: float = _option(
        600, "--distributed: how long a finished process waits while no unfinished process "
               "makes progress, before naming them", flag="--process-timeout", kind="seconds",
        metavar="SECONDS")
    storage_options: dict[str, Any] | None = _option(
        None, "fsspec options for URL inputs and output, e.g. "
              "'{\"endpoint_url\": \"http://host:9000\"}'", kind="json_object", metavar="JSON",
        default_text="fsspec's config")
    image_column: str | None = _option(
        None, "Parquet/Arrow inputs: column of encoded images", metavar="NAME",
        default_text="detected")
    id_column: str | None = _option(
        None, "Parquet/Arrow inputs: column naming each row", metavar="NAME",
        default_text="key, id, ...")
    dtype: str = _option("float32", "compute dtype", choices=DTYPES)
    parallelism: str = _option("mesh", "how batches are sharded over local devices",
                               choices=PARALLELISM)
    compilation_cache: str | None = _option(
        None, "JAX persistent compilation cache directory (cuts restarts)", metavar="DIR")
    progress: bool | None = _option(
        None, "a progress bar on stderr (None: on a terminal, elsewhere once a run has lasted "
              "30 s; only process 0 of a multi-process run)", flag=None)
    flush_seconds: float = _option(
        30.0, "Parquet rows, and rows to an object store, reach the output at least this "
              "often (and every 1,024 rows); JSONL files get every batch", flag=None)

    # Generation settings: PyTorch generate's names and meanings (settings.GenerationSettings).
    num_beams: int | None = _setting("beams per image (1 = greedy)", default_text="4")
    max_length: int | None = _setting(
        "maximum caption length in tokens, decoder_start included", default_text="16")
    max_new_tokens: int | None = _setting("maximum generated tokens (overrides --max-length)")
    min_length: int | None = _setting("minimum length before EOS is allowed")
    length_penalty: float | None = _setting("beam score = logp / length ** penalty",
                                            default_text="1.0")
    early_stopping: bool | str | None = _setting("true, false or never", kind="early_stopping",
                                                 default_text="false")
    num_return_sequences: int | None = _setting("captions returned per image (<= num beams)",
                                                default_text="1")
    no_repeat_ngram_size: int | None = _setting("forbid repeating n-grams of this size")
    repetition_penalty: float | None = _setting("CTRL-style repetition penalty (1.0 = none)")
    bad_words_ids: Any = _setting(
        "JSON list of forbidden token-id sequences, e.g. '[[12],[7,9]]'", kind="json")
    do_sample: bool | None = _setting("sample instead of searching", action="store_true")
    temperature: float | None = _setting("sampling temperature")
    top_k: int | None = _setting("sample from the k most likely tokens")
    top_p: float | None = _setting("sample from the smallest set with this probability mass")
    min_p: float | None = _setting(
        "sample only tokens with >= this fraction of the top token's probability")
    typical_p: float | None = _setting("locally typical sampling mass (1.0 = off)")
    epsilon_cutoff: float | None = _setting(
        "sample only tokens with probability >= this (0 = off)")
    eta_cutoff: float | None = _setting("eta sampling cutoff (0 = off)")
    sequence_bias: Any = _setting(
        "JSON list of [token ids, bias] pairs, e.g. '[[[7], -2.0]]'", kind="json")
    forced_bos_token_id: int | None = _setting("token forced as the first generated token")
    forced_eos_token_id: int | None = _setting("token forced as the last token at max length")
    exponential_decay_length_penalty: Any = _setting(
        "JSON [start_index, decay_factor]: raise the EOS score after start_index tokens",
        kind="json")
    suppress_tokens: Any = _setting("JSON list of token ids never generated, e.g. '[7, 9]'",
                                    kind="json")
    begin_suppress_tokens: Any = _setting("JSON list of token ids not generated first",
                                          kind="json")
    renormalize_logits: bool | None = _setting("log-softmax the scores after all processors",
                                               action="store_true")
    remove_invalid_values: bool | None = _setting("replace nan/inf scores by finite values",
                                                  action="store_true")
    output_scores: bool | None = _setting("also return the processed scores of every step",
                                          action="store_true")
    output_logits: bool | None = _setting("also return the raw logits of every step",
                                          action="store_true")
    seed: int = _option(0, "PRNG seed for sampling; image i of a run samples with "
                           "fold_in(key(seed), i), however it is batched", group="generation")
    # Settings without a flag: the checkpoint's token ids, and the minimum in new tokens.
    min_new_tokens: int | None = _setting("minimum generated tokens (overrides min_length)",
                                          flag=None)
    decoder_start_token_id: int | None = _setting("the decoder's first token", flag=None)
    pad_token_id: int | None = _setting("the token padding finished captions", flag=None)
    eos_token_id: int | None = _setting("the token ending a caption", flag=None)

    def __post_init__(self) -> None:
        for name in ("model", "compilation_cache"):  # paths may come as os.PathLike
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if isinstance(self.storage_options, Mapping):
            object.__setattr__(self, "storage_options", dict(self.storage_options))
        for name, (allowed, requirement) in _CHECKS.items():
            value = getattr(self, name)
            if not allowed(value):
                raise OptionError(name, f"must be {requirement}, got {value!r}")
        if self.extend and not self.resume:
            raise OptionError("extend", "adds to the output's rows, which resume=False removes")
        # The settings' own rules (plain Python and numpy, no JAX); rules between settings
        # and the checkpoint's limits apply once a checkpoint is loaded.
        from flax_captioner.settings import GenerationSettings

        GenerationSettings.check_overrides(**self.generation_overrides())

    def replace(self, **changes: Any) -> CaptionOptions:
        """A copy with ``changes`` applied, validated.

        Raises:
          OptionError: a name that is no field, or a bad value.
        """
        names = {field.name for field in dataclasses.fields(self)}
        for name in changes:
            if name not in names:
                raise OptionError(name, "is not a caption option (see CaptionOptions)")
        return dataclasses.replace(self, **changes) if changes else self

    def generation_overrides(self) -> dict[str, Any]:
        """The generation settings set here, as ``GenerationSettings.resolve`` keywords."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.metadata.get("setting") and getattr(self, field.name) is not None}

    def check_paths(self) -> None:
        """Fails fast on a compilation cache that cannot be a folder (reads the disk)."""
        cache = self.compilation_cache
        if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
            raise OptionError("compilation_cache", f"{cache}: not a folder")


def output_format(output: str | None, requested: str | None = None, *,
                  format_hint: str | None = "or set output_format") -> str:
    """The format of ``output``'s rows: the one its suffix names (.jsonl; .parquet or .pq),
    or for another suffix the ``requested`` one; JSONL on stdout (None).

    A .json output is refused: the rows are JSON Lines, which ``json.load`` cannot read.
    ``format_hint`` ends the message for a suffix naming no format (the command line's is
    ``"or --format"``; None where the format cannot be named).

    Raises:
      ValueError: one line: a refused or unknown suffix, a ``requested`` format the suffix
        contradicts or that does not exist, or Parquet to stdout.
    """
    if requested is not None and requested not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be jsonl or parquet, got {requested!r}")
    if output is None:
        if requested == "parquet":
            raise ValueError("Parquet output needs an output file; stdout gets JSONL")
        return "jsonl"
    if "://" not in output and os.path.isdir(output):
        raise ValueError(f"{output}: is a folder; name a file in it, e.g. "
                         f"{os.path.join(output, 'captions.jsonl')}")
    suffix = os.path.splitext(output)[1].lower()
    if suffix == ".json":
        raise ValueError(f"{output}: a .json output would hold JSON Lines, which json.load "
                         "cannot read; name it .jsonl")
    by_suffix = OUTPUT_SUFFIXES.get(suffix)
    if by_suffix is None:
        if requested is None:
            raise ValueError(f"{output}: unknown output suffix {suffix!r}; use .jsonl, .parquet "
                             "or .pq" + (f", {format_hint}" if format_hint else ""))
        return requested
    if requested is not None and requested != by_suffix:
        raise ValueError(f"{output}: the suffix {suffix} names {by_suffix} output, not the "
                         f"{requested} asked for")
    return by_suffix


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# field -> (test, requirement in words), for the fields that are no generation setting.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and v != "", "a hub id or checkpoint directory"),
    "revision": (_optional(_is_string), "a string or None"),
    "output_format": (_optional(lambda v: v in OUTPUT_FORMATS),
                      "jsonl, parquet or None (from the output's suffix)"),
    "batch_size": (_optional(lambda v: _is_int(v) and v >= 1),
                   "an integer >= 1 or None (the backend's default)"),
    "decode_threads": (_optional(lambda v: _is_int(v) and v >= 1),
                       "an integer >= 1 or None (one per CPU core)"),
    "decode_processes": (_optional(_is_bool), "True, False or None (by the thread count)"),
    "resume": (_is_bool, "True or False"),
    "extend": (_is_bool, "True or False"),
    "token_logprobs": (_is_bool, "True or False"),
    "exif_transpose": (_is_bool, "True or False"),
    "fast_decode": (_is_bool, "True or False"),
    "resize_on_device": (_is_bool, "True or False"),
    "jpeg_decoder": (_optional(lambda v: v in JPEG_DECODERS),
                     "pillow, nvimagecodec or None (nvimagecodec when installed)"),
    "process_timeout_seconds": (lambda v: _is_finite(v) and v > 0, "a number of seconds > 0"),
    "storage_options": (_optional(lambda v: isinstance(v, dict)), "a dict or None"),
    "image_column": (_optional(_is_string), "a column name or None (detected)"),
    "id_column": (_optional(_is_string), "a column name or None (detected)"),
    "dtype": (lambda v: v in DTYPES, "float32 or bfloat16"),
    "parallelism": (lambda v: v in PARALLELISM, "mesh, pmap or none"),
    "compilation_cache": (_optional(_is_string), "a folder or None"),
    "progress": (_optional(_is_bool), "True, False or None (on a terminal)"),
    "flush_seconds": (lambda v: _is_finite(v) and v >= 0, "a number of seconds >= 0"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**63, "in [0, 2**63)"),  # a JAX PRNG key's
}
