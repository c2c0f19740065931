"""Pipeline inputs: image files, directories, globs, path lists, WebDataset tar shards (files,
brace patterns, ``pipe:`` commands) and Parquet/Arrow tables of encoded images, on local disk
or behind any fsspec URL, streamed as ``InputItem``s in a deterministic order (``feed``
decodes them).

Nothing here holds more than one tar member's bytes, or one table batch, at a time: inputs are
listed lazily, so memory does not grow with the number of images.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import glob
import io
import itertools
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flax_captioner import storage
from flax_captioner.errors import (CaptionerError, DataError, ImageReadError, OptionError,
                                   StorageError)
from flax_captioner.preprocess import short_reason
from flax_captioner.storage import StorageOptions

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"})
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".lst"})
TAR_EXTENSIONS = frozenset({".tar"})
TABLE_EXTENSIONS = frozenset({".parquet", ".pq", ".arrow"})
# Header names (lower case) of the CSV column holding image paths; otherwise column 0.
CSV_PATH_COLUMNS = ("image", "path", "filepath", "file_path", "image_path", "filename", "file")
# Table columns tried, in order, for the encoded image (img2dataset writes ``jpg``; Hugging Face
# datasets an ``image`` struct {bytes, path}) and for the row name (img2dataset's ``key``).
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
ID_COLUMNS = ("key", "__key__", "id", "image_id", "file_name", "filename")
PIPE_PREFIX = "pipe:"
_TAR_BLOCK = 512
# Remote tar shards are read in large ranged requests: one request per 8 MiB, not per member.
_REMOTE_BLOCK_SIZE = 8 << 20
_TABLE_BATCH_ROWS = 64
# Bytes of a failed ``pipe:`` command's stderr read back for its error row (its last lines).
_STDERR_TAIL = 2000
_BRACE_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image to caption (or to train on).

    Attributes:
      index: position in the whole input order, 0-based; the same on every run and process.
      name: the name written in output rows and error messages: the path or URL of an image
        file (list entries joined to the list's directory), ``shard.tar/member`` for a tar
        member, the sample key for a ``pipe:`` stream member, a table's id column (else
        ``table.parquet#row``), the shard's or table's own name for a row reporting damage, or
        a caller's name for an in-memory image.
      read_bytes: for members of a stream (tar), returns the encoded image (raises
        ``ImageReadError``); the feed calls it in input order on its reader thread, before the
        stream moves on and closes the member.
      data: an in-memory image (encoded bytes or a PIL image) to decode instead of a file.
      fetch: for a remote object, returns its bytes (retrying transient errors; raises
        ``ImageReadError``); the feed calls it on its I/O threads, ahead of decoding, within a
        budget of bytes in flight.
      size: the object's size in bytes when a listing told it (reserves the budget up front).
      When all of read_bytes, data and fetch are None the decoder opens ``name`` as a path.
    """

    index: int
    name: str
    read_bytes: Callable[[], bytes] | None = None
    data: bytes | Image.Image | None = None
    fetch: Callable[[], bytes] | None = None
    size: int | None = None


def _extension(name: str) -> str:
    return os.path.splitext(name.rstrip("/"))[1].lower()


def expand_braces(spec: str) -> list[str]:
    """WebDataset/bash brace patterns: ``shard-{0000..0099}.tar`` (zero padding kept),
    ``{a,b}``, several groups (``{00..03}-{0..9}``) expanded left to right."""
    match = _BRACE_RANGE.search(spec) or _BRACE_GROUP.search(spec)
    if match is None or (match.re is _BRACE_GROUP and "," not in match.group(1)):
        return [spec]
    first_range = _BRACE_RANGE.search(spec)
    first_group = _BRACE_GROUP.search(spec)
    if first_range and (first_group is None or first_range.start() <= first_group.start()):
        match = first_range
        low, high = match.group(1), match.group(2)
        width = len(low) if low.lstrip("-").startswith("0") or len(low) == len(high) else 0
        step = 1 if int(high) >= int(low) else -1
        options = [f"{number:0{width}d}" for number in range(int(low), int(high) + step, step)]
    else:
        match = first_group
        options = match.group(1).split(",")
    prefix, suffix = spec[:match.start()], spec[match.end():]
    return [expanded for option in options for expanded in expand_braces(prefix + option + suffix)]


