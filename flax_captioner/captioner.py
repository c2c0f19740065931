"""The public face: ``Captioner`` ties a loaded checkpoint, preprocessing and the generator."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flax_captioner import feed, loading, sharding
from flax_captioner.generator import GenerationOutput, GenerationSettings, Generator
from flax_captioner.sources import InputItem

# One image: a path, an image file's encoded bytes, or a PIL image.
ImageInput = str | os.PathLike | bytes | Image.Image
# Images the CPU default batch fills without starving the 2-core machines' decode threads.
_CPU_BATCH_SIZE = 8


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
        # Seconds from_pretrained took (reading the checkpoint, placing the weights).
        self.load_seconds = 0.0

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
        started = time.perf_counter()
        checkpoint = loading.load_checkpoint(name_or_path, revision=revision)
        captioner = cls(checkpoint, dtype=dtype, parallelism=parallelism)
        captioner.load_seconds = time.perf_counter() - started
        return captioner

    def settings(self, **overrides: Any) -> GenerationSettings:
        """Generation settings: the checkpoint's defaults with ``overrides`` applied."""
        return GenerationSettings.resolve(self.generation_defaults, **overrides)

    def default_batch_size(self) -> int:
        """Images per batch when the caller sets none."""
        return _CPU_BATCH_SIZE

    def preprocess(self, images: ImageInput | Iterable[ImageInput], *,
                   exif_transpose: bool = False) -> np.ndarray:
        """Decodes and preprocesses images (on the feed's threads) into float32[B, 3, H, W].

        Raises:
          ImageReadError: naming the first input that cannot be read.
        """
        items = list(_items(images))
        with feed.batches(items, self.preprocess_config, max(len(items), 1),
                          exif_transpose=exif_transpose) as batches:
            batch = next(batches, None)
        if batch is None:
            height, width = self.preprocess_config.size
            return np.zeros((0, 3, height, width), np.float32)
        _raise_first_error(batch)
        return batch.pixel_values

    def generate(
        self,
        pixel_values: np.ndarray | jax.Array,
        *,
        rng: jax.Array | None = None,
        first_index: int = 0,
        **settings: Any,
    ) -> GenerationOutput:
        """Runs the compiled search on ``pixel_values`` float32[B, 3, H, W].

        ``settings`` are PyTorch ``generate``'s (``num_beams``, ``max_length``, ...); unset
        ones come from the checkpoint (``generation_defaults``). Sampling draws image ``i``
        from ``fold_in(rng, first_index + i)``, so a caption does not depend on how images are
        batched.

        Returns ``sequences`` int32[B * num_return_sequences, max_length] (starting with
        decoder_start, padded with pad) and ``scores`` float32[B * num_return_sequences].
        """
        return self.generator.generate(pixel_values, self.settings(**settings), rng=rng,
                                       first_index=first_index)

    def decode(self, sequences: np.ndarray) -> list[str]:
        """Token rows int32[N, T] -> captions (special tokens skipped, whitespace stripped)."""
        texts = self.tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)
        return [text.strip() for text in texts]

    def caption(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        num_threads: int | None = None,
        exif_transpose: bool = False,
        rng: jax.Array | None = None,
        **settings: Any,
    ) -> list[str]:
        """Captions images: one caption per image and returned sequence, in input order.

        Args:
          images: one image or any iterable of them (paths, encoded bytes, PIL images),
            decoded lazily on the feed's threads while the device works.
          batch_size: images per device batch (None: ``default_batch_size()``).
          num_threads: decode threads (None: one per CPU core).
          exif_transpose: apply EXIF orientation first (off: the model card's behaviour).
          rng: PRNG key for sampling (default ``PRNGKey(0)``).
          settings: generation settings; unset ones come from the checkpoint.

        Raises:
          ImageReadError: naming the first input that cannot be read.
          ValueError: a bad setting or batch size (before any image is read).
        """
        resolved = self.settings(**settings)
        rows = resolved.num_return_sequences
        captions: list[str] = []
        with feed.batches(_items(images), self.preprocess_config,
                          batch_size or self.default_batch_size(), num_threads=num_threads,
                          exif_transpose=exif_transpose) as batches:
            for batch in batches:
                _raise_first_error(batch)
                output = self.generator.generate(batch.pixel_values, resolved, rng=rng,
                                                 first_index=batch.items[0].index)
                captions.extend(self.decode(output.sequences[:batch.num_decoded * rows]))
        return captions


def _items(images: ImageInput | Iterable[ImageInput]) -> Iterator[InputItem]:
    """InputItems for the feed, named as errors should name them."""
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    for index, image in zip(itertools.count(), images):
        if isinstance(image, (str, os.PathLike)):
            yield InputItem(index, os.fspath(image))
        elif isinstance(image, (bytes, Image.Image)):
            name = getattr(image, "filename", "") or f"images[{index}]"
            yield InputItem(index, name, data=image)
        else:
            raise TypeError(f"images[{index}]: expected a path, bytes or a PIL image, got "
                            f"{type(image).__name__}")


def _raise_first_error(batch: feed.Batch) -> None:
    error = next((error for error in batch.errors if error is not None), None)
    if error is not None:
        raise error
