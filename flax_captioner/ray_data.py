"""Ray Data integration: caption a dataset on a Ray cluster with ``Dataset.map_batches``.

``CaptionImages`` is the callable class Ray Data runs on actors: each actor loads the
captioner once, then captions the batches Ray hands it (encoded image bytes, Hugging Face
image structs, paths/URLs, or decoded images from ``read_images`` / ``read_webdataset``)::

    import ray
    from flax_captioner.ray_data import CaptionImages

    images = ray.data.read_parquet("s3://bucket/img2dataset/")          # jpg + key columns
    captions = images.map_batches(
        CaptionImages, fn_constructor_kwargs={"model": "nlpconnect/vit-gpt2-image-captioning",
                                              "image_column": "jpg", "num_beams": 4},
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

import numpy as np
from PIL import Image

from flax_captioner import feed, storage
from flax_captioner.defaults import DEFAULT_MODEL
from flax_captioner.errors import ImageReadError
from flax_captioner.generator import Dispatched, one_ahead
from flax_captioner.preprocess import ImageDecoding
from flax_captioner.sources import InputItem


class CaptionImages:
    """``map_batches`` callable: a batch of images in, their captions and scores out.

    Args:
      model: hub id or checkpoint directory (loaded once per actor).
      image_column: the column holding the images: encoded bytes, ``{"bytes", "path"}``
        structs, paths or URLs, or decoded uint8[H, W, C] arrays.
      id_column: a column naming each row in error messages (None: the row's position).
      batch_size: images per device batch (None: the captioner's default, 256 per GPU/TPU
        chip); Ray's own ``batch_size`` decides how many rows each call gets. A call captions
        its rows in batches of this size, so give calls a multiple of it: a call of fewer
        rows runs one smaller batch (calls of 64 rows run 64-image batches whatever this is).
      num_threads: decoding threads per actor (None: one per CPU core).
      dtype: "float32" or "bfloat16".
      parallelism: "mesh", "pmap" or "none" (see ``Captioner.from_pretrained``).
      exif_transpose, fast_decode: how files become RGB images (``preprocess.ImageDecoding``;
        both off: the model card's pixels).
      settings: generation settings (``num_beams``, ``max_length``, ...); unset ones come
        from the checkpoint. Sampling keys fold in each row's position within its batch.

    Raises:
      ModelLoadError, ValueError: on the actor, when the model or a setting is bad.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, image_column: str = "image",
                 id_column: str | None = None, batch_size: int | None = None,
                 num_threads: int | None = None, dtype: str = "float32",
                 parallelism: str = "mesh", exif_transpose: bool = False,
                 fast_decode: bool = False, **settings: Any):
        import jax.numpy as jnp

        from flax_captioner.captioner import Captioner

        self.captioner = Captioner.from_pretrained(
            model, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
            parallelism=parallelism)
        self.image_column = image_column
        self.id_column = id_column
        self.batch_size = batch_size or self.captioner.default_batch_size()
        self.num_threads = num_threads
        self.decoding = ImageDecoding(exif_transpose=exif_transpose, fast=fast_decode)
        self.settings = self.captioner.settings(**settings)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch``: column -> values (Ray's "numpy" or "pandas" batch format).

        Returns:
          The other columns unchanged, plus ``caption`` (str or None), ``score`` (float32,
          NaN on error) and ``error`` (None or the reason), one per row.
        """
        if self.image_column not in batch:
            raise KeyError(f"no column {self.image_column!r} in the batch (columns: "
                           f"{', '.join(batch)})")
        images = list(batch[self.image_column])
        ids = list(batch[self.id_column]) if self.id_column else range(len(images))
        items = [_item(index, image, str(identifier))
                 for index, (image, identifier) in enumerate(zip(images, ids))]
        captions: list[str | None] = [None] * len(items)
        scores = np.full(len(items), np.nan, np.float32)
        errors: list[str | None] = [None] * len(items)
        rows = self.settings.num_return_sequences

        def dispatch(decoded: feed.Batch) -> Dispatched:
            return self.captioner.generator.dispatch(decoded.pixel_values, self.settings,
                                                     first_index=decoded.items[0].index)

        with feed.batches(items, self.captioner.preprocess_config, self.batch_size,
                          num_threads=self.num_threads, decoding=self.decoding) as batches:
            # As in the pipeline, the devices run batch i + 1 while batch i's rows are made.
            for decoded, dispatched in one_ahead(batches, dispatch):
                done = [item.index for item, error in zip(decoded.items, decoded.errors)
                        if error is None]
                for item, error in zip(decoded.items, decoded.errors):
                    if error is not None:
                        errors[item.index] = error.reason
                if not done:
                    continue
                output = dispatched.result()
                decoded.release()  # its search is done: the feed refills the pixels' memory
                texts = self.captioner.decode(np.asarray(output.sequences)[:len(done) * rows])
                best = np.asarray(output.scores)[:len(done) * rows:rows]
                for position, index in enumerate(done):
                    captions[index], scores[index] = texts[position * rows], best[position]
        result = {key: value for key, value in batch.items() if key != self.image_column}
        result.update(caption=np.array(captions, dtype=object), score=scores,
                      error=np.array(errors, dtype=object))
        return result


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