def _specs(spec: str) -> list[str]:
    """``spec`` with its brace patterns expanded (unless a local file has that very name)."""
    if not storage.is_remote(spec) and os.path.exists(storage.local_path(spec)):
        return [spec]
    return expand_braces(spec)


@dataclasses.dataclass(frozen=True)
class CheckedInputs:
    """Inputs that passed ``check_inputs``, with what it listed kept for ``iter_inputs``: a
    glob over a bucket is one full listing of its prefix, and checking 10,000 brace-expanded
    shards is 10,000 requests, so neither should happen twice in a run.

    Attributes:
      names: the inputs as given (for messages).
      specs: each input with its brace patterns expanded, in order.
      matches: per spec, a glob's sorted matches (local paths, or paths on the spec's file
        system); None for a spec that is not a glob.
    """

    names: tuple[str, ...]
    specs: tuple[str, ...]
    matches: tuple[tuple[str, ...] | None, ...]


Inputs = Sequence[str] | CheckedInputs
# Specs are checked this many at a time: a remote one costs a request's round trip
# (docs/results/history.md, "Object-store input").
_CHECK_THREADS = 16


def check_inputs(inputs: Inputs, storage_options: StorageOptions | None = None, *,
                 image_column: str | None = None,
                 id_column: str | None = None) -> CheckedInputs:
    """Fails fast, before any work, on inputs that would make the whole run pointless.

    A glob matching nothing, a path list, tar shard or table that does not exist, a missing
    directory (a path ending in a separator), a table without the image column, a directory
    without image files, a URL whose bucket is missing
    or refuses the credentials, or whose protocol needs an extra that is not installed,
    raises. A missing image file does not: it becomes an error row, like a missing list entry.
    Specs are checked ``_CHECK_THREADS`` at a time; of their failures, the first in input
    order is raised (after any URL whose protocol lacks its extra). ``CheckedInputs`` come
    back as they are.

    Returns:
      CheckedInputs: pass them on to ``iter_inputs`` (or ``run_pipeline``), which then lists
      no glob again.

    Raises:
      DataError: naming the input and the cause.
    """
    if isinstance(inputs, CheckedInputs):
        return inputs
    if not inputs:
        raise DataError("no inputs given")
    specs = tuple(expanded for spec in inputs for expanded in _specs(spec))

    def check_of(spec: str) -> Callable[[], tuple[str, ...] | None]:
        if spec.startswith(PIPE_PREFIX):
            return lambda: None
        if storage.is_remote(spec):
            # Made in this thread: fsspec caches an instance per thread, and each checking
            # thread would otherwise open a client of its own (session, credentials).
            fs, path = storage.filesystem(spec, storage_options)
            return functools.partial(_check_remote, spec, fs, path, image_column, id_column)
        return functools.partial(_check_local, spec, image_column, id_column)

    checks = [check_of(spec) for spec in specs]
    pool = concurrent.futures.ThreadPoolExecutor(min(_CHECK_THREADS, len(specs)),
                                                 "flax-captioner-check")
    try:
        matches = tuple(pool.map(lambda check: check(), checks))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return CheckedInputs(tuple(inputs), specs, matches)


