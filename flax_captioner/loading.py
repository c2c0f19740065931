"""Checkpoints in and out: hub id or local directory -> FlaxVisionEncoderDecoderModel, and back.

A checkpoint directory holds ``config.json`` (a vision-encoder-decoder config), weights
(``flax_model.msgpack``, ``model.safetensors`` or ``pytorch_model.bin``), a tokenizer and a
``preprocessor_config.json``. PyTorch weights are converted to Flax on load; ``.bin`` files are
pickles and need PyTorch, safetensors do not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from flax_captioner.errors import ModelLoadError
from flax_captioner.preprocess import PreprocessConfig

DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"

FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
PYTORCH_WEIGHTS = "pytorch_model.bin"
# Preference order when a directory or hub repo has several formats: native first.
WEIGHT_FILES = (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, PYTORCH_WEIGHTS)
# Everything but the weights, fetched from the hub in one snapshot.
METADATA_PATTERNS = ["*.json", "*.txt", "*.model"]


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Token ids and search defaults taken from the checkpoint (plain data).

    ``max_length`` and ``num_beams`` are the model card's usage (16, 4), not the nested
    decoder config's (20, 1), which nobody captions with.
    """

    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: int
    max_length: int = 16
    num_beams: int = 4


@dataclasses.dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns: the model and everything needed around it.

    Attributes:
      model: the Flax model; its ``params`` hold the weights (float32 on the host device).
      tokenizer: the checkpoint's tokenizer (a transformers fast tokenizer).
      preprocess_config: resize/rescale/normalise settings from ``preprocessor_config.json``.
      generation_defaults: decoder_start / pad / eos ids and the card's search settings.
      directory: the local directory the files were read from (a hub cache snapshot for ids).
    """

    model: Any
    tokenizer: Any
    preprocess_config: PreprocessConfig
    generation_defaults: GenerationDefaults
    directory: Path


def resolve_directory(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """Returns a local directory for a path or a hub id, downloading into the HF cache.

    Respects ``HF_HUB_OFFLINE``: offline, only what is already cached is used.

    Raises:
      ModelLoadError: path missing, or hub unreachable with nothing cached, or no such repo.
    """
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{text}: is a file; pass the checkpoint directory that holds it")
        return local
    if not _looks_like_hub_id(text):
        raise ModelLoadError(f"{text}: no such directory")
    return _download(text, revision)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))
            and not os.path.isabs(text))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        directory = Path(snapshot_download(
            repo_id, revision=revision, allow_patterns=METADATA_PATTERNS))
        for weights in WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, weights, revision=revision)
                return directory
            except EntryNotFoundError:
                continue
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: not in the local Hugging Face cache and the hub is unreachable "
            "(or HF_HUB_OFFLINE=1); download it once with network access, or pass a local "
            "checkpoint directory") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{repo_id}: revision {revision!r} does not exist on the hub") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: no such model on the hub (or it is private: run "
            "`huggingface-cli login`); for a local directory, check the path") from None
    raise ModelLoadError(f"{repo_id}: the hub repo has none of {', '.join(WEIGHT_FILES)}")


def read_config(directory: Path) -> Any:
    """Reads ``config.json`` and checks it describes a vision-encoder-decoder model."""
    from transformers import VisionEncoderDecoderConfig

    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no config.json; not a checkpoint directory")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None
    if model_type != "vision-encoder-decoder":
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not a vision-encoder-decoder "
            "checkpoint (expected a ViT encoder + GPT-2 decoder captioner)")
    return VisionEncoderDecoderConfig.from_pretrained(directory)


def weights_file(directory: Path) -> Path:
    """The weights file to load, preferring Flax-native over PyTorch formats."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ModelLoadError(
        f"{directory}: no weights ({', '.join(WEIGHT_FILES)}); sharded or TensorFlow "
        "checkpoints are not supported")


def generation_defaults(config: Any) -> GenerationDefaults:
    """Token ids as PyTorch ``generate`` resolves them for a VisionEncoderDecoderModel."""
    decoder = config.decoder
    eos = config.eos_token_id if config.eos_token_id is not None else decoder.eos_token_id
    start = config.decoder_start_token_id
    if start is None:
        start = decoder.bos_token_id
    pad = config.pad_token_id
    if pad is None:
        pad = decoder.pad_token_id if decoder.pad_token_id is not None else eos
    if start is None or eos is None:
        raise ModelLoadError("config.json: neither decoder_start_token_id nor the decoder's "
                             "bos/eos token ids are set")
    return GenerationDefaults(decoder_start_token_id=int(start), pad_token_id=int(pad),
                              eos_token_id=int(eos))


