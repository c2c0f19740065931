"""Training data: caption rows from JSONL, CSV or COCO JSON; tokenised targets; batches.

A dataset is a list of (image, caption) rows; an image may appear in several rows (several
captions per image, as in COCO). Targets follow the recipe the nlpconnect checkpoint was
trained with: caption tokens + EOS, padded to a fixed length with the pad id, decoder inputs
are the labels shifted right behind ``decoder_start_token_id``, and the loss mask covers the
caption and its EOS only.

Batches are drawn in an order that is a pure function of (seed, epoch), so a resumed run
that knows its position (epoch, batch) sees exactly the batches an uninterrupted run sees.
Their images are decoded by ``feed`` on background threads, ahead of the device.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from flax_captioner import feed
from flax_captioner.errors import DataError
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.sources import InputItem

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaptionRow:
    """One training example: an image path and one caption for it."""

    image: str
    caption: str


@dataclasses.dataclass(frozen=True)
class CaptionTargets:
    """Tokenised captions, all ``[N, T]`` int32 (N rows, T = max_target_length).

    Attributes:
      labels: caption ids + EOS, then pad ids.
      decoder_input_ids: ``labels`` shifted right by one behind ``decoder_start_token_id``.
      decoder_attention_mask: 1 on the caption and its EOS, 0 on padding (also the loss mask).
    """

    labels: np.ndarray
    decoder_input_ids: np.ndarray
    decoder_attention_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class CaptionDataset:
    """A readable dataset, ready to batch.

    Attributes:
      source: the file the rows came from.
      rows: rows whose image could be read, in file order.
      targets: tokenised captions aligned with ``rows``.
      preprocess_config: how images become pixel values.
      skipped_images: unreadable images dropped when the dataset was loaded.
    """

    source: Path
    rows: list[CaptionRow]
    targets: CaptionTargets
    preprocess_config: PreprocessConfig
    skipped_images: int

    def __len__(self) -> int:
        return len(self.rows)


def read_caption_rows(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[CaptionRow]:
    """Reads (image, caption) rows from a ``.jsonl``, ``.csv`` or COCO captions ``.json`` file.

    JSONL and CSV rows name the image in ``image_column`` and the caption in
    ``caption_column`` (in JSONL a list of captions gives one row per caption). A COCO file
    has ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
    Relative image paths are resolved against ``image_root``, by default the file's folder.

    Raises:
      DataError: the file is missing or malformed, lacks the image or caption column, or has
        no rows; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    root = Path(image_root) if image_root is not None else path.parent
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        pairs = _read_jsonl(path, image_column, caption_column)
    elif suffix == ".csv":
        pairs = _read_csv(path, image_column, caption_column)
    elif suffix == ".json":
        pairs = _read_coco(path)
    else:
        raise DataError(f"{path}: unsupported format {suffix!r} (use .jsonl, .csv or COCO .json)")
    rows = [CaptionRow(_resolve_image(root, image), caption.strip()) for image, caption in pairs]
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def _resolve_image(root: Path, image: str) -> str:
    return image if Path(image).is_absolute() else str(root / image)