def _check_local(spec: str, image_column: str | None,
                 id_column: str | None) -> tuple[str, ...] | None:
    """Checks one local spec (``check_inputs``); returns a glob's sorted matches."""
    spec = storage.local_path(spec)
    if os.path.isdir(spec):
        if next(_walk_images(spec), None) is None:
            raise DataError(f"{spec}: no image files in this directory (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        return None
    if os.path.exists(spec):
        if _extension(spec) in TABLE_EXTENSIONS:
            with _open_local(spec) as handle:
                _table_columns(spec, _table_schema(spec, handle), image_column, id_column)
        return None
    if glob.has_magic(spec):
        return _sorted_matches(spec, glob.glob(spec, recursive=True), "files")
    if spec.endswith(("/", os.sep)):  # meant as a directory: no rows to report it in
        raise DataError(f"{spec}: no such directory")
    if _extension(spec) in LIST_EXTENSIONS | TAR_EXTENSIONS | TABLE_EXTENSIONS:
        raise DataError(f"{spec}: no such file")
    return None


def _check_remote(spec: str, fs: Any, path: str, image_column: str | None,
                  id_column: str | None) -> tuple[str, ...] | None:
    """Checks the URL ``spec`` (``path`` on ``fs``) for ``check_inputs``, retried while the
    store fails (``storage.retrying``); returns a glob's sorted matches."""
    try:
        return storage.retrying(lambda: _check_remote_once(spec, fs, path, image_column,
                                                           id_column), spec)
    except (DataError, OptionError, StorageError):
        raise
    except PermissionError as error:  # credentials refused or missing
        raise DataError(f"{spec}: access denied: {storage.describe(error)}") from None
    except Exception as error:  # a request the store refused as malformed, ...
        raise DataError(f"{spec}: cannot access: {storage.describe(error)}") from None


def _check_remote_once(spec: str, fs: Any, path: str, image_column: str | None,
                       id_column: str | None) -> tuple[str, ...] | None:
    if glob.has_magic(path):
        return _sorted_matches(spec, fs.glob(path), "objects")
    if fs.exists(path):
        if _extension(path) in TABLE_EXTENSIONS:
            with fs.open(path, "rb") as handle:
                _table_columns(spec, _table_schema(spec, handle), image_column, id_column)
        return None
    root = path.strip("/").split("/", 1)[0]
    if root and storage.protocol(spec) in ("s3", "s3a", "gs", "gcs") and not fs.exists(root):
        raise DataError(f"{spec}: bucket {root} does not exist")
    if _extension(path) in LIST_EXTENSIONS | TAR_EXTENSIONS | TABLE_EXTENSIONS or \
            spec.endswith("/"):
        raise DataError(f"{spec}: no such object")
    return None


def _sorted_matches(spec: str, matches: Iterable[str], kind: str) -> tuple[str, ...]:
    """A glob's ``matches`` sorted; a DataError naming ``spec`` when there are none."""
    found = tuple(sorted(matches))
    if not found:
        raise DataError(f"{spec}: no {kind} match this pattern")
    return found


def iter_inputs(inputs: Inputs, storage_options: StorageOptions | None = None, *,
                image_column: str | None = None,
                id_column: str | None = None) -> Iterator[InputItem]:
    """Every image named by ``inputs``, in order, each with its global index. ``CheckedInputs``
    (``check_inputs``) start from its listings: no glob is listed again.

    Each input is a local path or an fsspec URL (``s3://``, ``gs://``, ``hf://``,
    ``http(s)://``, ``memory://``, ``file://``; ``storage_options`` go to its file system), with
    brace patterns expanded first (``shard-{0000..0099}.tar``):

    - a directory or URL prefix (``s3://bucket/photos/``): its image files (by extension),
      recursively, sorted by path;
    - a glob (``*``, ``?``, ``[]``, ``**``): its matches sorted, each expanded as here;
    - ``.txt`` / ``.lst``: one path or URL per line (blank lines and ``#`` comments skipped);
      ``.csv``: the column headed image/path/filepath/filename/file, else the first column;
      relative entries are relative to the list's directory;
    - ``.tar``: a WebDataset shard as img2dataset writes it (``key.jpg`` next to optional
      ``key.txt`` / ``key.json``); its image members in archive order;
    - ``pipe:COMMAND``: a tar stream on the command's stdout (WebDataset's convention, e.g.
      ``pipe:curl -s https://host/shard-0001.tar``); rows are named by sample key;
    - ``.parquet`` / ``.arrow``: a table with encoded images in ``image_column`` (binary, or a
      Hugging Face image struct {bytes, path}; detected when None) and row names in
      ``id_column`` (detected: key, id, ...; else the struct's path, else ``table#row``);
    - anything else: an image file (a missing or unreadable one becomes an error row).

    Raises:
      DataError: a glob matches nothing, a path list or table cannot be read, a table has
        no image column, or a URL needs an extra that is not installed.
    """
    counter = itertools.count()
    if isinstance(inputs, CheckedInputs):
        specs, matches = inputs.specs, inputs.matches
    else:  # globs are listed when reached
        specs = tuple(expanded for spec in inputs for expanded in _specs(spec))
        matches = (None,) * len(specs)
    # A remote shard is opened (and, when small, downloaded) in the background while the one
    # before it is read, so the reader does not wait a round trip at every shard boundary.
    opener = concurrent.futures.ThreadPoolExecutor(1, "flax-captioner-open")
    early: dict[int, concurrent.futures.Future] = {}
    try:
        for position, spec in enumerate(specs):
            if position + 1 < len(specs) and _is_remote_tar(specs[position + 1]):
                early[position + 1] = opener.submit(_open_remote_tar, specs[position + 1],
                                                    storage_options)
            for item in _expand_spec(spec, storage_options, image_column, id_column,
                                     matches[position], early.pop(position, None)):
                yield _utf8_named(dataclasses.replace(item, index=next(counter)))
    finally:
        opener.shutdown(wait=False, cancel_futures=True)
        for pending in early.values():
            pending.add_done_callback(_close_opened)


def _utf8_named(item: InputItem) -> InputItem:
    """``item``, or an error item in its place when its name is not valid UTF-8.

    Python hands undecodable bytes of file names (directory listings, path lists, tar members)
    over as lone surrogates, which no output row can hold: the item is named with those bytes
    backslash-escaped (``bad-\\xff.png``), the same name on every run, so a resume still
    matches it.
    """
    try:
        item.name.encode("utf-8")
    except UnicodeEncodeError:
        name = item.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return InputItem(item.index, name,
                         read_bytes=_failing_reader(name, "file name is not valid UTF-8"))
    return item


def _close_opened(opened: concurrent.futures.Future) -> None:
    if not opened.cancelled() and opened.exception() is None:
        opened.result().close()


def _is_remote_tar(spec: str) -> bool:
    return (storage.is_remote(spec) and not glob.has_magic(spec)
            and _extension(spec) in TAR_EXTENSIONS)


def _open_remote_tar(url: str, storage_options: StorageOptions | None) -> IO[bytes]:
    fs, path = storage.filesystem(url, storage_options)
    return storage.open_stream(fs, path, url, block_size=_REMOTE_BLOCK_SIZE)


def _expand_spec(spec: str, storage_options: StorageOptions | None, image_column: str | None,
                 id_column: str | None, matches: tuple[str, ...] | None,
                 opened: concurrent.futures.Future | None) -> Iterator[InputItem]:
    """The items of one spec; ``matches``: a glob's listing from ``check_inputs``, if any."""
    if spec.startswith(PIPE_PREFIX):
        yield from _pipe_members(spec)
        return
    if opened is not None:
        yield from _tar_members(spec, opened.result)
        return
    if storage.is_remote(spec):
        yield from _expand_remote(spec, storage_options, image_column, id_column, matches)
        return
    spec = storage.local_path(spec)
    if matches is None and not os.path.exists(spec) and glob.has_magic(spec):
        matches = _sorted_matches(spec, glob.glob(spec, recursive=True), "files")
    for path in matches or (spec,):
        yield from _expand_path(path, storage_options, image_column, id_column)


def _expand_path(path: str, storage_options: StorageOptions | None, image_column: str | None,
                 id_column: str | None) -> Iterator[InputItem]:
    extension = _extension(path)
    if os.path.isdir(path):
        yield from (_file_item(image, None) for image in _walk_images(path))
    elif extension in TAR_EXTENSIONS:
        yield from _tar_members(path, lambda: _open_local(path))
    elif extension in LIST_EXTENSIONS:
        yield from _list_items(path, lambda: _open_local(path), os.path.dirname(path),
                               storage_options)
    elif extension in TABLE_EXTENSIONS:
        yield from _table_rows(path, lambda: _open_local(path), os.path.dirname(path),
                               storage_options, image_column, id_column)
    else:
        yield _file_item(path, None)


def _expand_remote(spec: str, storage_options: StorageOptions | None, image_column: str | None,
                   id_column: str | None, matches: tuple[str, ...] | None) -> Iterator[InputItem]:
    fs, path = storage.filesystem(spec, storage_options)
    if matches is None and glob.has_magic(path):
        matches = _sorted_matches(spec, _remote_call(spec, fs.glob, path), "objects")
    if matches is None:
        yield from _expand_remote_path(fs, path, spec, storage_options, image_column, id_column)
        return
    for match in matches:
        yield from _expand_remote_path(fs, match, storage.url_of(fs, match), storage_options,
                                       image_column, id_column)


def _expand_remote_path(fs: Any, path: str, url: str, storage_options: StorageOptions | None,
                        image_column: str | None, id_column: str | None) -> Iterator[InputItem]:
    extension = _extension(path)
    base = url.rsplit("/", 1)[0]

    def open_remote() -> IO[bytes]:
        return fs.open(path, "rb", block_size=_REMOTE_BLOCK_SIZE, cache_type="readahead")

    if extension in TAR_EXTENSIONS:
        yield from _tar_members(url, lambda: storage.open_stream(
            fs, path, url, block_size=_REMOTE_BLOCK_SIZE))
    elif extension in LIST_EXTENSIONS:
        yield from _list_items(url, open_remote, base, storage_options)
    elif extension in TABLE_EXTENSIONS:
        yield from _table_rows(url, open_remote, base, storage_options, image_column, id_column)
    elif extension in IMAGE_EXTENSIONS:
        yield InputItem(-1, url, fetch=lambda: storage.read_object(fs, path, url))
    else:  # a prefix ("directory"): its image objects, sorted
        listing = _remote_call(url, fs.find, path, detail=True)
        root = path.rstrip("/")
        for found in sorted(listing):
            if _extension(found) in IMAGE_EXTENSIONS:
                name = url.rstrip("/") + found[len(root):] if found.startswith(root) else \
                    storage.url_of(fs, found)
                yield InputItem(-1, name, size=listing[found].get("size"),
                                fetch=_object_reader(fs, found, name))


def _object_reader(fs: Any, path: str, name: str) -> Callable[[], bytes]:
    return lambda: storage.read_object(fs, path, name)


def _remote_call(spec: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A listing call on a file system, retried while the store fails (then StorageError);
    a failure about the listing itself is one DataError naming ``spec``."""
    try:
        return storage.retrying(lambda: function(*args, **kwargs), spec)
    except CaptionerError:  # StorageError: the store kept failing
        raise
    except Exception as error:
        raise DataError(f"{spec}: cannot list: {storage.describe(error)}") from None


def _file_item(name: str, storage_options: StorageOptions | None) -> InputItem:
    """An item for the image file or object ``name``."""
    if storage.is_remote(name):
        return InputItem(-1, name, fetch=storage.fetcher(name, storage_options))
    return InputItem(-1, name)


def _open_local(path: str) -> IO[bytes]:
    return open(path, "rb")


def _walk_images(directory: str) -> Iterator[str]:
    """Image files under ``directory``, depth first, each directory's entries sorted."""
    for root, subdirectories, files in os.walk(directory):
        subdirectories.sort()
        for name in sorted(files):
            if _extension(name) in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def _list_items(name: str, open_list: Callable[[], IO[bytes]], base: str,
                storage_options: StorageOptions | None) -> Iterator[InputItem]:
    """Items for the entries of a path list, streamed; a failed read is one DataError."""
    try:
        with open_list() as handle:
            for entry in _list_entries(name, handle, base):
                yield _file_item(entry, storage_options)
    except (OSError, csv.Error) as error:
        raise DataError(f"{name}: cannot read the path list: "
                        f"{storage.describe(error)}") from None


def _list_entries(list_name: str, handle: IO[bytes], base: str) -> Iterator[str]:
    """The image paths a .txt/.lst/.csv list names, relative ones joined to ``base``.

    A byte-order mark (Windows editors write one) is dropped; bytes that are not UTF-8 stay in
    their entry as surrogates, as in a directory listing (``iter_inputs`` makes that entry an
    error row).
    """
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    if _extension(list_name) == ".csv":
        entries = _csv_paths(csv.reader(text))
    else:
        entries = (line.strip() for line in text)
        entries = (line for line in entries if line and not line.startswith("#"))
    for entry in entries:
        if storage.protocol(entry) is None:
            entry = os.path.expanduser(entry)
            yield os.path.join(base, entry) if storage.protocol(base) is None else \
                storage.join(base, entry)
        else:
            yield entry


def _csv_paths(rows: Iterator[list[str]]) -> Iterator[str]:
    first = next(rows, None)
    if first is None:
        return
    header = [cell.strip().lower() for cell in first]
    column = next((header.index(name) for name in CSV_PATH_COLUMNS if name in header), None)
    if column is None:
        column = 0
        rows = itertools.chain([first], rows)
    for row in rows:
        if len(row) > column and row[column].strip():
            yield row[column].strip()


def _failing_reader(name: str, reason: str) -> Callable[[], bytes]:
    def read_bytes() -> bytes:
        raise ImageReadError(name, reason)

    return read_bytes


def _member_reader(archive: tarfile.TarFile, member: tarfile.TarInfo,
                   name: str) -> Callable[[], bytes]:
    def read_bytes() -> bytes:
        try:
            handle = archive.extractfile(member)
            if handle is None:
                raise ImageReadError(name, "not a regular file")
            return handle.read()
        except (tarfile.TarError, OSError, ValueError) as error:
            # ValueError: the archive was closed because the stream moved past this shard.
            raise ImageReadError(name, f"cannot read the tar member: {error}") from None
        except (ImageReadError, StorageError):  # StorageError: the run stops, no error row
            raise
        except Exception as error:  # a remote read that failed mid-shard
            raise ImageReadError(name, f"cannot read the tar member: "
                                       f"{storage.describe(error)}") from None

    return read_bytes


def _tar_members(name: str, open_shard: Callable[[], IO[bytes]]) -> Iterator[InputItem]:
    """Image members of a tar shard in archive order; a damaged shard adds one error item.

    tarfile ends iteration silently at a corrupt header past the first member, so the bytes
    after the last member are checked: anything but end-of-archive zeros means a damaged tar.
    """
    try:
        handle = open_shard()
        archive = tarfile.open(fileobj=handle, mode="r:")
    except (tarfile.TarError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            reason = "no such file" if storage.protocol(name) is None else "no such object"
        else:
            reason = f"not a readable tar archive: {storage.describe(error)}"
        yield InputItem(-1, name, read_bytes=_failing_reader(name, reason))
        return
    with handle, archive:
        try:
            for member in archive:
                if member.isfile() and _extension(member.name) in IMAGE_EXTENSIONS:
                    member_name = f"{name}/{member.name}"
                    yield InputItem(-1, member_name,
                                    read_bytes=_member_reader(archive, member, member_name))
        except (tarfile.TarError, OSError) as error:
            yield InputItem(-1, name, read_bytes=_failing_reader(
                name, f"tar ends early or is corrupt at byte {archive.offset} ({error}); "
                      "the rest of the shard is skipped"))
            return
        damage = _tail_damage(handle, archive.offset)
        if damage:
            yield InputItem(-1, name, read_bytes=_failing_reader(name, damage))


def _tail_damage(handle: IO[bytes], offset: int) -> str | None:
    """Why the bytes from ``offset`` (where tarfile stopped) are not a clean archive end."""
    size = handle.seek(0, os.SEEK_END)
    if offset > size:
        return None  # a truncated last member; its own read reports it
    handle.seek(offset)
    tail = handle.read(2 * _TAR_BLOCK)
    if tail.strip(b"\0"):
        return (f"invalid tar header at byte {offset} of {size}; "
                "the rest of the shard is skipped")
    if len(tail) < 2 * _TAR_BLOCK:
        return f"tar ends at byte {size} without an end-of-archive marker (truncated?)"
    return None


def sample_key(member_name: str) -> str:
    """WebDataset's key of a tar member: its path up to the first dot of the file name
    (``dir/000123.jpg`` -> ``dir/000123``)."""
    directory, _, file_name = member_name.rpartition("/")
    key = file_name.split(".", 1)[0]
    return f"{directory}/{key}" if directory else key


def _pipe_members(spec: str) -> Iterator[InputItem]:
    """Image members of the tar stream a ``pipe:COMMAND`` writes to stdout, named by sample
    key; a failing command or a damaged stream adds one error item named ``spec``."""
    command = spec[len(PIPE_PREFIX):]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
        try:
            yield from _stream_members(spec, process.stdout)
            process.stdout.close()
            status = process.wait()
        finally:
            if process.poll() is None:  # the consumer stopped early
                process.kill()
                process.wait()
        if status != 0:
            errors.seek(max(0, errors.seek(0, os.SEEK_END) - _STDERR_TAIL))
            said = errors.read().decode("utf-8", "replace").strip()
            ended = f"was killed by signal {-status}" if status < 0 else \
                f"exited with status {status}"
            reason = f"the command {ended}" + (f": {short_reason(said, tail=True)}"
                                               if said else " (it wrote nothing on stderr)")
            yield InputItem(-1, spec, read_bytes=_failing_reader(spec, reason))


def _stream_members(spec: str, stream: IO[bytes]) -> Iterator[InputItem]:
    try:
        archive = tarfile.open(fileobj=stream, mode="r|")
        for member in archive:
            if member.isfile() and _extension(member.name) in IMAGE_EXTENSIONS:
                key = sample_key(member.name)
                yield InputItem(-1, key, read_bytes=_member_reader(archive, member, key))
    except tarfile.ReadError as error:
        if "empty file" in str(error):
            return  # nothing on stdout: the exit status tells why
        yield InputItem(-1, spec, read_bytes=_failing_reader(
            spec, f"the tar stream ends early or is corrupt ({error})"))
    except (tarfile.TarError, OSError) as error:
        yield InputItem(-1, spec, read_bytes=_failing_reader(
            spec, f"the tar stream ends early or is corrupt ({error})"))


def _table_schema(name: str, handle: IO[bytes]) -> pa.Schema:
    return _opened_table(name, handle)[0]


# A stretch of a table read in one go: its row count when the file's metadata tells it (a
# Parquet row group), else None (the rest of an Arrow table); and its record batches.
_TablePart = tuple[int | None, Iterator[pa.RecordBatch]]


def _opened_table(name: str, handle: IO[bytes]) -> tuple[pa.Schema, Callable[
        [list[str]], Iterator[_TablePart]]]:
    try:
        return _open_table(handle)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{name}: not a readable Parquet or Arrow table: "
                        f"{storage.describe(error)}") from None


def _open_table(handle: IO[bytes]) -> tuple[pa.Schema, Callable[[list[str]], Iterator[
        _TablePart]]]:
    """(schema, columns -> the table's parts) of a Parquet file (a part per row group, read
    apart so that a damaged one costs only its own rows), an Arrow IPC file, or an Arrow IPC
    stream (what ``datasets`` writes; one part each)."""
    magic = handle.read(6)
    handle.seek(0)
    if magic[:4] == b"PAR1":
        parquet = pq.ParquetFile(handle)
        return parquet.schema_arrow, lambda columns: (
            (parquet.metadata.row_group(group).num_rows,
             parquet.iter_batches(batch_size=_TABLE_BATCH_ROWS, row_groups=[group],
                                  columns=columns))
            for group in range(parquet.num_row_groups))
    if magic == b"ARROW1":
        reader = pa.ipc.open_file(handle)
        return reader.schema, lambda columns: iter([(None, (
            reader.get_batch(index).select(columns)
            for index in range(reader.num_record_batches)))])
    stream = pa.ipc.open_stream(handle)
    return stream.schema, lambda columns: iter([(None, (batch.select(columns)
                                                        for batch in stream))])


def _is_image_struct(kind: pa.DataType) -> bool:
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _table_columns(name: str, schema: pa.Schema, image_column: str | None,
                   id_column: str | None) -> tuple[str, str | None]:
    """(image column, id column or None) of a table, named or detected.

    Raises:
      OptionError: a named column is missing (naming its field: a usage error).
      DataError: no column holds encoded images.
    """
    names = schema.names
    for field, column in (("image_column", image_column), ("id_column", id_column)):
        if column is not None and column not in names:
            raise OptionError(field, f"{column!r} is not a column of {name} (columns: "
                                     f"{', '.join(names)})")
    if image_column is None:
        usable = [column for column in names if _is_binary(schema.field(column).type)
                  or _is_image_struct(schema.field(column).type)
                  or (column in IMAGE_COLUMNS and pa.types.is_string(schema.field(column).type))]
        preferred = [column for column in IMAGE_COLUMNS if column in usable]
        image_column = (preferred or usable or [None])[0]
        if image_column is None:
            raise DataError(f"{name}: no column of encoded images (binary, or a struct with "
                            f"bytes and path) among {', '.join(names)}; name the image column")
    if id_column is None:
        id_column = next((column for column in ID_COLUMNS
                          if column in names and column != image_column), None)
    return image_column, id_column


def _table_rows(name: str, open_table: Callable[[], IO[bytes]], base: str,
                storage_options: StorageOptions | None, image_column: str | None,
                id_column: str | None) -> Iterator[InputItem]:
    """One item per row of a Parquet/Arrow table, holding that row's encoded image.

    A Parquet row group that cannot be read gives an error row for each of its rows (named
    ``table#row``), and the rows after it go on; an Arrow table that cannot be read on gives
    one error row naming the table. A failing read of the file itself (an errno, or a
    storage client's error) is a DataError, as a rerun may get past it.
    """
    try:
        handle = open_table()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except OSError as error:
        raise DataError(f"{name}: cannot open the table: {storage.describe(error)}") from None
    with handle:
        schema, read_parts = _opened_table(name, handle)
        image_column, id_column = _table_columns(name, schema, image_column, id_column)
        columns = [image_column] + ([id_column] if id_column else [])
        row = 0
        for group, (part_rows, batches) in enumerate(read_parts(columns)):
            first = row
            try:
                for batch in batches:
                    images = batch.column(0).to_pylist()
                    ids = batch.column(1).to_pylist() if id_column else [None] * len(images)
                    for value, identifier in zip(images, ids):
                        yield _table_item(name, row, image_column, value, identifier, base,
                                          storage_options)
                        row += 1
            except (pa.ArrowException, OSError) as error:
                if not _is_damage(error):
                    raise DataError(f"{name}: cannot read row {row}: "
                                    f"{storage.describe(error)}") from None
                if part_rows is None:
                    yield InputItem(-1, name, read_bytes=_failing_reader(
                        name, f"cannot read the table from row {row} on "
                              f"({storage.describe(error)}); the rest of it is skipped"))
                    return
                reason = (f"cannot read row group {group} (rows {first}-"
                          f"{first + part_rows - 1}): {storage.describe(error)}")
                for missing in range(row, first + part_rows):
                    yield InputItem(-1, f"{name}#{missing}",
                                    read_bytes=_failing_reader(f"{name}#{missing}", reason))
                row = first + part_rows


def _is_damage(error: BaseException) -> bool:
    """Whether a failed table read is the file's damage, which every rerun meets again:
    Arrow's own errors (ArrowException, or a bare OSError without an errno), not an error
    the file system's read raised (a subclass of OSError, or an errno), which may pass."""
    return isinstance(error, pa.ArrowException) or (type(error) is OSError
                                                    and error.errno is None)


def _table_path(path: str, base: str) -> str:
    """Where a table's image path points. ``datasets`` writes the paths it was given and opens
    a relative one from the working directory (``Image.decode_example``), so that is tried
    first; failing that, the table's folder ``base`` (a table kept next to its images)."""
    if storage.protocol(path) or os.path.isabs(path) or os.path.exists(path):
        return path
    return storage.join(base, path) if storage.protocol(base) else os.path.join(base, path)


def _table_item(name: str, row: int, column: str, value: Any, identifier: Any, base: str,
                storage_options: StorageOptions | None) -> InputItem:
    path = value.get("path") if isinstance(value, dict) else None
    encoded = value.get("bytes") if isinstance(value, dict) else value
    row_name = str(identifier) if identifier is not None else (path or f"{name}#{row}")
    if isinstance(encoded, bytes) and encoded:
        return InputItem(-1, row_name, data=encoded)
    if isinstance(encoded, str):  # a column of paths or URLs
        path = encoded
    if path:
        location = _table_path(path, base)
        item = _file_item(location, storage_options)
        return dataclasses.replace(item, name=row_name if identifier is not None else location)
    return InputItem(-1, row_name, read_bytes=_failing_reader(
        row_name, f"no image in column {column!r} of row {row}"))
