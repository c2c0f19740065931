"""Where bytes live: local paths and fsspec URLs (``s3://``, ``gs://``, ``hf://``,
``http(s)://``, ``memory://``, ``file://``) behind one small set of functions.

Credentials and endpoints come only from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``
and the like, the clouds' credential chains) plus the ``storage_options`` a caller passes;
nothing here handles credentials itself.

A missing or forbidden object raises one ``ImageReadError`` naming it (an error row). Any other
failure is the store's, not the image's (connection refused or reset, timeouts, throttling,
5xx): it is retried with exponential backoff for up to ``RETRY_SECONDS`` (the environment
variable ``FLAX_CAPTIONER_RETRY_SECONDS`` overrides it), then raises ``StorageError``, which
stops the run with its committed rows kept. ``ByteBudget`` bounds the bytes fetched but not yet
decoded, so memory does not grow with the size of the images read.
"""

from __future__ import annotations

import concurrent.futures
import errno
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from flax_captioner.errors import CaptionerError, DataError, ImageReadError, StorageError

logger = logging.getLogger(__name__)

StorageOptions = Mapping[str, Any]

# protocol -> the extra that installs its fsspec implementation.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf", "http": "http",
          "https": "http"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
# Failures no retry can fix: the object is absent, forbidden, or not an object.
# ValueError: a name that is not an object's (s3fs: "Attempt to open non key-like path", an
# invalid bucket name; aiohttp's InvalidURL) or a request refused as malformed (gcsfs: a 400
# "Bad Request ... invalid"). CaptionerError: a decision about the input (no such bucket, a
# missing column), not the store. TypeError is not here: no client raises one about an object,
# only about a response (gcsfs indexes a 5xx body that is JSON but not an object) or from a
# client bug, which as error rows would mark every image bad for good.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError, CaptionerError)
# ValueErrors that are a response the client could not decode: the store's failure, retried.
# gcsfs decodes a 5xx page as UTF-8 (json.loads for its message) before its own retries see
# it, so a load balancer's Latin-1 "503 Service Unavailable" page raises UnicodeDecodeError.
_UNDECODED_RESPONSE = (UnicodeDecodeError, json.JSONDecodeError)
# OSError numbers s3fs gives a request the store refused as malformed (its 4xx answers other
# than 403/404/409): the same request fails the same way however long it is retried.
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOSYS,
                               errno.EPERM})
# How long a failing store is retried before the run stops: outlasts a failover or a burst of
# throttling, yet a dead endpoint is reported within minutes. Counted from the first failure;
# the client's own retries inside the last try come on top (botocore's: about 10 s against a
# refused connection, more when requests time out).
RETRY_SECONDS = 120.0
RETRY_SECONDS_VARIABLE = "FLAX_CAPTIONER_RETRY_SECONDS"
_BACKOFF_SECONDS = 0.2
# The longest pause between two tries (before jitter): a store that is back is noticed
# within about this long.
_MAX_BACKOFF_SECONDS = 10.0
# Concurrent GETs: enough to hide an object store's latency behind a few cores' decoding.
FETCH_THREADS = 16
# Encoded bytes fetched but not yet decoded (a 64 MiB cap holds ~600 typical 100 kB JPEGs).
BYTES_IN_FLIGHT = 64 << 20
_BACKOFF_SECONDS = 0.2


def protocol(path: str) -> str | None:
    """The URL scheme of ``path`` (``"s3"``), None for a plain local path."""
    match = _URL.match(path)
    return match.group(1).lower() if match else None


def is_remote(path: str) -> bool:
    """True for a URL other than ``file://`` (which is read as a local path)."""
    return protocol(path) not in (None, "file", "local")


def local_path(path: str) -> str:
    """``path`` without a ``file://`` prefix."""
    return path[len("file://"):] if protocol(path) == "file" else path


