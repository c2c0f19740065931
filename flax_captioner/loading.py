"""Checkpoints in and out: hub id or local directory -> parameter tree and config, and back.

A checkpoint directory holds ``config.json`` (a vision-encoder-decoder config), weights
(``flax_model.msgpack``, ``model.safetensors`` or ``pytorch_model.bin``), a tokenizer and a
``preprocessor_config.json``. The weights become the parameter tree of
``FlaxVisionEncoderDecoderModel`` (``modules.py`` declares it); PyTorch weights are converted
on load; none of the three formats needs PyTorch (``torch_pickle`` reads ``.bin`` files).
transformers supplies the configs, the tokenizer and the PyTorch model, never a Flax class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_captioner import modules, torch_pickle
from flax_captioner.defaults import DEFAULT_MODEL
from flax_captioner.errors import ModelLoadError
from flax_captioner.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
PYTORCH_WEIGHTS = "pytorch_model.bin"
# Preference order when a directory or hub repo has several formats: native first.
WEIGHT_FILES = (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, PYTORCH_WEIGHTS)
# Everything but the weights, fetched from the hub in one snapshot.
METADATA_PATTERNS = ["*.json", "*.txt", "*.model"]
GENERATION_CONFIG = "generation_config.json"
# Flax name of GPT-2's output projection: absent from a tied model's parameters, while
# PyTorch checkpoints store it beside the embedding it is tied to.
TIED_LM_HEAD = ("decoder", "lm_head", "kernel")
# GPT-2's causal-mask buffers, which older transformers versions saved with the weights:
# constants, not weights, and not parameters of the Flax model.
_GPT2_MASK_BUFFERS = {(block, buffer) for block in ("attn", "crossattention")
                      for buffer in ("bias", "masked_bias")}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Token ids and search defaults taken from the checkpoint (plain data).

    ``max_length`` and ``num_beams`` are the model card's usage (16, 4), not the nested
    decoder config's (20, 1), which nobody captions with; a ``generation_config.json`` that
    sets them wins, as in ``generate``. ``file_settings`` holds the file's other
    ``GenerationSettings`` fields as (name, value) pairs (lists made tuples); they read as
    attributes, so ``GenerationSettings.resolve(defaults)`` takes them as defaults.
    """

    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: int
    max_length: int = 16
    num_beams: int = 4
    file_settings: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        for key, value in self.__dict__.get("file_settings", ()):
            if key == name:
                return value
        raise AttributeError(name)