def load_checkpoint(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: Any = jnp.float32,
) -> LoadedCheckpoint:
    """Loads a captioner checkpoint from a hub id or a local directory.

    Args:
      name_or_path: hub id (``org/name``) or a local checkpoint directory.
      revision: hub branch, tag or commit; ignored for local directories.
      dtype: the HF model's computation dtype (weights stay float32).

    Raises:
      ModelLoadError: with a one-line message naming the input, the cause and the fix.
    """
    directory = resolve_directory(name_or_path, revision)
    config = read_config(directory)
    weights = weights_file(directory)
    model = _load_flax_model(directory, weights, dtype)
    return LoadedCheckpoint(
        model=model,
        tokenizer=_load_tokenizer(directory),
        preprocess_config=PreprocessConfig.from_pretrained(directory),
        generation_defaults=generation_defaults(config),
        directory=directory,
    )


def _load_flax_model(directory: Path, weights: Path, dtype: Any) -> Any:
    from transformers import FlaxVisionEncoderDecoderModel

    from_pt = weights.name != FLAX_WEIGHTS
    if weights.name == PYTORCH_WEIGHTS and not torch_available():
        raise ModelLoadError(
            f"{weights}: PyTorch pickle weights need PyTorch to read; install it "
            "(pip install 'flax-captioner[torch]') or convert once elsewhere with "
            "`flax-captioner convert SRC DST`")
    try:
        return FlaxVisionEncoderDecoderModel.from_pretrained(directory, from_pt=from_pt, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{weights}: could not be loaded ({first_line})") from error


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"{directory}: no usable tokenizer files ({error})") from None


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    preprocess_config: PreprocessConfig,
    destination: str | os.PathLike,
    *,
    params: Any = None,
    flax: bool = True,
    pytorch: bool = False,
) -> Path:
    """Writes a checkpoint directory: config, tokenizer, preprocessor config and weights.

    ``flax`` writes ``flax_model.msgpack`` (loads without PyTorch); ``pytorch`` writes
    ``model.safetensors`` that ``VisionEncoderDecoderModel.from_pretrained`` loads (needs
    PyTorch here). ``params`` defaults to ``model.params``.
    """
    destination = Path(destination)
    if pytorch and not torch_available():
        raise ModelLoadError(f"{destination}: writing PyTorch weights needs PyTorch; install it "
                             "(pip install 'flax-captioner[torch]')")
    destination.mkdir(parents=True, exist_ok=True)
    for stale in WEIGHT_FILES:  # a replaced checkpoint must not leave weights that win on load
        (destination / stale).unlink(missing_ok=True)
    params = model.params if params is None else params
    model.save_pretrained(destination, params=params)
    if pytorch:
        _write_pytorch_weights(destination, params)
    if not flax:
        (destination / FLAX_WEIGHTS).unlink()
    tokenizer.save_pretrained(destination)
    preprocess_config.save_pretrained(destination)
    return destination


def pytorch_model(directory: str | os.PathLike, params: Any) -> Any:
    """A PyTorch ``VisionEncoderDecoderModel`` (eval mode) with the Flax ``params``.

    ``directory`` supplies ``config.json``. transformers' ``from_pretrained(from_flax=True)``
    builds the model on the meta device and then fails to copy into it (4.57), so the model
    is built from the config and filled.
    """
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    config = VisionEncoderDecoderConfig.from_pretrained(directory)
    return load_flax_weights_in_pytorch_model(VisionEncoderDecoderModel(config), params).eval()


def _write_pytorch_weights(directory: Path, params: Any) -> None:
    """Writes ``params`` as PyTorch ``model.safetensors`` into ``directory`` (config already there)."""
    with tempfile.TemporaryDirectory() as scratch:
        pytorch_model(directory, params).save_pretrained(scratch, safe_serialization=True)
        shutil.copy(Path(scratch) / SAFETENSORS_WEIGHTS, directory / SAFETENSORS_WEIGHTS)


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    to_pytorch: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts a checkpoint to a Flax-native directory, or (``to_pytorch``) a PyTorch one.

    The Flax-native directory loads later without PyTorch installed.

    Raises:
      ModelLoadError: unreadable source, or a destination that already holds a checkpoint
        (unless ``overwrite``).
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ModelLoadError(f"{destination}: exists and is not a directory")
    if not overwrite and destination.is_dir() and any(
            (destination / name).exists() for name in ("config.json", *WEIGHT_FILES)):
        raise ModelLoadError(f"{destination}: already holds a checkpoint",
                             fix=("overwrite",))
    loaded = load_checkpoint(source, revision=revision)
    return save_checkpoint(loaded.model, loaded.tokenizer, loaded.preprocess_config,
                           destination, flax=not to_pytorch, pytorch=to_pytorch)
