"""Batch captioning: inputs -> decoded batches (background threads) -> device -> rows on disk.

``run_pipeline`` streams any number of images with bounded memory, keeps the device busy
while decoding keeps up, resumes a killed run exactly where its output stops, and under
``jax.distributed`` splits the inputs over processes and merges their outputs at the end.
The command line's ``caption`` and ``merge`` commands are thin calls to ``run_pipeline``
and ``merge_shards``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import itertools
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from tqdm import tqdm

from flax_captioner import sharding
from flax_captioner.errors import ImageReadError, OutputError, PipelineInterrupted
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.sources import InputItem, check_inputs, decode_item, iter_inputs
from flax_captioner.writers import (Row, RowWriter, check_writable, format_score, merge_shards,
                                    open_writer, part_path, resolve_format)

# Decoded batches waiting for the device; more only holds memory without adding overlap.
_READY_BATCHES = 2
# Without a terminal, a progress bar appears only for runs at least this long (a log line).
_PROGRESS_DELAY_SECONDS = 30.0

Item = TypeVar("Item")


@dataclasses.dataclass
class PipelineStats:
    """What a run did (this process's share under ``jax.distributed``).

    Attributes:
      captioned: images captioned in this run.
      errors: error rows written in this run (unreadable images, damaged tar shards).
      resumed: rows already in the output from earlier runs, skipped.
      wall_seconds: the run, from the first input read to the last row flushed.
      decode_seconds: image decoding + preprocessing, summed over the decoding threads.
      device_seconds: the model: generate calls until their outputs were on the host.
      input_wait_seconds: time the device loop waited for decoded batches (0 when decoding
        keeps up).
      decode_threads: number of decoding threads.
    """

    captioned: int = 0
    errors: int = 0
    resumed: int = 0
    wall_seconds: float = 0.0
    decode_seconds: float = 0.0
    device_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    decode_threads: int = 1

    @property
    def images_per_second(self) -> float:
        """Rows (captions and errors) written per wall-clock second."""
        return (self.captioned + self.errors) / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> str:
        """One line: counts, throughput and where the time went."""
        resumed = f", {self.resumed} already done" if self.resumed else ""
        return (f"captioned {self.captioned} images ({self.errors} errors{resumed}) in "
                f"{self.wall_seconds:.1f} s, {self.images_per_second:.2f} images/s; "
                f"decoding {self.decode_seconds:.1f} s over {self.decode_threads} threads, "
                f"device {self.device_seconds:.1f} s, "
                f"device waited for input {self.input_wait_seconds:.1f} s")


@dataclasses.dataclass
class InputBatch:
    """Consecutive items of this process's slice, decoded.

    Attributes:
      items: N items in input order.
      errors: N entries: None where the item decoded (its pixels are the next row of
        ``pixel_values``), else why it could not be read.
      pixel_values: float32 [G, 3, H, W] for the G decoded items; G is the batch size,
        except in the last batch.
      decode_seconds: thread time spent decoding these items.
    """

    items: list[InputItem]
    errors: list[str | None]
    pixel_values: np.ndarray
    decode_seconds: float


def check_run(inputs: Sequence[str], output: str | None,
              output_format: str | None = None) -> str:
    """Fails fast on inputs or an output that would make a run pointless; call it before
    loading a model. Returns the output format (``resolve_format``).

    Raises:
      DataError: a glob matches nothing, or a path list or tar shard does not exist.
      OutputError: the output's directory is missing or not writable, or it is a directory.
      ValueError: an unknown format, or Parquet to stdout.
    """
    output_format = resolve_format(output, output_format)
    check_inputs(inputs)
    if output is not None:
        check_writable(output)
    return output_format


def run_pipeline(
    captioner: Any,
    inputs: Sequence[str],
    output: str | None,
    *,
    batch_size: int = 8,
    output_format: str | None = None,
    resume: bool = True,
    num_threads: int | None = None,
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    flush_seconds: float = 30.0,
) -> PipelineStats:
    """Captions every image ``inputs`` name into ``output``, one row per image in input order.

    Args:
      captioner: a ``Captioner`` (anything with ``preprocess_config``,
        ``generate(pixel_values, rng=..., first_index=..., **settings)`` and ``decode(sequences)``).
      inputs: image files, directories, globs, .txt/.csv path lists, .tar shards
        (see ``sources.iter_inputs``).
      output: a .jsonl or .parquet file; None writes JSONL to stdout (no resume).
      batch_size: images per device batch. Every batch is full but the last, which is padded
        to ``batch_size`` once a full batch has compiled, so it reuses that program.
      output_format: "jsonl" or "parquet"; None picks by the output's suffix.
      resume: continue after the rows ``output`` already holds (the default); False starts
        over.
      num_threads: image decoding threads (None: one per CPU core).
      seed: sampling seed; each batch passes its first input index as ``first_index``, so a
        resumed run samples what an uninterrupted one would.
      settings: generation settings passed to ``captioner.generate`` (num_beams, ...).
      progress: show a tqdm bar on stderr; None shows it on a terminal, and elsewhere only
        once a run has lasted 30 s.
      flush_seconds: Parquet rows reach disk at least this often (and every 1024 rows), which
        bounds the work a kill loses; JSONL rows reach disk after every batch.

    Returns:
      PipelineStats, also printed as one line on stderr.

    Raises:
      DataError: a glob matches nothing or a path list is unreadable (before any work).
      OutputError: the output cannot be written or belongs to other inputs (before any work).
      PipelineInterrupted: SIGINT/SIGTERM; rows so far are flushed and a rerun resumes.
      ValueError: a bad argument.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    output_format = check_run(inputs, output, output_format)
    process_index, process_count = jax.process_index(), jax.process_count()
    if process_count > 1 and output is None:
        raise ValueError("a multi-process run needs an output file (stdout cannot be merged)")
    target = output if process_count == 1 or output is None else part_path(
        output, process_index, process_count)
    if target != output and resume and os.path.exists(output) and not os.path.exists(target):
        raise OutputError(f"{output}: already holds the merged output of a finished run",
                          fix=("other_output", "start_over"))
    writer = open_writer(target, output_format, resume=resume and output is not None,
                         flush_seconds=flush_seconds)
    stats = PipelineStats(resumed=writer.rows_done,
                          decode_threads=num_threads or os.cpu_count() or 1)
    items = sharding.process_slice(iter_inputs(inputs), process_index, process_count)
    _skip_done(items, writer, target)
    stop_signal = threading.Event()
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stop_on_signals(stop_signal))
            bar = stack.enter_context(
                _progress_bar(process_index == 0 if progress is None else progress, progress))
            executor = concurrent.futures.ThreadPoolExecutor(stats.decode_threads)
            stack.callback(executor.shutdown, cancel_futures=True)
            window = 2 * max(batch_size, stats.decode_threads)
            batches = stack.enter_context(_in_background(
                _decoded_batches(items, captioner.preprocess_config, batch_size, executor,
                                 window=window), _READY_BATCHES))
            _caption_batches(captioner, batches, writer, stats, bar, stop_signal,
                             batch_size=batch_size, seed=seed, settings=dict(settings or {}))
    except BaseException:
        writer.flush()  # every finished row stays; the output resumes from there
        raise
    writer.close()
    stats.wall_seconds = time.perf_counter() - started
    print(stats.summary(), file=sys.stderr)
    if stop_signal.is_set():
        where = "" if output is None else "; run again with the same output to resume"
        raise PipelineInterrupted(
            f"interrupted: {stats.captioned + stats.errors} rows written this run"
            f" ({stats.resumed + stats.captioned + stats.errors} in "
            f"{target or 'stdout'}){where}", stats, stop_signal.signal_number)
    if process_count > 1:
        # Every process has closed its part; process 0 interleaves them into one file.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"flax_captioner.pipeline finished {output}")
        if process_index == 0:
            merge_shards(output, output_format)
    return stats


