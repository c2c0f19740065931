"""``TrainConfig``: everything a training run needs, as plain data, and its validation.

Kept apart from ``train`` (which imports JAX, flax and optax) so the command line can build
its flags and reject a bad value before importing any of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from flax_captioner.errors import DataError, OptionError, OutputError


def _field(default: Any, help_text: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; plain data (the CLI builds one flag per field).

    String fields left empty mean "not set". Step counts are optimizer steps (one step =
    ``gradient_accumulation_steps`` micro-batches of ``batch_size`` rows). ``validate``
    checks every value (``Trainer`` calls it first), ``check_paths`` the files named.
    """

    train_file: str = _field("", "training data: .jsonl or .csv with image and caption "
                                 "columns, or a COCO captions .json")
    validation_file: str = _field("", "validation data (same formats); evaluated every "
                                      "--eval-every steps and at the end")
    output_dir: str = _field("captioner-run", "run folder: checkpoints/, evals/, export/")
    model: str = _field("", "checkpoint to fine-tune (hub id or directory)")
    encoder: str = _field("", "pretrained ViT (hub id or directory), with --decoder, to start "
                              "from fresh cross-attention instead of --model")
    decoder: str = _field("", "pretrained GPT-2 (hub id or directory), with --encoder")
    image_root: str = _field("", "folder that relative image paths are under (default: the "
                                 "data file's folder)")
    image_column: str = _field("image", "image path column (JSONL/CSV)")
    caption_column: str = _field("caption", "caption column (JSONL/CSV)")
    max_target_length: int = _field(32, "caption length in tokens, EOS included; longer "
                                         "captions are cut")
    batch_size: int = _field(32, "rows per micro-batch, over all devices (padded to a "
                                 "multiple of the device count with zero-weight rows)")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step")
    num_epochs: float = _field(3.0, "passes over the training data (unless --max-steps)")
    max_steps: int = _field(0, "optimizer steps to train; 0: from --num-epochs")
    learning_rate: float = _field(5e-5, "peak learning rate")
    warmup_steps: int = _field(0, "linear warmup steps from 0; then linear decay to 0")
    weight_decay: float = _field(0.0, "AdamW weight decay (not on biases and LayerNorm)")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.999, "AdamW beta2")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon")
    max_grad_norm: float = _field(1.0, "clip gradients to this global norm; 0: no clipping")
    label_smoothing: float = _field(0.0, "label smoothing factor")
    seed: int = _field(42, "seed of data order, dropout and a joined model's new weights")
    save_every: int = _field(500, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _field(3, "checkpoints kept (the newest)")
    eval_every: int = _field(0, "evaluate every N steps; 0: at the end only")
    eval_batch_size: int = _field(64, "rows per evaluation batch")
    max_eval_images: int = _field(0, "images captioned per evaluation; 0: all")
    num_beams: int = _field(4, "beams for evaluation captions")
    max_length: int = _field(16, "evaluation caption length, decoder start token included")
    export_dir: str = _field("", "where the final model is exported (default: "
                                 "OUTPUT_DIR/export)")
    stop_at_step: int = _field(0, "save a checkpoint and stop at this step, to resume later "
                                  "(time-sliced jobs); 0: train to the end")
    progress: bool = _field(True, "show a progress bar")

    def validate(self) -> None:
        """Raises OptionError (a ValueError naming the field, one line) for a value training
        would reject late or misread; nothing is read from disk (``check_paths`` does that).
        """
        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):
            kind, value = hints[field.name], getattr(self, field.name)
            _require(_TYPE_CHECKS[kind](value), field.name,
                     f"must be {_TYPE_NAMES[kind]}, got {value!r}")
        for name, (allowed, requirement) in _RANGES.items():
            value = getattr(self, name)
            _require(allowed(value), name, f"must be {requirement}, got {value!r}")
        for name in ("train_file", "output_dir", "image_column", "caption_column"):
            _require(bool(getattr(self, name)), name, "is not set")
        _require(self.max_steps > 0 or self.num_epochs > 0, "num_epochs",
                 f"must be > 0 when max_steps is 0, got {self.num_epochs!r}")
        if self.model:
            _require(not (self.encoder or self.decoder), "model",
                     "excludes encoder and decoder: start from a captioner, or join a "
                     "pretrained encoder and decoder")
        else:
            _require(bool(self.encoder and self.decoder), "model",
                     "is not set, nor are both encoder and decoder: nothing to start from")

    def check_paths(self) -> None:
        """Fails fast on data files that do not exist and outputs that cannot be folders.

        Raises:
          DataError: ``train_file`` or ``validation_file`` is not a file, or ``image_root``
            is not a folder.
          OutputError: ``output_dir`` or ``export_dir`` exists as a file.
        """
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise DataError(f"{path}: no such file ({name})")
        if self.image_root and not os.path.isdir(self.image_root):
            raise DataError(f"{self.image_root}: no such folder (image_root)")
        for name in ("output_dir", "export_dir"):
            path = getattr(self, name)
            if path and os.path.exists(path) and not os.path.isdir(path):
                raise OutputError(f"{path}: exists and is not a folder ({name})")


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise OptionError(field, problem)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPE_CHECKS = {int: _is_int, float: _is_finite, str: lambda value: isinstance(value, str),
                bool: lambda value: isinstance(value, bool)}
_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "True or False"}

# field -> (test, requirement in words); types are checked first.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "max_target_length": (lambda v: v >= 2, ">= 2 (one token plus EOS)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "num_epochs": (lambda v: v >= 0, ">= 0"),
    "max_steps": (lambda v: v >= 0, ">= 0 (0: from num_epochs)"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # 0 divides 0 by 0 for a parameter whose gradient is still 0.
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # numpy's generators, which order the data, take no negative seed.
    "seed": (lambda v: v >= 0, ">= 0"),
    "save_every": (lambda v: v >= 1, ">= 1"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: at the end only)"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "max_eval_images": (lambda v: v >= 0, ">= 0 (0: all)"),
    "num_beams": (lambda v: v >= 1, ">= 1"),
    "max_length": (lambda v: v >= 2, ">= 2 (the start token plus one)"),
    "stop_at_step": (lambda v: v >= 0, ">= 0 (0: train to the end)"),
}
