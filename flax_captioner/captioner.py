"""The public face: ``Captioner`` ties a loaded checkpoint, preprocessing and the generator."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flax_captioner import backend, feed, loading, sharding, sources, storage
from flax_captioner.generator import Dispatched, GenerationOutput, Generator, one_ahead
from flax_captioner.preprocess import ImageDecoding
from flax_captioner.settings import GenerationSettings
from flax_captioner.sources import InputItem

# One image: a path, an image file's encoded bytes, or a PIL image.
ImageInput = str | os.PathLike | bytes | Image.Image


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
        placement = sharding.data_parallel(parallelism)
        backend.warn_if_slow_bfloat16(dtype, placement.devices)
        self.generator = Generator(self.model.params, self.model.config, dtype=dtype,
                                   data_parallel=placement)
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
        """Images per batch when the caller sets none: 8 on CPU; on GPU/TPU a per-device
        batch that fills the devices (``backend.default_batch_size``), for this model's size."""
        spec = self.generator.spec
        settings = self.settings()
        image_bytes = backend.image_memory_bytes(
            encoder_length=spec.encoder_length, hidden_size=spec.hidden_size,
            num_layers=spec.num_layers, encoder_heads=spec.encoder_num_heads,
            vocab_size=spec.vocab_size, image_size=spec.image_size,
            num_beams=settings.num_beams, max_length=settings.max_length,
            dtype=self.generator.dtype)
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(self.model.params))
        return backend.default_batch_size(self.generator.data_parallel.devices,
                                          image_bytes=image_bytes, weight_bytes=weight_bytes)

    def preprocess(self, images: ImageInput | Iterable[ImageInput], *,
                   exif_transpose: bool = False, fast_decode: bool = False) -> np.ndarray:
        """Decodes and preprocesses images (on the feed's threads) into float32[B, 3, H, W];
        ``exif_transpose`` and ``fast_decode`` as in ``caption``.

        Raises:
          ImageReadError: naming the first input that cannot be read.
        """
        items = list(_items(images))
        decoding = ImageDecoding(exif_transpose=exif_transpose, fast=fast_decode)
        with feed.batches(items, self.preprocess_config, max(len(items), 1),
                          decoding=decoding) as batches:
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
        fast_decode: bool = False,
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
          fast_decode: decode JPEGs at reduced scale in the DCT domain (``ImageDecoding``):
            faster on large photos, pixels close to but not equal to the exact path's.
          rng: PRNG key for sampling (default ``PRNGKey(0)``).
          settings: generation settings; unset ones come from the checkpoint.

        Raises:
          ImageReadError: naming the first input that cannot be read.
          ValueError: a bad setting or batch size (before any image is read).
        """
        resolved = self.settings(**settings)
        rows = resolved.num_return_sequences
        captions: list[str] = []

        def dispatch(batch: feed.Batch) -> Dispatched:
            _raise_first_error(batch)
            return self.generator.dispatch(batch.pixel_values, resolved, rng=rng,
                                           first_index=batch.items[0].index)

        with feed.batches(_items(images), self.preprocess_config,
                          batch_size or self.default_batch_size(), num_threads=num_threads,
                          decoding=ImageDecoding(exif_transpose=exif_transpose,
                                                 fast=fast_decode)) as batches:
            for batch, dispatched in one_ahead(batches, dispatch):  # devices run meanwhile
                output = dispatched.result()
                batch.release()  # its search is done: the feed refills the pixels' memory
                captions.extend(self.decode(output.sequences[:batch.num_decoded * rows]))
        return captions


def _items(images: ImageInput | Iterable[ImageInput]) -> Iterator[InputItem]:
    """InputItems for the feed, named as errors should name them.

    Besides paths (local or fsspec URLs), bytes and PIL images, an element may be a row of a
    ``datasets.Dataset`` or of img2dataset's tables: a mapping whose image is a PIL image,
    bytes, or a Hugging Face image struct ``{"bytes": ..., "path": ...}``, found under
    ``sources.IMAGE_COLUMNS`` (``image``, ``jpg``, ...) and named by ``sources.ID_COLUMNS``.
    """
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    for index, image in zip(itertools.count(), images):
        name, row_id = f"images[{index}]", None
        if isinstance(image, Mapping):
            image, row_id = _row_image(image, name)
        if isinstance(image, Mapping):  # an image struct: its bytes, else its path
            name = image.get("path") or name
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            yield InputItem(index, path, fetch=storage.fetcher(path)
                            if storage.is_remote(path) else None)
        elif isinstance(image, (bytes, Image.Image)):
            name = row_id or getattr(image, "filename", "") or name
            yield InputItem(index, name, data=image)
        else:
            raise TypeError(f"images[{index}]: expected a path, bytes, a PIL image or a row "
                            f"holding one, got {type(image).__name__}")


def _row_image(row: Mapping[str, Any], name: str) -> tuple[Any, str | None]:
    """(image value, row name from its id column or None) of a dataset row."""
    column = next((column for column in sources.IMAGE_COLUMNS if column in row), None)
    if column is None:
        raise TypeError(f"{name}: a row without an image column (looked for "
                        f"{', '.join(sources.IMAGE_COLUMNS)}; it has {', '.join(row)})")
    identifier = next((row[column] for column in sources.ID_COLUMNS
                       if row.get(column) is not None), None)
    return row[column], None if identifier is None else str(identifier)


def _raise_first_error(batch: feed.Batch) -> None:
    error = next((error for error in batch.errors if error is not None), None)
    if error is not None:
        raise error