def _skip_done(items: Iterator[InputItem], writer: RowWriter, target: str | None) -> None:
    """Advances ``items`` past the rows ``writer`` already holds, checking they match."""
    if not writer.rows_done:
        return
    skipped, last = 0, None
    for skipped, last in enumerate(itertools.islice(items, writer.rows_done), start=1):
        pass
    if skipped < writer.rows_done or last.image != writer.last_image:
        raise OutputError(
            f"{target}: holds {writer.rows_done} rows ending with {writer.last_image!r}, which "
            "do not match these inputs", fix=("other_output", "start_over"))


def _caption_batches(captioner: Any, batches: Iterator[InputBatch], writer: RowWriter,
                     stats: PipelineStats, bar: tqdm, stop_signal: threading.Event, *,
                     batch_size: int, seed: int, settings: dict[str, Any]) -> None:
    """The device loop: generate, detokenize, write rows, until the inputs or a signal end."""
    base_key = jax.random.key(seed)
    compiled_full_batch = False
    while not stop_signal.is_set():
        waited = time.perf_counter()
        batch = next(batches, None)
        stats.input_wait_seconds += time.perf_counter() - waited
        if batch is None:
            return
        stats.decode_seconds += batch.decode_seconds
        decoded = len(batch.pixel_values)
        captions: list[str] = []
        scores = np.zeros((0,), np.float32)
        if decoded:
            pixel_values = batch.pixel_values
            if decoded < batch_size and compiled_full_batch:
                pixel_values = sharding.pad_to_multiple(pixel_values, batch_size)
            started = time.perf_counter()
            generated = captioner.generate(pixel_values, rng=base_key,
                                           first_index=batch.items[0].index, **settings)
            sequences = np.asarray(generated.sequences)
            all_scores = np.asarray(generated.scores)
            stats.device_seconds += time.perf_counter() - started
            compiled_full_batch |= decoded == batch_size
            # num_return_sequences rows per image, best first: keep each image's first.
            per_image = len(all_scores) // len(pixel_values)
            captions = captioner.decode(sequences[::per_image][:decoded])
            scores = all_scores[::per_image][:decoded]
        writer.write(_rows(batch, captions, scores))
        errors = sum(error is not None for error in batch.errors)
        stats.captioned += decoded
        stats.errors += errors
        bar.update(decoded + errors)