@dataclasses.dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns: the weights and everything needed around them.

    Attributes:
      params: the parameter tree (float32 on the default device).
      config: the ``VisionEncoderDecoderConfig``.
      tokenizer: the checkpoint's tokenizer (a transformers fast tokenizer).
      preprocess_config: resize/rescale/normalise settings from ``preprocessor_config.json``.
      generation_defaults: decoder_start / pad / eos ids and the card's search settings.
      directory: the local directory the files were read from (a hub cache snapshot for
        ids); None for weights built in memory.
    """

    params: Any
    config: Any
    tokenizer: Any
    preprocess_config: PreprocessConfig
    generation_defaults: GenerationDefaults
    directory: Path | None


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
            "`hf auth login`); for a local directory, check the path") from None
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


def generation_defaults(config: Any, directory: Path | None = None) -> GenerationDefaults:
    """Token ids as PyTorch ``generate`` resolves them for a VisionEncoderDecoderModel, and
    the search defaults of ``directory / generation_config.json`` when there is one.

    Only fields ``GenerationSettings`` knows are taken (unset ones, ``null``, are skipped);
    the file's token ids win over ``config.json``'s, as they do in ``generate``.

    Raises:
      ModelLoadError: no usable token ids; an unreadable file; several EOS ids.
    """
    def token_id(owner: Any, name: str) -> Any:  # transformers 5 leaves unset ids undefined
        return getattr(owner, name, None)

    decoder = config.decoder
    eos = token_id(config, "eos_token_id")
    if eos is None:
        eos = token_id(decoder, "eos_token_id")
    start = token_id(config, "decoder_start_token_id")
    if start is None:
        start = token_id(decoder, "bos_token_id")
    pad = token_id(config, "pad_token_id")
    if pad is None:
        pad = token_id(decoder, "pad_token_id")
    if pad is None:
        pad = eos
    file_values = _generation_config_values(directory) if directory is not None else {}
    eos = file_values.pop("eos_token_id", eos)
    start = file_values.pop("decoder_start_token_id", start)
    pad = file_values.pop("pad_token_id", pad)
    if start is None or eos is None:
        raise ModelLoadError("config.json: neither decoder_start_token_id nor the decoder's "
                             "bos/eos token ids are set")
    card = {name: file_values.pop(name) for name in ("max_length", "num_beams")
            if name in file_values}
    return GenerationDefaults(decoder_start_token_id=int(start), pad_token_id=int(pad),
                              eos_token_id=int(eos), **card,
                              file_settings=tuple(sorted(file_values.items())))


def _generation_config_values(directory: Path) -> dict[str, Any]:
    """The ``GenerationSettings`` fields ``generation_config.json`` sets (lists as tuples)."""
    from flax_captioner.settings import GenerationSettings

    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object of generation settings")
    names = {field.name for field in dataclasses.fields(GenerationSettings)}
    values = {name: _as_tuples(value) for name, value in raw.items()
              if name in names and value is not None}
    eos = values.get("eos_token_id")
    if isinstance(eos, tuple):
        if len(eos) != 1:
            raise ModelLoadError(f"{path}: eos_token_id {list(eos)} lists several EOS ids; "
                                 "this generator supports one")
        values["eos_token_id"] = eos[0]
    return values


def _as_tuples(value: Any) -> Any:
    """JSON lists -> tuples, recursively (generation defaults must be hashable)."""
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


def load_checkpoint(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    revision: str | None = None,
) -> LoadedCheckpoint:
    """Loads a captioner checkpoint from a hub id or a local directory.

    The small files (config, tokenizer, preprocessor config) are read first, so a broken
    directory fails before the weights are read. The model is built from abstract shapes and
    gets the checkpoint's weights directly: no random initialisation.

    Args:
      name_or_path: hub id (``org/name``) or a local checkpoint directory.
      revision: hub branch, tag or commit; ignored for local directories.
      dtype: the HF model's computation dtype (weights are float32 whatever the file holds).

    Raises:
      ModelLoadError: with a one-line message naming the input, the cause and the fix.
    """
    directory = resolve_directory(name_or_path, revision)
    config = read_config(directory)
    weights = weights_file(directory)
    tokenizer = _load_tokenizer(directory, config)
    preprocess_config = PreprocessConfig.from_pretrained(directory)
    defaults = generation_defaults(config, directory)
    params = _load_params(directory, config, weights)
    return LoadedCheckpoint(
        params=params,
        config=config,
        tokenizer=tokenizer,
        preprocess_config=preprocess_config,
        generation_defaults=defaults,
        directory=directory,
    )


def parameter_shapes(directory: Path, config: Any) -> dict[tuple[str, ...], Any]:
    """``{key path: jax.ShapeDtypeStruct}`` of the model ``config`` describes.

    Raises:
      ModelLoadError: ``config.json`` describes no model the modules can build.
    """
    try:
        return flatten_dict(modules.param_shapes(config))
    except (ModelLoadError, ValueError, TypeError, AttributeError) as error:
        raise ModelLoadError(
            f"{directory / 'config.json'}: describes no buildable model ({_first_line(error)})"
        ) from None


def _load_params(directory: Path, config: Any, weights: Path) -> Any:
    """``weights`` as the parameter tree (float32, on the default device)."""
    shapes = parameter_shapes(directory, config)
    flat = _read_weights(weights, shapes)
    return jax.device_put(_checked_params(flat, shapes, weights, config))


# Maps a weights file's key path to the model's (None: not a weight of this model).
Rename = Callable[[tuple[str, ...]], tuple[str, ...] | None]


def _read_weights(weights: Path, shapes: Mapping[tuple[str, ...], Any],
                  rename: Rename = lambda key: key) -> dict[tuple[str, ...], np.ndarray]:
    """The weights file as ``{Flax key path: array}`` in Flax names and layouts, each key
    passed through ``rename`` first (the part checkpoints of ``load_pretrained_parts``).

    Raises:
      ModelLoadError: the file is truncated, corrupt or not of its suffix's format.
    """
    from safetensors import SafetensorError

    pytorch_format = weights.name == PYTORCH_WEIGHTS
    try:
        if weights.name == FLAX_WEIGHTS:
            from flax.serialization import msgpack_restore

            state = msgpack_restore(weights.read_bytes())
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a parameter tree")
            flat = flatten_dict(state)
        elif pytorch_format:
            flat = {tuple(name.split(".")): value
                    for name, value in _read_pytorch_pickle(weights).items()}
        else:
            from safetensors import safe_open

            # framework="flax" reads bfloat16 too (numpy's reader cannot).
            with safe_open(weights, framework="flax") as file:
                pytorch_format = (file.metadata() or {}).get("format") == "pt"
                flat = {tuple(name.split(".")): np.asarray(file.get_tensor(name))
                        for name in file.keys()}
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError) as error:
        # torch.load reports a truncated zip as RuntimeError and garbage as KeyError/EOFError.
        raise ModelLoadError(f"{weights}: truncated or corrupt ({_first_line(error)})") from None
    renamed = {}
    for key, value in flat.items():
        new_key = rename(key)
        if new_key is not None:
            renamed[new_key] = value
    return _pytorch_to_flax(renamed, shapes) if pytorch_format else renamed


def _read_pytorch_pickle(weights: Path) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict, read without PyTorch (``torch_pickle``) unless the
    file predates torch's zip format.

    Raises:
      ModelLoadError: an old-format file and no PyTorch to read it.
    """
    try:
        return torch_pickle.load_state_dict(weights)
    except torch_pickle.NotAZipCheckpoint:
        if not torch_available():
            raise ModelLoadError(
                f"{weights}: PyTorch pickle weights of the format before torch 1.6 need "
                "PyTorch to read; install it (pip install 'flax-captioner[torch]') or convert "
                "the checkpoint once where PyTorch is installed (flax-captioner convert)"
            ) from None
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    # torch has no numpy bfloat16; the weights end up float32 anyway.
    return {name: (tensor.float() if tensor.is_floating_point() else tensor).numpy()
            for name, tensor in state.items()}