def filesystem(url: str, storage_options: StorageOptions | None = None) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for ``url``; instances are cached by fsspec.

    Raises:
      DataError: the URL's protocol is unknown, or needs an extra that is not installed.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError:
        scheme = protocol(url)
        extra = EXTRAS.get(scheme)
        hint = (f"pip install 'flax-captioner[{extra}]'" if extra
                else "install the fsspec implementation for it")
        raise DataError(f"{url}: reading {scheme}:// URLs needs an extra package: {hint}") \
            from None
    except ValueError as error:  # fsspec: "Protocol not known"
        raise DataError(f"{url}: {error}") from None
    except TypeError as error:  # an option the file system does not take
        raise DataError(f"{url}: bad storage options: {error}") from None


def join(base: str, name: str) -> str:
    """``name`` relative to the directory ``base`` (a URL prefix or a local directory)."""
    if protocol(name) is not None or name.startswith("/"):
        return name
    return f"{base.rstrip('/')}/{name}" if base else name


def url_of(fs: Any, path: str) -> str:
    """The URL a row names for ``path`` of ``fs`` (``s3://bucket/key``)."""
    return fs.unstrip_protocol(path)


def describe(error: BaseException) -> str:
    """One line for an exception from a file system client (their messages span lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def retry_seconds() -> float:
    """How long a failing store is retried: ``$FLAX_CAPTIONER_RETRY_SECONDS``, else
    ``RETRY_SECONDS``.

    Raises:
      DataError: the variable is not a number of seconds >= 0.
    """
    value = os.environ.get(RETRY_SECONDS_VARIABLE)
    if value is None:
        return RETRY_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise DataError(f"{RETRY_SECONDS_VARIABLE}={value!r}: must be a number of seconds >= 0")
    return seconds


def _is_permanent(error: BaseException) -> bool:
    """Whether ``error`` is about the object itself (missing, forbidden, not an object, a
    malformed request), so retrying cannot help; else it is the store's (see ``retrying``)."""
    if isinstance(error, _UNDECODED_RESPONSE):
        return False
    return isinstance(error, _PERMANENT) or (isinstance(error, OSError)
                                             and error.errno in _PERMANENT_ERRNOS)


def retrying(action: Callable[[], Any], name: str, *,
             within: float | None = None) -> Any:
    """``action()``, retried with exponential backoff (and jitter) while it fails because of
    the store (connection refused or reset, timeouts, throttling, 5xx), for up to ``within``
    seconds from the first failure (None: ``retry_seconds()``). The first failure logs one
    line: ``name``, the cause and how long it will be retried.

    Raises:
      StorageError: naming ``name``: the store still failed at the end of the window.
      Exception: a failure about the object itself (missing, forbidden, not an object, a
        malformed request), at once, as ``action`` raised it.
    """
    deadline = window = None
    backoff = _BACKOFF_SECONDS
    while True:
        try:
            return action()
        except Exception as error:
            if _is_permanent(error):
                raise
            now = time.monotonic()
            if deadline is None:
                window = retry_seconds() if within is None else within
                deadline = now + window
                if window > 0:
                    logger.warning("%s: the store failed (%s); retrying for up to %g s",
                                   name, describe(error), window)
            if now >= deadline:
                raise StorageError(name, f"the store still failed after {window:g} s of "
                                         f"retries: {describe(error)}") from None
            time.sleep(min(backoff * (0.5 + random.random()), deadline - now))
            backoff = min(2 * backoff, _MAX_BACKOFF_SECONDS)


def with_retries(action: Callable[[], Any], name: str, *, within: float | None = None) -> Any:
    """``action()`` through ``retrying``, its permanent failures as ImageReadError.

    Raises:
      ImageReadError: naming ``name``: the object is missing, forbidden or not an object.
      StorageError: naming ``name``: the store kept failing (see ``retrying``).
    """
    try:
        return retrying(action, name, within=within)
    except CaptionerError:  # StorageError, or a bad retry window: not this object's fault
        raise
    except Exception as error:  # permanent (``retrying`` raised it at once)
        raise ImageReadError(name, _reason(error)) from None


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such object"
    if isinstance(error, PermissionError):
        return f"access denied: {describe(error)}"
    return f"cannot read the object: {describe(error)}"


