"""The public face: ``Captioner`` ties a loaded checkpoint, preprocessing and the generator."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flax_captioner import loading, preprocess, sharding
from flax_captioner.generator import GenerationOutput, GenerationSettings, Generator

ImageInput = str | os.PathLike | Image.Image


class Captioner:
    """A ViT-GPT2 captioner: images in, captions out.

    Holds the checkpoint (``model``, ``tokenizer``, ``preprocess_config``,
    ``generation_defaults``) and a compiled ``Generator`` whose programs are cached per
    (batch bucket, generation settings).
    """

    def __init__(
        self,
        checkpoint: loading.LoadedCheckpoint,
        *,
        dtype: Any = jnp.float32,
        parallelism: str = "mesh",
    ):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.preprocess_config = checkpoint.preprocess_config
        self.generation_defaults = checkpoint.generation_defaults
        self.parallelism = parallelism
        self.generator = Generator(
            self.model.params, self.model.config, dtype=dtype,
            data_parallel=sharding.data_parallel(parallelism))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = loading.DEFAULT_MODEL,
        *,
        revision: str | None = None,
        dtype: Any = jnp.float32,
        parallelism: str = "mesh",
    ) -> "Captioner":
        """Loads a hub id or local checkpoint directory.

        Args:
          name_or_path: hub id or directory with ``flax_model.msgpack``, ``model.safetensors``
            or ``pytorch_model.bin`` (PyTorch weights are converted on load).
          revision: hub branch, tag or commit.
          dtype: compute dtype of the generator (``jnp.float32`` or ``jnp.bfloat16``).
          parallelism: ``"mesh"`` (jit over a device mesh, default), ``"pmap"`` or ``"none"``.

        Raises:
          ModelLoadError: one line naming the input, the cause and the fix.
        """
        checkpoint = loading.load_checkpoint(name_or_path, revision=revision)
        return cls(checkpoint, dtype=dtype, parallelism=parallelism)

    def settings(self, **overrides: Any) -> GenerationSettings:
        """Generation settings: the checkpoint's defaults with ``overrides`` applied."""
        return GenerationSettings.resolve(self.generation_defaults, **overrides)

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Decodes and preprocesses images into pixel values ``[B, 3, H, W]`` float32.

        Raises:
          ImageReadError: for the first unreadable input (all are decoded first).
        """
        pixel_values, errors = preprocess.load_and_preprocess(images, self.preprocess_config)
        first_error = next((error for error in errors if error is not None), None)
        if first_error is not None:
            raise first_error
        return pixel_values

    def generate(
        self,
        pixel_values: np.ndarray | jax.Array,
        *,
        rng: jax.Array | None = None,
        first_index: int = 0,
        **settings: Any,
    ) -> GenerationOutput:
        """Runs the compiled search on ``pixel_values [B, 3, H, W]``.

        Sampling draws image ``i`` from ``fold_in(rng, first_index + i)``, so a caption does
        not depend on how images are batched.

        Returns ``sequences`` int32 ``[B * num_return_sequences, max_length]`` (starting with
        decoder_start, padded with pad) and ``scores`` float32 ``[B * num_return_sequences]``.
        """
        return self.generator.generate(pixel_values, self.settings(**settings), rng=rng,
                                       first_index=first_index)

    def decode(self, sequences: np.ndarray) -> list[str]:
        """Token rows ``[N, T]`` -> captions (special tokens skipped, whitespace stripped)."""
        texts = self.tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        num_beams: int = 4,
        max_length: int = 16,
        batch_size: int = 8,
        **settings: Any,
    ) -> list[str]:
        """Captions paths or PIL images; returns one caption per image and returned sequence.

        Raises:
          ImageReadError: naming the first input that cannot be read.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            pixel_values = self.preprocess(images[start:start + batch_size])
            output = self.generate(pixel_values, first_index=start, num_beams=num_beams,
                                   max_length=max_length, **settings)
            captions.extend(self.decode(output.sequences))
        return captions