def _rows(batch: InputBatch, captions: Sequence[str], scores: np.ndarray) -> list[Row]:
    results = iter(zip(captions, scores))
    rows: list[Row] = []
    for item, error in zip(batch.items, batch.errors):
        if error is not None:
            rows.append({"image": item.image, "error": error})
        else:
            caption, score = next(results)
            rows.append({"image": item.image, "caption": caption, "score": format_score(score)})
    return rows


def _decode_timed(item: InputItem, encoded: bytes | None,
                  config: PreprocessConfig) -> tuple[np.ndarray | None, str | None, float]:
    started = time.perf_counter()
    try:
        pixels, error = decode_item(item, encoded, config), None
    except ImageReadError as read_error:
        pixels, error = None, read_error.reason
    return pixels, error, time.perf_counter() - started


def _submit(executor: concurrent.futures.Executor, item: InputItem,
            config: PreprocessConfig) -> concurrent.futures.Future:
    """Queues the decoding of ``item``; tar bytes are read here, in stream order."""
    encoded = None
    if item.read_bytes is not None:
        try:
            encoded = item.read_bytes()
        except ImageReadError as error:
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_result((None, error.reason, 0.0))
            return failed
    return executor.submit(_decode_timed, item, encoded, config)


def _decoded_batches(items: Iterable[InputItem], config: PreprocessConfig, batch_size: int,
                     executor: concurrent.futures.Executor, *,
                     window: int) -> Iterator[InputBatch]:
    """Batches of ``batch_size`` decoded images (plus the error items among them), in order.

    At most ``window`` images are queued or decoding at once, which bounds memory.
    """
    in_flight: collections.deque = collections.deque()

    def results() -> Iterator[tuple[InputItem, tuple[np.ndarray | None, str | None, float]]]:
        for item in items:
            in_flight.append((item, _submit(executor, item, config)))
            if len(in_flight) >= window:
                item, future = in_flight.popleft()
                yield item, future.result()
        while in_flight:
            item, future = in_flight.popleft()
            yield item, future.result()

    batch_items: list[InputItem] = []
    errors: list[str | None] = []
    pixels: list[np.ndarray] = []
    seconds = 0.0
    for item, (item_pixels, error, item_seconds) in results():
        batch_items.append(item)
        errors.append(error)
        seconds += item_seconds
        if item_pixels is not None:
            pixels.append(item_pixels)
        if len(pixels) == batch_size:
            yield InputBatch(batch_items, errors, np.stack(pixels), seconds)
            batch_items, errors, pixels, seconds = [], [], [], 0.0
    if batch_items:
        height, width = config.size
        pixel_values = np.stack(pixels) if pixels else np.zeros((0, 3, height, width), np.float32)
        yield InputBatch(batch_items, errors, pixel_values, seconds)


@contextlib.contextmanager
def _in_background(iterator: Iterator[Item], max_ready: int) -> Iterator[Iterator[Item]]:
    """Runs ``iterator`` in a thread, ``max_ready`` items ahead of the consumer."""
    ready: queue.Queue = queue.Queue(max_ready)
    stop = threading.Event()
    end = object()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        """Puts ``entry`` once there is room; False when the consumer has stopped."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for value in itertools.chain(iterator, [end]):
                if not offer((value, None)):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            offer((end, error))

    def consume() -> Iterator[Item]:
        while True:
            value, error = ready.get()
            if error is not None:
                raise error
            if value is end:
                return
            yield value

    thread = threading.Thread(target=produce, name="flax-captioner-decode", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _stop_on_signals(stop_signal: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop_signal`` (the loop ends after the batch on the device); a
    second one interrupts at once. Signals are only handled in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in handled}

    def request_stop(signum: int, frame: Any) -> None:
        if stop_signal.is_set():
            raise KeyboardInterrupt
        stop_signal.signal_number = signum
        stop_signal.set()
        print(f"\n{signal.Signals(signum).name}: finishing the current batch and flushing the "
              "output (send it again to stop at once)", file=sys.stderr)

    for signum in handled:
        signal.signal(signum, request_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _progress_bar(show: bool, requested: bool | None) -> Iterator[tqdm]:
    on_terminal = sys.stderr.isatty()
    delay = 0.0 if on_terminal or requested else _PROGRESS_DELAY_SECONDS
    with tqdm(unit="img", file=sys.stderr, disable=not show, delay=delay,
              mininterval=0.1 if on_terminal else _PROGRESS_DELAY_SECONDS,
              dynamic_ncols=True) as bar:
        yield bar
