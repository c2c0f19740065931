"""Builders for the tiny and full-size random checkpoints the tests run on.

Each builder makes a PyTorch ``VisionEncoderDecoderModel``, draws its random weights from
numpy's generator with a fixed seed, and writes a complete Hugging Face directory:
``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), a word-level tokenizer
whose vocabulary matches the model's, and a ``preprocessor_config.json``. Nothing touches the
network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EOS_TOKEN = "<|endoftext|>"
# The chaotic checkpoints' seeds (vocabulary 32, initializer_range 0.5): captions end at many
# different steps (tests/test_parity_generate.py checks it); the parity tests and scripts use them.
CHAOTIC_SEEDS = (9, 16, 37)


def write_word_tokenizer(directory: Path, vocab_size: int) -> int:
    """Writes a word-level fast tokenizer with ``vocab_size`` entries; returns the EOS id.

    Words are ``w0 .. w{n-2}`` and the last id is ``<|endoftext|>`` (as in GPT-2), which is
    bos, eos and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    eos_id = vocab_size - 1
    vocab[EOS_TOKEN] = eos_id
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    tokenizer.save_pretrained(directory)
    return eos_id


# nlpconnect/vit-gpt2-image-captioning's preprocessor_config.json, verbatim.
NLPCONNECT_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}


def write_preprocessor_config(directory: Path, image_size: int) -> None:
    """Writes the nlpconnect preprocessor config, resized to ``image_size``."""
    config = {**NLPCONNECT_PREPROCESSOR, "size": image_size}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def redraw_random_weights(model: Any, seed: int) -> None:
    """Replaces the random weights of a freshly initialized model by numpy draws from ``seed``.

    The same seed gives the same checkpoint under every torch release: torch's own
    ``trunc_normal_`` (the ViT's initializer) drew different values for one seed in torch
    2.11 and 2.13 (every ViT weight differed, measured 2026-12-05), so the suite's chaotic
    checkpoints were other checkpoints on the device image. Each tensor keeps Hugging Face's
    initializer's scale: ``initializer_range`` of its half of the model, divided by
    sqrt(2 x layers) for GPT-2's ``c_proj`` weights. Constant tensors (layer norms, biases)
    stay as initialized.
    """
    import torch

    rng = np.random.default_rng(seed)
    encoder, decoder = model.config.encoder, model.config.decoder
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if bool((parameter == parameter.flatten()[0]).all()):
                continue
            if name.startswith("encoder."):
                std = encoder.initializer_range
            elif name.endswith("c_proj.weight"):
                std = decoder.initializer_range / np.sqrt(2 * decoder.n_layer)
            else:
                std = decoder.initializer_range
            draw = rng.standard_normal(tuple(parameter.shape), dtype=np.float32) * np.float32(std)
            parameter.copy_(torch.from_numpy(draw))


def make_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 64,
    n_positions: int = 64,
    initializer_range: float = 0.02,
    weights: str = "safetensors",
    encoder_overrides: dict[str, Any] | None = None,
    decoder_overrides: dict[str, Any] | None = None,
) -> Path:
    """Builds a seeded random ViT-GPT2 ``VisionEncoderDecoderModel`` and saves it.

    ``initializer_range`` applies to the decoder (large values make a chaotic next-token
    distribution, so EOS lands at varied steps). ``weights`` is ``"safetensors"`` or
    ``"bin"`` (a PyTorch pickle, as the nlpconnect checkpoint ships).
    """
    from transformers import (GPT2Config, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eos_id = vocab_size - 1
    encoder = ViTConfig(
        hidden_size=hidden_size, num_hidden_layers=encoder_layers,
        num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
        image_size=image_size, patch_size=patch_size, **(encoder_overrides or {}))
    decoder = GPT2Config(
        n_embd=hidden_size, n_layer=decoder_layers, n_head=num_heads, vocab_size=vocab_size,
        n_positions=n_positions, add_cross_attention=True, bos_token_id=eos_id,
        eos_token_id=eos_id, initializer_range=initializer_range,
        **(decoder_overrides or {}))
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = eos_id
    config.pad_token_id = eos_id
    config.eos_token_id = eos_id
    model = VisionEncoderDecoderModel(config).eval()
    redraw_random_weights(model, seed)
    model.save_pretrained(directory, safe_serialization=(weights == "safetensors"))
    # generation_config.json would carry PyTorch-only defaults; the nlpconnect repo has none.
    (directory / "generation_config.json").unlink(missing_ok=True)
    write_word_tokenizer(directory, vocab_size)
    write_preprocessor_config(directory, image_size)
    return directory


def make_full_size_checkpoint(directory: str | Path, *, seed: int = 0) -> Path:
    """The nlpconnect architecture (ViT-B/16 224, GPT-2 12x768, vocab 50257), random weights."""
    return make_checkpoint(
        directory, seed=seed, image_size=224, patch_size=16, hidden_size=768,
        encoder_layers=12, decoder_layers=12, num_heads=12, vocab_size=50257,
        n_positions=1024, decoder_overrides={"n_inner": None})