def _read_jsonl(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object per line")
            _require_columns(path, record.keys(), image_column, caption_column, line_number)
            captions = record[caption_column]
            for caption in captions if isinstance(captions, list) else [captions]:
                pairs.append((str(record[image_column]), str(caption)))
    return pairs


def _read_csv(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        _require_columns(path, reader.fieldnames or [], image_column, caption_column)
        return [(row[image_column], row[caption_column]) for row in reader]


def _read_coco(path: Path) -> list[tuple[str, str]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(document, dict) or "images" not in document or "annotations" not in document:
        raise DataError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    files = {image["id"]: image["file_name"] for image in document["images"]}
    pairs = []
    for annotation in document["annotations"]:
        if "caption" not in annotation:
            raise DataError(f"{path}: annotations have no 'caption' column "
                            "(is this a COCO instances file rather than captions?)")
        if annotation["image_id"] not in files:
            raise DataError(f"{path}: annotation names image_id {annotation['image_id']} "
                            "that is not in 'images'")
        pairs.append((files[annotation["image_id"]], annotation["caption"]))
    return pairs


def _require_columns(path: Path, columns: Any, image_column: str, caption_column: str,
                     line_number: int | None = None) -> None:
    where = f"{path}:{line_number}" if line_number is not None else str(path)
    present = list(columns)
    for column, role in ((caption_column, "caption"), (image_column, "image")):
        if column not in present:
            raise DataError(f"{where}: no {role} column {column!r} (columns: "
                            f"{', '.join(map(str, present)) or 'none'})")


def drop_unreadable_images(rows: Sequence[CaptionRow], config: PreprocessConfig, *,
                           description: str = "checking images"
                           ) -> tuple[list[CaptionRow], list[str]]:
    """Decodes every distinct image once (on the feed's threads); returns the readable rows
    and the unreadable images."""
    images = sorted({row.image for row in rows})
    items = (InputItem(index, image) for index, image in enumerate(images))
    unreadable = []
    with feed.batches(items, config, 64) as batches, \
            tqdm(total=len(images), desc=description, leave=False, disable=None) as progress:
        for batch in batches:
            for item, error in zip(batch.items, batch.errors):
                if error is not None:
                    logger.debug("skipping %s", error)
                    unreadable.append(item.name)
            progress.update(len(batch.items))
    bad = set(unreadable)
    return [row for row in rows if row.image not in bad], unreadable


def tokenize_captions(
    tokenizer: Any,
    captions: Sequence[str],
    *,
    max_target_length: int,
    decoder_start_token_id: int,
    pad_token_id: int,
    eos_token_id: int,
) -> CaptionTargets:
    """Tokenises captions into fixed-length targets ``[N, max_target_length]``.

    Captions longer than ``max_target_length - 1`` tokens are cut so that EOS always fits:
    a truncated target still teaches the model to stop.
    """
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    count = len(encoded)
    labels = np.full((count, max_target_length), pad_token_id, dtype=np.int32)
    mask = np.zeros((count, max_target_length), dtype=np.int32)
    for row, ids in enumerate(encoded):
        ids = list(ids[: max_target_length - 1]) + [eos_token_id]
        labels[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    decoder_input_ids = np.concatenate(
        [np.full((count, 1), decoder_start_token_id, dtype=np.int32), labels[:, :-1]], axis=1)
    return CaptionTargets(labels=labels, decoder_input_ids=decoder_input_ids,
                          decoder_attention_mask=mask)


def load_caption_dataset(
    path: str | Path,
    tokenizer: Any,
    preprocess_config: PreprocessConfig,
    *,
    max_target_length: int,
    decoder_start_token_id: int,
    pad_token_id: int,
    eos_token_id: int,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> CaptionDataset:
    """Reads, checks and tokenises a dataset file.

    Rows whose image cannot be decoded are dropped and counted (logged as a warning).

    Raises:
      DataError: see ``read_caption_rows``; also when no row has a readable image.
    """
    path = Path(path)
    rows = read_caption_rows(path, image_root=image_root, image_column=image_column,
                             caption_column=caption_column)
    rows, unreadable = drop_unreadable_images(rows, preprocess_config,
                                              description=f"checking {path.name}")
    if unreadable:
        logger.warning("%s: skipped %d unreadable image(s), e.g. %s", path, len(unreadable),
                       unreadable[0])
    if not rows:
        raise DataError(f"{path}: the dataset is empty (none of its {len(unreadable)} "
                        "image(s) could be read)")
    targets = tokenize_captions(
        tokenizer, [row.caption for row in rows], max_target_length=max_target_length,
        decoder_start_token_id=decoder_start_token_id, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id)
    return CaptionDataset(source=path, rows=rows, targets=targets,
                          preprocess_config=preprocess_config, skipped_images=len(unreadable))


def batches_per_epoch(num_rows: int, batch_size: int) -> int:
    """Batches in one epoch; the last one is padded, never dropped."""
    return math.ceil(num_rows / batch_size)


def epoch_batch_indices(num_rows: int, batch_size: int, *, seed: int, epoch: int,
                        shuffle: bool = True) -> np.ndarray:
    """Row indices of every batch of one epoch, ``[batches_per_epoch, batch_size]`` int64.

    The order is a pure function of (seed, epoch). Slots past the end of the data are -1
    (padding rows, which get zero loss weight).
    """
    order = (np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle
             else np.arange(num_rows))
    count = batches_per_epoch(num_rows, batch_size)
    padded = np.full(count * batch_size, -1, dtype=np.int64)
    padded[:num_rows] = order
    return padded.reshape(count, batch_size)


def batch_targets(dataset: CaptionDataset, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The token arrays of one batch.

    Args:
      dataset: the dataset.
      indices: int[B] row indices; -1 marks a padding row (row 0's data, weight 0).

    Returns:
      ``decoder_input_ids``, ``decoder_attention_mask`` and ``labels`` int32[B, T], and
      ``loss_mask`` float32[B, T] (the attention mask times the row weight).
    """
    weights = (indices >= 0).astype(np.float32)
    rows = np.where(indices >= 0, indices, 0)
    targets = dataset.targets
    mask = targets.decoder_attention_mask[rows]
    return {
        "decoder_input_ids": targets.decoder_input_ids[rows],
        "decoder_attention_mask": mask,
        "labels": targets.labels[rows],
        "loss_mask": mask.astype(np.float32) * weights[:, None],
    }


@contextlib.contextmanager
def batches(dataset: CaptionDataset, index_batches: Iterable[np.ndarray], batch_size: int, *,
            num_threads: int | None = None) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """Host batches for ``index_batches`` (each int[batch_size], -1 for padding rows), in
    order, their images decoded by ``feed`` on background threads while the device works.

    Yields:
      An iterator of ``batch_targets`` dicts plus ``pixel_values`` float32[B, 3, H, W].

    Raises (from the iterator):
      DataError: an image that was readable when the dataset was loaded no longer is.
    """
    # Index arrays whose images the feed's reader thread has queued, oldest first; the
    # consumer pairs each decoded batch with the next one (deque appends/pops are atomic).
    queued: collections.deque[np.ndarray] = collections.deque()
    counter = itertools.count()

    def items() -> Iterator[InputItem]:
        for indices in index_batches:
            queued.append(indices)
            for row in np.where(indices >= 0, indices, 0):
                yield InputItem(next(counter), dataset.rows[row].image)

    with feed.batches(items(), dataset.preprocess_config, batch_size,
                      num_threads=num_threads) as decoded:
        yield (_host_batch(dataset, batch, queued.popleft()) for batch in decoded)


def _host_batch(dataset: CaptionDataset, batch: feed.Batch,
                indices: np.ndarray) -> dict[str, np.ndarray]:
    error = next((error for error in batch.errors if error is not None), None)
    if error is not None:
        raise DataError(f"{dataset.source}: image became unreadable during training ({error})")
    return {"pixel_values": batch.pixel_values, **batch_targets(dataset, indices)}


def references_by_image(rows: Sequence[CaptionRow]) -> dict[str, list[str]]:
    """Every caption of each distinct image, images in first-appearance order."""
    references: dict[str, list[str]] = {}
    for row in rows:
        references.setdefault(row.image, []).append(row.caption)
    return references