def _pytorch_to_flax(state: Mapping[tuple[str, ...], np.ndarray],
                     shapes: Mapping[tuple[str, ...], Any]) -> dict[tuple[str, ...], np.ndarray]:
    """PyTorch names and layouts -> Flax's, by the rules of transformers'
    ``convert_pytorch_state_dict_to_flax``, decided against the model's parameter ``shapes``:
    LayerNorm ``weight`` -> ``scale``; embedding tables -> ``embedding``; the patch-embedding
    conv ``weight [out, in, h, w]`` -> ``kernel [h, w, in, out]``; every other ``weight``
    -> ``kernel`` transposed (Linear ``[out, in]`` -> ``[in, out]``; GPT-2's Conv1D
    ``[in, out]`` -> FlaxConv1D's ``[out, in]``).
    """
    flat = {}
    for key, value in state.items():
        if key[-1] == "weight":
            prefix = key[:-1]
            if prefix + ("scale",) in shapes:
                key = prefix + ("scale",)
            elif prefix + ("embedding",) in shapes:
                key = prefix + ("embedding",)
            else:
                key = prefix + ("kernel",)
                value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        flat[key] = value
    return flat


def load_pretrained_parts(encoder: str | os.PathLike, decoder: str | os.PathLike, *,
                          seed: int = 0) -> tuple[Any, Any]:
    """A captioner joined from a pretrained ViT and a pretrained GPT-2, as transformers'
    ``from_encoder_decoder_pretrained`` joins them: ``(params, config)``.

    The decoder gains cross-attention, whose weights (and the ViT pooler's, when its
    checkpoint has none) are drawn fresh from ``seed``; every other weight comes from the two
    checkpoints, in any of the weight formats (a ``vit.`` or ``transformer.`` prefix, a
    classifier or an LM head in them is handled).

    Raises:
      ModelLoadError: a part that is not a ViT / GPT-2 checkpoint, unreadable, or lacking
        weights its config implies.
    """
    from transformers import AutoConfig, VisionEncoderDecoderConfig

    parts = {}
    for role, name, model_type in (("encoder", encoder, "vit"), ("decoder", decoder, "gpt2")):
        directory = resolve_directory(name)
        path = directory / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{directory}: no config.json; not a checkpoint directory")
        try:
            part_config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{path}: unreadable ({_first_line(error)})") from None
        if part_config.model_type != model_type:
            raise ModelLoadError(f"{path}: model_type {part_config.model_type!r}; the {role} "
                                 f"must be a {model_type} checkpoint")
        parts[role] = directory, part_config
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(parts["encoder"][1],
                                                                     parts["decoder"][1])
    shapes = parameter_shapes(parts["decoder"][0], config)
    fresh = flatten_dict(jax.device_get(modules.init_params(config, seed)))
    renames: dict[str, Rename] = {
        "encoder": lambda key: (None if key[0] == "classifier"
                                else ("encoder",) + (key[1:] if key[0] == "vit" else key)),
        "decoder": lambda key: (None if key[0] == "lm_head" else ("decoder", "transformer")
                                + (key[1:] if key[0] == "transformer" else key))}
    joined = {}
    for role, (directory, _) in parts.items():
        weights = weights_file(directory)
        flat = {key: value for key, value in _read_weights(weights, shapes, renames[role]).items()
                if key in shapes}
        missing = [key for key in shapes if key[0] == role and key not in flat
                   and not _fresh_in_join(key)]
        if missing:
            raise ModelLoadError(f"{weights}: lacks {_count(missing, 'weight')} its config "
                                 f"implies ({_key_list(missing)})")
        for key, value in flat.items():
            if value.shape != shapes[key].shape:
                raise ModelLoadError(f"{weights}: {'/'.join(key)} has shape {value.shape}, "
                                     f"its config implies {shapes[key].shape}")
        joined.update(flat)
    drawn = [key for key in shapes if key not in joined]
    logger.info("joined %s and %s; %s drawn fresh (%s)", encoder, decoder,
                _count(drawn, "weight"), _key_list(drawn))
    params = {key: np.asarray(joined.get(key, fresh[key]), np.float32) for key in shapes}
    return jax.device_put(unflatten_dict(params)), config


