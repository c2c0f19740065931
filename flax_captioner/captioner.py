"""The public face: ``Captioner`` ties a loaded checkpoint, preprocessing and the generator."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from PIL import Image

from flax_captioner import (backend, device_loop, feed, loading, nvimagecodec, resize, sharding,
                            sources, storage)
from flax_captioner.decode_processes import use_processes
from flax_captioner.errors import OptionError
from flax_captioner.generator import GenerationOutput, Generator, enable_compilation_cache
from flax_captioner.options import CaptionOptions
from flax_captioner.preprocess import ImageDecoding
from flax_captioner.settings import GenerationSettings
from flax_captioner.sources import InputItem

# One image: a path, an image file's encoded bytes, or a PIL image.
ImageInput = str | os.PathLike | bytes | Image.Image


class Captioner:
    """A ViT-GPT2 captioner: images in, captions out.

    Holds the checkpoint (``params``, ``config``, ``tokenizer``, ``preprocess_config``,
    ``generation_defaults``) and a compiled ``Generator`` whose programs are cached per
    (batch bucket, generation settings).
    """

    def __init__(
        self,
        checkpoint: loading.LoadedCheckpoint,
        *,
        dtype: str | Any = CaptionOptions.dtype,
        parallelism: str = CaptionOptions.parallelism,
    ):
        self.checkpoint = checkpoint
        self.params = checkpoint.params  # float32, whatever ``dtype`` computes in
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.preprocess_config = checkpoint.preprocess_config
        self.generation_defaults = checkpoint.generation_defaults
        self.parallelism = parallelism
        placement = sharding.data_parallel(parallelism)
        backend.warn_if_slow_bfloat16(dtype, placement.devices)
        self.generator = Generator(self.params, self.config, dtype=dtype,
                                   data_parallel=placement)
        # Seconds from_pretrained took (reading the checkpoint, placing the weights).
        self.load_seconds = 0.0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = CaptionOptions.model,
        *,
        revision: str | None = None,
        dtype: str | Any = CaptionOptions.dtype,
        parallelism: str = CaptionOptions.parallelism,
    ) -> "Captioner":
        """Loads a hub id or local checkpoint directory.

        Args:
          name_or_path: hub id or directory with ``flax_model.msgpack``, ``model.safetensors``
            or ``pytorch_model.bin`` (PyTorch weights are converted on load).
          revision: hub branch, tag or commit.
          dtype: compute dtype of the generator: ``"float32"`` (exact, the default) or
            ``"bfloat16"`` (fast), or the ``jnp`` dtype.
          parallelism: ``"mesh"`` (jit over a device mesh, default), ``"pmap"`` or ``"none"``.

        Raises:
          ModelLoadError: one line naming the input, the cause and the fix.
        """
        started = time.perf_counter()
        checkpoint = loading.load_checkpoint(name_or_path, revision=revision)
        captioner = cls(checkpoint, dtype=dtype, parallelism=parallelism)
        captioner.load_seconds = time.perf_counter() - started
        return captioner

    @classmethod
    def from_options(cls, options: CaptionOptions) -> "Captioner":
        """Loads ``options.model`` as ``options`` say: its revision, dtype and parallelism,
        with JAX's persistent compilation cache on in ``options.compilation_cache`` (when
        set: every program is cached, so a restarted process skips recompiling).

        Raises:
          ModelLoadError: as ``from_pretrained``.
          OptionError: the compilation cache is not a folder.
        """
        options.check_paths()
        if options.compilation_cache:
            enable_compilation_cache(options.compilation_cache)
        return cls.from_pretrained(options.model, revision=options.revision,
                                   dtype=options.dtype, parallelism=options.parallelism)

    def settings(self, **overrides: Any) -> GenerationSettings:
        """Generation settings: the checkpoint's defaults with ``overrides`` applied, checked
        against this model (token ids in its vocabulary, ``max_length`` within its positions)
        before any work.

        Raises:
          OptionError: naming the setting.
        """
        settings = GenerationSettings.resolve(self.generation_defaults, **overrides)
        self.generator.check(settings)
        return settings

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over what turns pixels into text: every weight (its path, dtype, shape and
        bytes), the preprocessing and the tokenizer. Equal fingerprints caption alike, from
        whichever file format or folder the weights were read."""
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
            array = np.ascontiguousarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
        digest.update(repr(self.preprocess_config).encode())
        backend_tokenizer = getattr(self.tokenizer, "backend_tokenizer", None)
        digest.update((backend_tokenizer.to_str() if backend_tokenizer is not None
                       else repr(sorted(self.tokenizer.get_vocab().items()))).encode())
        return digest.hexdigest()

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
        weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(self.params))
        return backend.default_batch_size(self.generator.data_parallel.devices,
                                          image_bytes=image_bytes, weight_bytes=weight_bytes)

    def batches(self, items: Iterable[InputItem], options: CaptionOptions, *,
                batch_size: int | None = None,
                pad_first: bool = False) -> contextlib.AbstractContextManager[Iterator[feed.Batch]]:
        """``feed.batches`` of ``items`` as ``options`` decode them: ``options.batch_size``
        images per batch (``batch_size`` instead when given; None for both:
        ``default_batch_size()``), on ``decode_workers(options)``, with its EXIF, fast
        decoding, device resize and JPEG decoder choices. ``pad_first`` as in
        ``feed.batches``.

        Raises:
          OptionError: ``resize_on_device`` for a preprocessing the device cannot reproduce;
            ``jpeg_decoder="nvimagecodec"`` without the package.
        """
        threads, processes = decode_workers(options)
        jpeg_decoder = options.jpeg_decoder or ("nvimagecodec" if nvimagecodec.available()
                                                 else "pillow")
        if jpeg_decoder == "nvimagecodec" and not nvimagecodec.available():
            raise OptionError("jpeg_decoder", "nvimagecodec: NVIDIA nvImageCodec is not "
                              "installed (pip install 'flax-captioner[nvimagecodec]')")
        if options.resize_on_device and not resize.supported(self.preprocess_config):
            raise OptionError("resize_on_device", "cannot reproduce this checkpoint's "
                              f"preprocessing: {resize.unsupported_reason(self.preprocess_config)}")
        return feed.batches(
            items, self.preprocess_config,
            batch_size or options.batch_size or self.default_batch_size(),
            num_threads=threads, decode_processes=processes, pad_first=pad_first,
            decoding=ImageDecoding(exif_transpose=options.exif_transpose,
                                   fast=options.fast_decode,
                                   device_resize=options.resize_on_device,
                                   jpeg_decoder=jpeg_decoder))

    def preprocess(self, images: ImageInput | Iterable[ImageInput],
                   options: CaptionOptions | None = None, **overrides: Any) -> np.ndarray:
        """Decodes and preprocesses images (on the feed's threads) into float32[B, 3, H, W],
        decoded as ``options`` with ``overrides`` say (``exif_transpose``, ``fast_decode``,
        the decoding workers), in one batch.

        Raises:
          ImageReadError: naming the first input that cannot be read.
          OptionError: a bad option.
        """
        # The host resizes: pixel values are what this returns (resize_on_device ignored).
        options = (options or CaptionOptions()).replace(
            **{**overrides, "resize_on_device": False})
        items = list(_items(images, options))
        with self.batches(items, options, batch_size=max(len(items), 1)) as batches:
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
        options: CaptionOptions | None = None,
        **overrides: Any,
    ) -> list[str]:
        """Captions images: one caption per image and returned sequence, in input order.

        Args:
          images: one image or any iterable of them (paths, encoded bytes, PIL images, or
            dataset rows holding one), decoded lazily on the feed's threads while the
            device works.
          options: the choices (``CaptionOptions``; None: the defaults); those of the model
            are the loaded captioner's, and those of an output do not apply.
          overrides: ``CaptionOptions`` fields to change, e.g. ``num_beams=4``,
            ``batch_size=16``, ``fast_decode=True``, ``seed=1``. Unset generation settings
            come from the checkpoint.

        Raises:
          ImageReadError: naming the first input that cannot be read.
          OptionError: a bad option or setting (before any image is read).
        """
        options = (options or CaptionOptions()).replace(**overrides)
        settings = self.settings(**options.generation_overrides())
        rows = settings.num_return_sequences
        captions: list[str] = []
        with self.batches(_items(images, options), options) as batches:
            for batch, output in device_loop.run(_every_image_read(batches), self.generator,
                                                 settings, rng=jax.random.key(options.seed)):
                captions.extend(self.decode(output.sequences[:batch.num_decoded * rows]))
        return captions


