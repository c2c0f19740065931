"""Ray Data integration: caption a dataset on a Ray cluster with ``Dataset.map_batches``.

``CaptionImages`` is the callable class Ray Data runs on actors: each actor loads the
captioner once, then captions the batches Ray hands it (encoded image bytes, Hugging Face
image structs, paths/URLs, or decoded images from ``read_images`` / ``read_webdataset``)::

    import ray
    from flax_captioner import CaptionOptions
    from flax_captioner.ray_data import CaptionImages

    images = ray.data.read_parquet("s3://bucket/img2dataset/")          # jpg + key columns
    options = CaptionOptions(model="nlpconnect/vit-gpt2-image-captioning", num_beams=4)
    captions = images.map_batches(
        CaptionImages, fn_constructor_kwargs={"options": options},      # jpg: found itself
        batch_size=1024, concurrency=4, num_gpus=1)                     # 4 actors, 1 GPU each
    captions.write_parquet("s3://bucket/captions/")

Each output batch keeps the input's other columns (the image column is dropped: it is the
bulk of the bytes) and adds ``caption``, ``score`` and ``error`` (None, or why the image could
not be read: one unreadable image never fails the batch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from PIL import Image

from flax_captioner import device_loop, sources, storage
from flax_captioner.errors import ImageReadError
from flax_captioner.options import CaptionOptions
from flax_captioner.sources import InputItem


class CaptionImages:
    """``map_batches`` callable: a batch of images in, their captions and scores out.

    Args:
      options: the choices (``CaptionOptions``; None: the defaults), of which these apply:
        the model's (``model``, ``revision``, ``dtype``, ``parallelism``,
        ``compilation_cache``: loaded once per actor), ``image_column`` (the column holding
        the images: encoded bytes, ``{"bytes", "path"}`` structs, paths or URLs, or decoded
        uint8[H, W, C] arrays; None: the first of ``sources.IMAGE_COLUMNS`` in the batch),
        ``id_column`` (naming rows in error messages; None: the first of
        ``sources.ID_COLUMNS``, else the row's position), the decoding choices, the
        generation settings and ``seed`` (sampling keys fold in each row's position within
        its call). ``batch_size`` is images per device batch (None: the captioner's default,
        256 per GPU/TPU chip); Ray's own ``batch_size`` decides how many rows each call gets.
        A call captions its rows in batches of this size, so give calls a multiple of it: a
        call of fewer rows runs one smaller batch.
      overrides: ``CaptionOptions`` fields to change (Ray's ``fn_constructor_kwargs`` may
        give them alone, as ``{"model": ..., "num_beams": 4}``).

    Raises:
      ModelLoadError, OptionError: on the actor, when the model or an option is bad.
    """

    def __init__(self, options: CaptionOptions | None = None, **overrides: Any):
        from flax_captioner.captioner import Captioner

        self.options = (options or CaptionOptions()).replace(**overrides)
        self.captioner = Captioner.from_options(self.options)
        self.settings = self.captioner.settings(**self.options.generation_overrides())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch``: column -> values (Ray's "numpy" or "pandas" batch format).

        Returns:
          The other columns unchanged, plus ``caption`` (str or None), ``score`` (float32,
          NaN on error) and ``error`` (None or the reason), one per row.
        """
        image_column = _column(batch, self.options.image_column, sources.IMAGE_COLUMNS)
        if image_column is None:
            raise KeyError(f"no image column ({', '.join(sources.IMAGE_COLUMNS)}) in the batch "
                           f"(columns: {', '.join(batch)})")
        id_column = _column(batch, self.options.id_column, sources.ID_COLUMNS)
        images = list(batch[image_column])
        ids = list(batch[id_column]) if id_column else range(len(images))
        items = [_item(index, image, str(identifier))
                 for index, (image, identifier) in enumerate(zip(images, ids))]
        captions: list[str | None] = [None] * len(items)
        scores = np.full(len(items), np.nan, np.float32)
        errors: list[str | None] = [None] * len(items)
        rows = self.settings.num_return_sequences
        with self.captioner.batches(items, self.options) as batches:
            # As in the pipeline, the devices run batch i + 1 while batch i's rows are made.
            for decoded, output in device_loop.run(batches, self.captioner.generator,
                                                   self.settings,
                                                   rng=jax.random.key(self.options.seed)):
                done = [item.index for item, error in zip(decoded.items, decoded.errors)
                        if error is None]
                for item, error in zip(decoded.items, decoded.errors):
                    if error is not None:
                        errors[item.index] = error.reason
                if output is None:
                    continue
                texts = self.captioner.decode(output.sequences[:len(done) * rows])
                best = output.scores[:len(done) * rows:rows]
                for position, index in enumerate(done):
                    captions[index], scores[index] = texts[position * rows], best[position]
        result = {key: value for key, value in batch.items() if key != image_column}
        result.update(caption=np.array(captions, dtype=object), score=scores,
                      error=np.array(errors, dtype=object))
        return result


def _column(batch: Mapping[str, Any], named: str | None,
            candidates: tuple[str, ...]) -> str | None:
    """``named``, else the first of ``candidates`` the batch has (None).

    Raises:
      KeyError: the batch has no column ``named``.
    """
    if named is not None:
        if named not in batch:
            raise KeyError(f"no column {named!r} in the batch (columns: {', '.join(batch)})")
        return named
    return next((column for column in candidates if column in batch), None)


def _item(index: int, image: Any, name: str) -> InputItem:
    """An InputItem for one cell of the image column."""
    if isinstance(image, Mapping):  # a Hugging Face image struct
        image = image.get("bytes") or image.get("path")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        image = Image.fromarray(image)
    if isinstance(image, (bytes, Image.Image)):
        return InputItem(index, name, data=image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return InputItem(index, path, fetch=storage.fetcher(path)
                         if storage.is_remote(path) else None)
    reason = "no image" if image is None else f"not an image: a {type(image).__name__}"

    def missing() -> bytes:
        raise ImageReadError(name, reason)

    return InputItem(index, name, read_bytes=missing)