def _fresh_in_join(key: tuple[str, ...]) -> bool:
    """Weights a joined model may draw fresh: cross-attention, and the unused ViT pooler."""
    return ("crossattention" in key or "ln_cross_attn" in key
            or key[:2] == ("encoder", "pooler"))


def _checked_params(flat: Mapping[tuple[str, ...], np.ndarray],
                    shapes: Mapping[tuple[str, ...], Any], weights: Path, config: Any) -> Any:
    """The parameter tree, float32; every parameter the model needs present and shaped right.

    Unused entries are dropped: silently for the tied LM head and GPT-2's causal-mask buffers
    (older transformers saved ``attn.bias`` / ``attn.masked_bias``, constants rather than
    weights), with one warning line for anything else.

    Raises:
      ModelLoadError: a parameter is missing or has another shape than ``config.json`` implies.
    """
    missing = [key for key in shapes if key not in flat]
    if missing:
        raise ModelLoadError(f"{weights}: lacks {_count(missing, 'weight')} the model needs "
                             f"({_key_list(missing)}); the file does not match config.json")
    for key, shape in shapes.items():
        if flat[key].shape != shape.shape:
            raise ModelLoadError(f"{weights}: {'/'.join(key)} has shape {flat[key].shape}, "
                                 f"config.json implies {shape.shape}")
    unused = [key for key in flat if key not in shapes
              and not (key == TIED_LM_HEAD and config.decoder.tie_word_embeddings)
              and not (key[0] == "decoder" and key[-2:] in _GPT2_MASK_BUFFERS)]
    if unused:
        warnings.warn(f"{weights}: holds {_count(unused, 'weight')} the model does not use "
                      f"({_key_list(unused)}); ignored", stacklevel=4)
    return unflatten_dict({key: np.asarray(flat[key], np.float32)
                           if np.issubdtype(flat[key].dtype, np.floating) else flat[key]
                           for key in shapes})


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _key_list(keys: list[tuple[str, ...]], shown: int = 3) -> str:
    names = ", ".join("/".join(key) for key in sorted(keys)[:shown])
    return names + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_tokenizer(directory: Path, config: Any) -> Any:
    """The checkpoint's tokenizer. Without ``tokenizer_class`` in ``tokenizer_config.json``
    AutoTokenizer picks the class from the model type, and a vision-encoder-decoder has none,
    so the decoder's config (GPT-2's) decides. GPT-2 reads ``tokenizer.json``, or else
    ``vocab.json`` with ``merges.txt``."""
    from transformers import AutoTokenizer

    if not (directory / "tokenizer.json").is_file():
        absent = [name for name in ("vocab.json", "merges.txt")
                  if not (directory / name).is_file()]
        if absent:
            raise ModelLoadError(
                f"{directory}: no tokenizer files (needs tokenizer.json, or vocab.json and "
                f"merges.txt; {' and '.join(absent)} missing)")
    try:
        return AutoTokenizer.from_pretrained(directory, config=config.decoder)
    except Exception as error:  # the tokenizers library raises bare Exception on bad JSON
        raise ModelLoadError(
            f"{directory}: tokenizer files unreadable ({_first_line(error)})") from None


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def save_checkpoint(
    params: Any,
    config: Any,
    tokenizer: Any,
    preprocess_config: PreprocessConfig,
    destination: str | os.PathLike,
    *,
    generation_config: Any = None,
    flax: bool = True,
    pytorch: bool = False,
) -> Path:
    """Writes a checkpoint directory: config, generation config, tokenizer, preprocessor
    config and weights.

    ``flax`` writes ``flax_model.msgpack`` (the Flax lineage's file; loads without PyTorch);
    ``pytorch`` writes ``model.safetensors`` that ``VisionEncoderDecoderModel.from_pretrained``
    loads (needs PyTorch here). ``generation_config`` (a ``GenerationConfig``) defaults to
    the one transformers derives from ``config``.
    """
    from flax.serialization import to_bytes
    from transformers import GenerationConfig

    destination = Path(destination)
    if pytorch and not torch_available():
        raise ModelLoadError(f"{destination}: writing PyTorch weights needs PyTorch; install it "
                             "(pip install 'flax-captioner[torch]')")
    destination.mkdir(parents=True, exist_ok=True)
    for stale in WEIGHT_FILES:  # a replaced checkpoint must not leave weights that win on load
        (destination / stale).unlink(missing_ok=True)
    config.save_pretrained(destination)
    (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(destination)
    if flax:
        (destination / FLAX_WEIGHTS).write_bytes(to_bytes(jax.device_get(params)))
    if pytorch:
        _write_pytorch_weights(destination, params)
    tokenizer.save_pretrained(destination)
    preprocess_config.save_pretrained(destination)
    return destination


def read_generation_config(directory: Path) -> Any:
    """``directory``'s ``generation_config.json`` as a ``GenerationConfig``; None without one.

    Raises:
      ModelLoadError: the file is unreadable.
    """
    if not (directory / GENERATION_CONFIG).is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{directory / GENERATION_CONFIG}: unreadable ({_first_line(error)})") from None


def pytorch_model(config: Any, params: Any) -> Any:
    """A PyTorch ``VisionEncoderDecoderModel`` (eval mode) of ``config`` with the Flax
    ``params``. The weights go in through ``from_pretrained(state_dict=...)`` under their
    file names, which every transformers release maps to its own modules (5.x renamed the
    ViT's in memory, so ``load_state_dict`` would miss them).

    Raises:
      ModelLoadError: ``params`` do not fit the model ``config`` describes.
    """
    from transformers import VisionEncoderDecoderModel

    shapes = flatten_dict(modules.param_shapes(config))
    flat = flatten_dict(params)
    missing = sorted(key for key in shapes if key not in flat)
    unexpected = sorted(key for key in flat if key not in shapes)
    wrong = [key for key in shapes if key in flat and flat[key].shape != shapes[key].shape]
    if missing or unexpected:
        names, kind = (missing, "missing") if missing else (unexpected, "unexpected")
        raise ModelLoadError(f"the weights do not fit the model config "
                             f"({'/'.join(names[0])} is {kind}; {len(names)} in all)")
    if wrong:
        raise ModelLoadError(f"the weights do not fit the model config ({'/'.join(wrong[0])} "
                             f"has shape {flat[wrong[0]].shape}, the config implies "
                             f"{shapes[wrong[0]].shape})")
    with _no_progress_bars():  # transformers 5 draws one while it loads a state dict
        return VisionEncoderDecoderModel.from_pretrained(
            None, config=config, state_dict=_flax_to_pytorch(params)).eval()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block, as they were after it."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def pytorch_layout(key: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """The PyTorch name of the Flax parameter at ``key`` (``ndim`` axes), and the axis order
    that turns its Flax layout into PyTorch's (None: the same): the inverse of
    ``_pytorch_to_flax``'s rules."""
    if key[-1] == "kernel":
        return ".".join(key[:-1] + ("weight",)), ((3, 2, 0, 1) if ndim == 4 else (1, 0))
    if key[-1] in ("scale", "embedding"):
        return ".".join(key[:-1] + ("weight",)), None
    return ".".join(key), None


def _flax_to_pytorch(params: Any) -> dict[str, Any]:
    """Flax names and layouts -> PyTorch's (``pytorch_layout``).

    Each array is copied into a fresh writable float32 buffer: ``torch.from_numpy`` on the
    read-only view a JAX array gives warns that the array is not writable.
    """
    import torch

    state = {}
    for key, value in flatten_dict(params).items():
        value = np.array(value, np.float32)  # a copy: writable, owned, bfloat16 widened
        name, axes = pytorch_layout(key, value.ndim)
        if axes is not None:
            value = value.transpose(axes)
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def _write_pytorch_weights(directory: Path, params: Any) -> None:
    """Writes ``params`` as PyTorch ``model.safetensors`` into ``directory`` (config already there)."""
    from transformers import VisionEncoderDecoderConfig

    config = VisionEncoderDecoderConfig.from_pretrained(directory)
    with tempfile.TemporaryDirectory() as scratch:
        pytorch_model(config, params).save_pretrained(scratch, safe_serialization=True)
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
    return save_checkpoint(loaded.params, loaded.config, loaded.tokenizer,
                           loaded.preprocess_config, destination,
                           generation_config=read_generation_config(loaded.directory),
                           flax=not to_pytorch, pytorch=to_pytorch)