def read_object(fs: Any, path: str, name: str) -> bytes:
    """All bytes of ``path`` on ``fs``, through ``with_retries``; errors name ``name``."""
    return with_retries(lambda: fs.cat_file(path), name)


def fetcher(url: str, storage_options: StorageOptions | None = None) -> Callable[[], bytes]:
    """A function reading all of ``url`` (see ``read_object``); a URL whose file system
    cannot be opened gives a function raising ImageReadError, so it becomes an error row.
    A store that keeps failing raises StorageError, which stops the run."""
    try:
        fs, path = filesystem(url, storage_options)
    except DataError as error:
        reason = str(error).removeprefix(f"{url}: ")

        def fail() -> bytes:
            raise ImageReadError(url, reason)

        return fail
    return lambda: read_object(fs, path, url)


class ByteBudget:
    """Bytes fetched but not yet decoded, at most ``limit`` (one object alone may exceed it,
    so an image larger than the budget still goes through, by itself)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._changed = threading.Condition()

    def acquire(self, size: int) -> None:
        """Blocks until ``size`` more bytes fit, then counts them."""
        with self._changed:
            self._changed.wait_for(lambda: self.in_use == 0 or self.in_use + size <= self.limit)
            self.in_use += size

    def add(self, size: int) -> None:
        """Counts ``size`` bytes at once (an object larger than its reservation)."""
        with self._changed:
            self.in_use += size

    def release(self, size: int) -> None:
        with self._changed:
            self.in_use -= size
            self._changed.notify_all()


class Prefetcher:
    """Fetches remote objects on I/O threads, ahead of decoding, within a ``ByteBudget``.

    Object stores answer a GET in tens of milliseconds whatever the object's size, so reads
    overlap on more threads than there are cores; the budget, not the thread count, bounds the
    memory they hold. Threads start on first use (local inputs never start any).
    """

    def __init__(self, threads: int = FETCH_THREADS, bytes_in_flight: int = BYTES_IN_FLIGHT):
        self.threads = threads
        self.budget = ByteBudget(bytes_in_flight)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, fetch: Callable[[], bytes], size: int | None,
               executor: concurrent.futures.Executor, decode: Callable[[bytes], Any],
               failed: Callable[[ImageReadError], Any]) -> concurrent.futures.Future:
        """A future of ``decode(fetch())`` (run on ``executor``), or of ``failed(error)`` when
        the fetch raises ImageReadError (an error row); any other exception of the fetch
        (StorageError) is the future's, so the run stops. The fetched bytes count against the
        budget until ``decode`` returns."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads,
                                                               "flax-captioner-fetch")
        result: concurrent.futures.Future = concurrent.futures.Future()

        def read() -> tuple[bytes, int]:
            reserved = size or 0
            self.budget.acquire(reserved)
            try:
                data = fetch()
            except BaseException:
                self.budget.release(reserved)
                raise
            self.budget.add(max(0, len(data) - reserved))
            return data, max(reserved, len(data))

        def decode_held(data: bytes, held: int) -> Any:
            try:
                return decode(data)
            finally:
                self.budget.release(held)

        def fetched(reading: concurrent.futures.Future) -> None:
            try:
                data, held = reading.result()
            except ImageReadError as error:
                result.set_result(failed(error))
                return
            except BaseException as error:  # StorageError, or cancelled: the consumer left
                result.set_exception(error)
                return
            try:
                decoding = executor.submit(decode_held, data, held)
            except RuntimeError as error:  # the decode pool has shut down: the consumer left
                self.budget.release(held)
                result.set_exception(error)
                return
            decoding.add_done_callback(lambda done: _copy_outcome(done, result))

        self._pool.submit(read).add_done_callback(fetched)
        return result


