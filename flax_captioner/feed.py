"""The host input layer: items -> decoded batches, in input order, ahead of the device.

One feed serves every consumer of images: the captioning pipeline, ``Captioner.caption`` and
``Captioner.preprocess``, and the trainer (training batches and evaluation captions)::

    InputItems, in order
      -> reader thread: reads stream members (tar) in order, queues their decoding
      -> decode threads: load_image + preprocess -> float32[3, H, W], or the ImageReadError
         (or each hands that work to a process: decode_processes.py); with
         ``ImageDecoding.device_resize``, load_image only -> uint8[h, w, 3]
      -> Batch: ``batch_size`` decoded images (float32 pixel values, or uint8 canvases that
         the compiled program resizes: resize.py), the failed items riding along in order
      -> at most ``prefetch`` ready batches wait for the consumer

Memory is bounded whatever the input size: at most ``window`` images are queued or decoding
at once, and at most ``prefetch`` batches wait.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from flax_captioner import nvimagecodec, resize, storage
from flax_captioner.decode_processes import DecodeProcesses, decode_function
from flax_captioner.errors import ImageReadError
from flax_captioner.preprocess import ClippingWarning, ImageDecoding, OnClipped, PreprocessConfig
from flax_captioner.sources import InputItem

# Batches ready ahead of the consumer. One hides a batch's decoding behind the device's work on
# the previous one; a second absorbs jitter (a slow image); more only holds memory.
DEFAULT_PREFETCH = 2

Item = TypeVar("Item")
Decoded = tuple[np.ndarray | None, ImageReadError | None, float]


@dataclasses.dataclass
class Batch:
    """Consecutive items, decoded.

    Attributes:
      items: N items in input order.
      errors: N entries: None where the item decoded (its pixels are the next row of
        ``pixel_values``), else the ImageReadError saying why not.
      pixel_values: float32[P, 3, H, W]: the G decoded images in input order, then P - G
        copies of the first one, padding a last partial batch to the size already compiled
        (see ``batches``). P = G for every other batch. With ``ImageDecoding.device_resize``
        a ``resize.Canvases`` of those P images instead, which ``Generator.dispatch`` takes
        alike.
      num_decoded: G, the decoded images (0 when every item of a last batch failed).
      decode_seconds: time spent decoding these items (by the decode threads, or by the
        processes they hand them to).
      recycle: gives ``pixel_values``' memory back to the feed (``release``); None once
        released, and for a batch without pixels.
    """

    items: list[InputItem]
    errors: list[ImageReadError | None]
    pixel_values: np.ndarray | resize.Canvases
    num_decoded: int
    decode_seconds: float
    recycle: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    def release(self) -> None:
        """Hands ``pixel_values``' memory back to the feed, to hold a later batch. Call it once
        nothing reads the pixels any more (the devices included: after the batch's search has
        finished); a batch never released is simply freed. Releasing twice does nothing."""
        recycle, self.recycle = self.recycle, None
        if recycle is not None:
            recycle()


class _BatchBuffers:
    """Batch arrays (float32[P, 3, H, W], or uint8[P, C, C, 3] canvases), each reused once
    its batch is released.

    A fresh array per batch cost more than the copies into it: the kernel zeroes each new page
    on first touch, in the calling process (docs/performance.md, "Decode processes vs
    threads").
    """

    def __init__(self) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def take(self, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        """An array of ``shape``: a released one when there is one, else a new one."""
        while True:
            try:
                buffer = self._free.get_nowait()
            except queue.Empty:
                return np.empty(shape, dtype)
            if buffer.shape == shape and buffer.dtype == dtype:  # else: dropped
                return buffer

    def give_back(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


def decode_item(item: InputItem, encoded: bytes | None, config: PreprocessConfig, *,
                decoding: ImageDecoding = ImageDecoding(),
                processes: DecodeProcesses | None = None,
                on_clipped: OnClipped | None = None) -> tuple[np.ndarray, float]:
    """float32[3, H, W] of one item (``decoding.device_resize``: its uint8[h, w, 3] pixels,
    ``preprocess.load_decoded_one``) and the seconds its decoding took: ``encoded`` (its
    stream or fetched bytes, already read), its in-memory ``data``, or the file or URL at
    ``item.name``; decoded on ``processes`` when given (with the ``config``, ``decoding`` and
    ``on_clipped`` the pool was built with; the seconds are then the process's). ``on_clipped``
    as in ``preprocess.load_image``. Safe to call from many threads.

    Raises:
      ImageReadError: naming ``item.name`` and the cause.
    """
    started = time.perf_counter()
    source = encoded if encoded is not None else item.data
    if source is None and storage.is_remote(item.name):  # an item built without ``fetch``
        source = storage.fetcher(item.name)()
    if source is None:
        source = storage.local_path(item.name)
    if processes is not None:
        return processes.decode(source, item.name)
    pixels = decode_function(decoding)(source, config, name=item.name, decoding=decoding,
                                       on_clipped=on_clipped)
    return pixels, time.perf_counter() - started


def decode_threads(num_threads: int | None) -> int:
    """The decode threads a feed of ``num_threads`` runs: None means one per CPU core."""
    return num_threads or os.cpu_count() or 1


@contextlib.contextmanager
def batches(items: Iterable[InputItem], config: PreprocessConfig, batch_size: int, *,
            num_threads: int | None = None, prefetch: int = DEFAULT_PREFETCH,
            decoding: ImageDecoding = ImageDecoding(),
            decode_processes: bool = False,
            pad_first: bool = False) -> Iterator[Iterator[Batch]]:
    """Decodes ``items`` on background threads into ``Batch``es of ``batch_size`` images.

    A batch holds ``batch_size`` decoded images plus the failed items among them, so failures
    never shrink what the device gets. The last batch may hold fewer; once a full batch has
    been yielded it is padded to ``batch_size`` rows, so a compiled program serves it (the
    first batch of a short input is left at its size: nothing is compiled yet). The first
    high-depth image that converting to RGB clips is logged as a warning, once per feed (a
    captioning run has one feed): ``preprocess.ClippingWarning``.

    Args:
      items: the inputs, in order; consumed lazily on the reader thread (so errors raised by
        the iterator, e.g. an unreadable path list, reach the consumer from ``next``).
      config: preprocessing of the checkpoint.
      batch_size: decoded images per batch.
      num_threads: decode threads; None means one per CPU core.
      prefetch: ready batches kept ahead of the consumer.
      decoding: how files become RGB images (EXIF orientation, fast JPEG decoding).
      decode_processes: each decode thread hands its images to a worker process
        (``decode_processes.py``): faster past ``decode_processes.THREADS_UP_TO`` threads
        (docs/performance.md, "Decode processes vs threads").
      pad_first: pad a short batch to ``batch_size`` rows even before a full one: a resumed
        run then runs the programs of the run it resumes (XLA compiles one per batch shape,
        and another shape may round the scores differently in their last digits).

    Yields:
      An iterator of Batches; leaving the context stops the threads (unread work is dropped).

    Raises:
      ValueError: ``batch_size``, ``num_threads`` or ``prefetch`` below 1, or
        ``decoding.device_resize`` for a ``config`` the device cannot reproduce.
    """
    for name, value in (("batch_size", batch_size), ("num_threads", num_threads),
                        ("prefetch", prefetch)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if decoding.device_resize and not resize.supported(config):
        raise ValueError(resize.unsupported_reason(config))
    if decoding.jpeg_decoder == "nvimagecodec":
        nvimagecodec.available()  # imported here, quietly, before any decode thread runs
    threads = decode_threads(num_threads)
    # Enough queued decodes to keep every thread busy through a whole batch.
    window = 2 * max(batch_size, threads)
    clipping = ClippingWarning()  # this feed's own: each run warns once
    with contextlib.ExitStack() as stack:
        processes = None
        if decode_processes:  # closed after the threads that use it have stopped
            processes = DecodeProcesses(threads, config, decoding, on_clipped=clipping)
            stack.callback(processes.close)
        # A thread per channel of the processes: each waits on its own image.
        executor = concurrent.futures.ThreadPoolExecutor(
            threads if processes is None else processes.channels, "flax-captioner-decode")
        stack.callback(executor.shutdown, cancel_futures=True)
        decode = functools.partial(_decode_timed, config=config, decoding=decoding,
                                   processes=processes, on_clipped=clipping)
        decoded = _decoded_in_order(items, executor, window, decode)
        yield stack.enter_context(_in_background(
            _group(decoded, config, batch_size, pad_first, decoding.device_resize), prefetch))


def _decode_timed(item: InputItem, encoded: bytes | None, *, config: PreprocessConfig,
                  decoding: ImageDecoding, processes: DecodeProcesses | None,
                  on_clipped: OnClipped) -> Decoded:
    started = time.perf_counter()
    try:
        pixels, seconds = decode_item(item, encoded, config, decoding=decoding,
                                      processes=processes, on_clipped=on_clipped)
        return pixels, None, seconds
    except ImageReadError as error:
        return None, error, time.perf_counter() - started


def _submit(executor: concurrent.futures.Executor, item: InputItem,
            decode: Callable[[InputItem, bytes | None], Decoded],
            prefetcher: storage.Prefetcher) -> concurrent.futures.Future:
    """Queues the decoding of ``item``; stream bytes are read here, in input order; remote
    objects are fetched on the prefetcher's I/O threads first."""
    if item.fetch is not None:
        return prefetcher.submit(
            item.fetch, item.size, executor,
            lambda encoded: decode(item, encoded),
            lambda error: (None, error, 0.0))
    encoded = None
    if item.read_bytes is not None:
        try:
            encoded = item.read_bytes()
        except ImageReadError as error:
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_result((None, error, 0.0))
            return failed
    return executor.submit(decode, item, encoded)


def _decoded_in_order(items: Iterable[InputItem], executor: concurrent.futures.Executor,
                      window: int, decode: Callable[[InputItem, bytes | None], Decoded]
                      ) -> Iterator[tuple[InputItem, Decoded]]:
    """(item, decode result) in input order, with at most ``window`` decodes in flight.

    An error raised by ``items``, or by reading a stream member (a StorageError), is re-raised
    after the items before it, so consumers still get (and write) everything that preceded it.
    """
    in_flight: collections.deque = collections.deque()
    iterator = iter(items)
    failure = None
    with storage.Prefetcher() as prefetcher:
        while failure is None:
            try:
                item = next(iterator)
                submitted = _submit(executor, item, decode, prefetcher)
            except StopIteration:
                break
            except Exception as error:  # re-raised below, in its place in the order
                failure = error
                break
            in_flight.append((item, submitted))
            if len(in_flight) >= window:
                item, future = in_flight.popleft()
                yield item, future.result()
        while in_flight:
            item, future = in_flight.popleft()
            yield item, future.result()
    if failure is not None:
        raise failure


def _group(decoded: Iterator[tuple[InputItem, Decoded]], config: PreprocessConfig,
           batch_size: int, pad_first: bool, on_device: bool) -> Iterator[Batch]:
    """Batches of ``batch_size`` decoded images (``batches``): float32 pixel values
    (``_PixelRows``), or, with ``on_device``, uint8 canvases (``_CanvasRows``)."""
    buffers = _BatchBuffers()
    rows_type = _CanvasRows if on_device else _PixelRows
    rows = rows_type(config, batch_size, buffers)
    items: list[InputItem] = []
    errors: list[ImageReadError | None] = []
    seconds = 0.0
    pad_short = pad_first  # pad a short batch: from the start, or once a full one went out

    def batch(pad: bool) -> Batch:
        if not rows.count:
            height, width = config.size
            return Batch(items, errors, np.zeros((0, 3, height, width), np.float32), 0, seconds)
        pixels, buffer = rows.finish(pad)
        return Batch(items, errors, pixels, rows.count, seconds,
                     functools.partial(buffers.give_back, buffer))

    try:
        for item, (item_pixels, error, item_seconds) in decoded:
            if item_pixels is not None:
                rows.add(item, item_pixels)
            items.append(item)
            errors.append(error)
            seconds += item_seconds
            if rows.count == batch_size:
                yield batch(pad=False)
                items, errors, seconds = [], [], 0.0
                rows = rows_type(config, batch_size, buffers)
                pad_short = True
    except Exception:  # the inputs failed: the items before the failure still go out
        if items:
            yield batch(pad=pad_short)
        raise
    if items:
        yield batch(pad=pad_short)


class _PixelRows:
    """One batch's float32[3, H, W] images, each copied into the batch array as it comes (so
    only the batch array holds them)."""

    def __init__(self, config: PreprocessConfig, batch_size: int, buffers: _BatchBuffers):
        self.batch_size, self.buffers = batch_size, buffers
        self.pixels: np.ndarray | None = None  # float32[batch_size, 3, H, W]
        self.count = 0

    def add(self, item: InputItem, image: np.ndarray) -> None:
        if self.pixels is None:
            self.pixels = self.buffers.take((self.batch_size, *image.shape))
        elif image.shape != self.pixels.shape[1:]:
            raise ValueError(
                f"{item.name}: pixels of shape {list(image.shape)}, but the batch's are "
                f"{list(self.pixels.shape[1:])} (do_resize is false, so the images of a batch "
                "must share one size)")
        self.pixels[self.count] = image
        self.count += 1

    def finish(self, pad: bool) -> tuple[np.ndarray, np.ndarray]:
        """(float32[P, 3, H, W], its buffer); padding rows copy a real image (see
        sharding.pad_to_multiple)."""
        if pad:
            self.pixels[self.count:] = self.pixels[0]
        return self.pixels[:self.batch_size if pad else self.count], self.pixels


class _CanvasRows:
    """One batch's uint8[h, w, 3] images, kept until the batch is whole: its canvas side is
    the smallest that holds the largest (``resize.canvas_side``)."""

    def __init__(self, config: PreprocessConfig, batch_size: int, buffers: _BatchBuffers):
        self.config, self.batch_size, self.buffers = config, batch_size, buffers
        self.images: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self.images)

    def add(self, item: InputItem, image: np.ndarray) -> None:
        self.images.append(image)

    def finish(self, pad: bool) -> tuple[resize.Canvases, np.ndarray]:
        """(``resize.Canvases`` of P images, their buffer); padding rows copy the first."""
        images = self.images + self.images[:1] * (self.batch_size - self.count if pad else 0)
        sizes = [image.shape[:2] for image in images]
        side = max(resize.canvas_side(*size) for size in sizes)
        canvases = self.buffers.take((len(images), side, side, 3), np.uint8)
        for canvas, image in zip(canvases, images):  # past each image: never read, not cleared
            canvas[:image.shape[0], :image.shape[1]] = image
        coefficients = resize.batch_coefficients(sizes, side, self.config)
        return resize.Canvases(canvases, coefficients, self.config), canvases


@contextlib.contextmanager
def _in_background(iterator: Iterator[Item], max_ready: int) -> Iterator[Iterator[Item]]:
    """Runs ``iterator`` on a thread, at most ``max_ready`` items ahead of the consumer.

    An exception raised by ``iterator`` is re-raised in the consumer, at the position where it
    happened.
    """
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

    thread = threading.Thread(target=produce, name="flax-captioner-read", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