def decode_workers(options: CaptionOptions) -> tuple[int, bool]:
    """(decoding threads, whether each hands its images to a process) for ``options``:
    ``decode_threads``, else one per CPU core; ``decode_processes``, else processes past
    ``decode_processes.THREADS_UP_TO`` threads (where they decode faster)."""
    threads = feed.decode_threads(options.decode_threads)
    processes = options.decode_processes
    return threads, use_processes(threads) if processes is None else processes


def _items(images: ImageInput | Iterable[ImageInput],
           options: CaptionOptions) -> Iterator[InputItem]:
    """InputItems for the feed, named as errors should name them.

    Besides paths (local or fsspec URLs), bytes and PIL images, an element may be a row of a
    ``datasets.Dataset`` or of img2dataset's tables: a mapping whose image is a PIL image,
    bytes, or a Hugging Face image struct ``{"bytes": ..., "path": ...}``, found under
    ``options.image_column``, else the first of ``sources.IMAGE_COLUMNS`` (``image``, ``jpg``,
    ...), and named by ``options.id_column``, else by ``sources.ID_COLUMNS``.
    """
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    for index, image in zip(itertools.count(), images):
        name, row_id = f"images[{index}]", None
        if isinstance(image, Mapping):
            image, row_id = _row_image(image, name, options)
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


def _row_image(row: Mapping[str, Any], name: str,
               options: CaptionOptions) -> tuple[Any, str | None]:
    """(image value, row name from its id column or None) of a dataset row."""
    image_columns = (options.image_column,) if options.image_column else sources.IMAGE_COLUMNS
    column = next((column for column in image_columns if column in row), None)
    if column is None:
        raise TypeError(f"{name}: a row without an image column (looked for "
                        f"{', '.join(image_columns)}; it has {', '.join(row)})")
    id_columns = (options.id_column,) if options.id_column else sources.ID_COLUMNS
    identifier = next((row[column] for column in id_columns
                       if row.get(column) is not None), None)
    return row[column], None if identifier is None else str(identifier)


def _every_image_read(batches: Iterable[feed.Batch]) -> Iterator[feed.Batch]:
    """``batches``, raising the first unreadable image's error before its batch runs."""
    for batch in batches:
        _raise_first_error(batch)
        yield batch


def _raise_first_error(batch: feed.Batch) -> None:
    error = next((error for error in batch.errors if error is not None), None)
    if error is not None:
        raise error