def _copy_outcome(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def open_stream(fs: Any, path: str, name: str, *, block_size: int = 8 << 20) -> IO[bytes]:
    """A sequential reader of a remote object (a tar shard): in memory when it fits in one
    block (one GET, and no input wait per member; docs/results/history.md, "Object-store
    input"), else a ``BlockReader``.

    Raises:
      OSError: naming the cause (FileNotFoundError for a missing object).
      StorageError: the store kept failing (``retrying``); so does reading the stream.
    """
    try:
        size = with_retries(lambda: fs.size(path), name)
        if size <= block_size:
            return io.BytesIO(read_object(fs, path, name))
    except ImageReadError as error:
        raise (FileNotFoundError if error.reason == "no such object" else OSError)(
            error.reason) from None
    return BlockReader.open(fs, path, name, size=size, block_size=block_size)


class BlockReader(io.RawIOBase):
    """A seekable read-only file over a remote object that fetches the next ``ahead`` blocks
    on background threads while the current one is read, so a stream consumer (a tar shard
    read member by member) does not wait on a request at every block boundary or at the
    start of the next shard. Holds at most ``ahead + 1`` blocks.

    Opening starts fetching the first blocks at once (``size`` unknown: one HEAD first).
    A missing or forbidden object surfaces as OSError; a store that keeps failing as
    StorageError naming ``name``, once ``retrying`` gives up.
    """

    def __init__(self, fs: Any, path: str, name: str, *, size: int | None = None,
                 block_size: int = 8 << 20, ahead: int = 2):
        super().__init__()
        self.name = name
        self._fs, self._path = fs, path
        self._block_size, self._ahead = block_size, ahead
        self._pool = concurrent.futures.ThreadPoolExecutor(ahead + 1, "flax-captioner-block")
        self._size: concurrent.futures.Future = concurrent.futures.Future()
        if size is None:
            self._size = self._pool.submit(
                lambda: with_retries(lambda: fs.size(path), name))
        else:
            self._size.set_result(size)
        self._blocks: dict[int, concurrent.futures.Future] = {}
        self._position = 0
        self._schedule(0)

    @property
    def size(self) -> int:
        try:
            return self._size.result()
        except ImageReadError as error:
            raise self._os_error(error) from None

    @classmethod
    def open(cls, fs: Any, path: str, name: str, **kwargs: Any) -> io.BufferedReader:
        """A ``BlockReader`` behind a 1 MiB ``io.BufferedReader``: tar headers are read 512
        bytes at a time, and the C buffer serves those reads without a Python call each
        (docs/results/history.md, "Object-store input")."""
        return io.BufferedReader(cls(fs, path, name, **kwargs), buffer_size=1 << 20)

    def _os_error(self, error: ImageReadError) -> OSError:
        kind = FileNotFoundError if error.reason == "no such object" else OSError
        return kind(error.reason)

    def _fetch(self, index: int) -> bytes:
        start = index * self._block_size
        end = min(start + self._block_size, self._size.result())
        if start >= end:
            return b""
        return with_retries(lambda: self._fs.cat_file(self._path, start=start, end=end),
                            self.name)

    def _schedule(self, index: int) -> None:
        for stale in [block for block in self._blocks if block < index]:
            self._blocks.pop(stale).cancel()
        for block in range(index, index + self._ahead + 1):
            if block not in self._blocks:
                self._blocks[block] = self._pool.submit(self._fetch, block)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done, size = 0, self.size
        while done < len(view) and self._position < size:
            index, offset = divmod(self._position, self._block_size)
            self._schedule(index)
            try:
                block = self._blocks[index].result()
            except ImageReadError as error:
                raise self._os_error(error) from None
            count = min(len(view) - done, len(block) - offset)
            view[done:done + count] = block[offset:offset + count]
            done += count
            self._position += count
        return done

    def close(self) -> None:
        if not self.closed:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._blocks.clear()
        super().close()
