"""Pipeline outputs: caption rows as JSONL or Parquet, written so a killed run resumes exactly.

One row per input item, in input order, so the number of rows already written is the number
of items done:

- ``{"image": name, "caption": text, "score": s}``: the best caption and its score;
- plus ``"sequences": [{"rank": 1, "caption": ..., "score": ...}, ...]`` when several
  sequences are returned per image (``num_return_sequences``), best first;
- plus ``"token_logprobs": [...]`` (on each sequence too) when asked for;
- ``{"image": name, "error": why}`` for an input that could not be read.

- JSONL: each batch is appended with one ``write`` and flushed. A kill can only leave a
  partial last line, which reopening truncates.
- Parquet cannot be appended to, so rows go to ``OUT.chunks/chunk-NNNNNN.parquet`` files, each
  written under a temporary name and renamed into place (a rename is atomic: a chunk is
  there whole or not at all); closing combines the chunks into ``OUT`` the same way. The
  chunk files are the progress record.
- An object store URL (``s3://``, ``gs://``, ...) cannot append or rename, so both formats
  go to ``OUT.chunks/chunk-NNNNNN-RRRRRRRR.EXT`` objects (chunk number, row count), each one
  PUT (an object is there whole or not at all); closing streams the chunks into ``OUT`` (a
  multipart upload, visible only once complete, and discarded if the combine fails), then
  deletes them. A rerun finds its progress by listing the chunks; a run killed between the
  final object and the deletion finds both and keeps the final object.

Beside ``OUT`` its owner's lock ``OUT.lock`` and its manifest ``OUT.manifest.json``
(``ownership``); the writers assume the run has checked both.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import fsspec.spec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flax_captioner import storage
from flax_captioner.errors import CaptionerError, DataError, OutputError
from flax_captioner.options import output_format as format_of
from flax_captioner.storage import StorageOptions

_TOKEN_LOGPROBS = pa.list_(pa.float32())
PARQUET_SCHEMA = pa.schema([
    ("image", pa.string()),
    ("caption", pa.string()),
    ("score", pa.float32()),
    ("error", pa.string()),
    ("token_logprobs", _TOKEN_LOGPROBS),
    ("sequences", pa.list_(pa.struct([
        ("rank", pa.int32()), ("caption", pa.string()), ("score", pa.float32()),
        ("token_logprobs", _TOKEN_LOGPROBS)]))),
])
Row = dict[str, Any]

MANIFEST_SUFFIX = ".manifest.json"
_PART_PATTERN = re.compile(r"\.part-(\d{5})-of-(\d{5})$")
_CHUNK_PATTERN = re.compile(r"chunk-(\d{6})-(\d{8})\.(jsonl|parquet)$")
_READ_BATCH_ROWS = 4096
_ROW_GROUP_ROWS = 65536


def check_writable(path: str, storage_options: StorageOptions | None = None) -> None:
    """Raises ``OutputError`` unless a file can be created next to ``path`` and ``path``
    itself (when present) is a writable file. Creates and removes a probe file (or object),
    which catches read-only mounts, missing buckets and refused credentials the way an
    actual write would. Each probe has its own name: the processes of a multi-host run probe
    one output at the same moment, and on GCS, where deleting a missing object fails, a
    shared name failed whichever process deleted second.
    """
    if storage.is_remote(path):
        fs, remote = _output_fs(path, storage_options)
        probe = f"{remote}.flax-captioner-probe-{uuid.uuid4().hex}"
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as error:
            raise OutputError(f"{path}: cannot write the output: "
                              f"{storage.describe(error)}") from None
        return
    path = storage.local_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"{path}: cannot write the output: directory {directory} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"{path}: cannot write the output: it is a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".flax-captioner-probe-"):
            pass
        if os.path.exists(path):
            with open(path, "ab"):
                pass
    except OSError as error:
        raise OutputError(f"{path}: cannot write the output: {error.strerror or error}") from None


def format_score(score: float) -> float:
    """The shortest float that reads back as the same float32 (-0.5956, not -0.595600008)."""
    return float(str(np.float32(score)))


class RowWriter(Protocol):
    """Appends rows to an output; ``rows_done`` rows were already there when it was opened."""

    rows_done: int

    def images(self) -> Iterator[str]:
        """The image names of the ``rows_done`` rows there at opening, in order."""

    def write(self, rows: Sequence[Row]) -> None:
        """Appends ``rows``; they survive a kill once ``flush`` (or a JSONL write) returns."""

    def flush(self) -> None:
        """Makes every written row durable against a kill of this process."""

    def close(self) -> None:
        """Flushes and leaves the output complete and readable."""


def open_writer(path: str | None, output_format: str, *, resume: bool,
                flush_seconds: float = 30.0,
                storage_options: StorageOptions | None = None) -> RowWriter:
    """A writer for ``path`` (None: JSONL on stdout; a URL: chunk objects), resuming after
    its existing rows when ``resume`` is true, else starting over. Parquet rows (and rows to
    an object store) are committed at least every ``flush_seconds``.

    Raises:
      OutputError: the output cannot be written, or is not this pipeline's output.
    """
    if path is None:
        return StdoutWriter()
    if storage.is_remote(path):
        return ObjectChunkWriter(path, output_format, resume=resume, flush_seconds=flush_seconds,
                                 storage_options=storage_options)
    path = storage.local_path(path)
    if output_format == "parquet":
        return ParquetChunkWriter(path, resume=resume, flush_seconds=flush_seconds)
    return JsonlWriter(path, resume=resume)


def _json_line(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


class StdoutWriter:
    """JSONL on stdout; nothing to resume from."""

    rows_done = 0

    def images(self) -> Iterator[str]:
        return iter(())

    def write(self, rows: Sequence[Row]) -> None:
        sys.stdout.write("".join(_json_line(row) for row in rows))
        sys.stdout.flush()

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.flush()


class JsonlWriter:
    """Appends JSONL rows, one ``write`` + flush per batch; reopening repairs a torn last line."""

    def __init__(self, path: str, *, resume: bool):
        check_writable(path)
        self.path = path
        self.rows_done = _repair_jsonl(path) if resume and os.path.exists(path) else 0
        self._file = open(path, "ab" if resume else "wb")

    def images(self) -> Iterator[str]:
        with open(self.path, "rb") as handle:
            for line in itertools.islice(handle, self.rows_done):
                yield _row_image(self.path, line)

    def write(self, rows: Sequence[Row]) -> None:
        with _naming_errors(self.path):  # a torn last line is cut off when the run resumes
            self._file.write("".join(_json_line(row) for row in rows).encode("utf-8"))
            self._file.flush()

    def flush(self) -> None:
        with _naming_errors(self.path):
            self._file.flush()

    def close(self) -> None:
        with _naming_errors(self.path):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _repair_jsonl(path: str) -> int:
    """Truncates a partial last line; returns the complete rows."""
    block_size = 1 << 20
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        # Search backwards for the last newline: what follows it is a torn write.
        while end > 0:
            start = max(0, end - block_size)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            handle.truncate(end)
        handle.seek(0)
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(block_size), b""))


def _row_image(path: str, line: bytes) -> str:
    try:
        row = json.loads(line)
        return str(row["image"])
    except (ValueError, KeyError, TypeError):
        raise OutputError(
            f"{path}: holds a line that is not a caption row",
            fix=("other_output", "start_over")) from None


class _ChunkBuffer:
    """Rows held back until a chunk is due: every ``flush_rows`` rows or ``flush_seconds``
    seconds, whichever comes first, so a kill loses little work even when the model is slow.
    Subclasses commit a chunk in ``_commit(rows)``."""

    def __init__(self, flush_rows: int, flush_seconds: float):
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._pending: list[Row] = []
        self._last_flush = time.monotonic()

    def write(self, rows: Sequence[Row]) -> None:
        self._pending.extend(rows)
        if (len(self._pending) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._pending:
            self._commit(self._pending)
            self._pending = []

    def _commit(self, rows: list[Row]) -> None:
        raise NotImplementedError


class ParquetChunkWriter(_ChunkBuffer):
    """Parquet through atomically renamed chunk files, combined into the output on close."""

    def __init__(self, path: str, *, resume: bool, flush_rows: int = 1024,
                 flush_seconds: float = 30.0):
        super().__init__(flush_rows, flush_seconds)
        check_writable(path)
        self.path = path
        self.chunk_dir = f"{path}.chunks"
        if not resume:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
            _remove(path)
        self._recover()
        self.rows_done = sum(pq.ParquetFile(part).metadata.num_rows for part in self._parts())

    def _recover(self) -> None:
        """Brings the output back to: complete chunk files, or the finished output alone."""
        _remove(f"{self.path}.tmp")
        if os.path.exists(self.path) and os.path.isdir(self.chunk_dir):
            # Killed after combining but before removing the chunks: the output is complete.
            shutil.rmtree(self.chunk_dir)
        for stray in glob.glob(os.path.join(glob.escape(self.chunk_dir), "*.tmp")):
            os.remove(stray)
        if os.path.exists(self.path):
            try:
                pq.ParquetFile(self.path).schema_arrow.field("image")
            except (pa.ArrowException, KeyError, OSError):
                raise OutputError(
                    f"{self.path}: exists but is not a Parquet file of caption rows",
                    fix=("other_output", "start_over")) from None

    def _parts(self) -> list[str]:
        """The files holding the rows so far, in order: a finished output (left as it is
        until a row is added, so a run refused after opening it has changed nothing), else
        the chunks."""
        return [self.path] if os.path.exists(self.path) else self._chunks()

    def _chunks(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.chunk_dir, "chunk-*.parquet")))

    def _chunk_name(self, number: int) -> str:
        return os.path.join(self.chunk_dir, f"chunk-{number:06d}.parquet")

    def images(self) -> Iterator[str]:
        for part in self._parts():
            yield from pq.read_table(part, columns=["image"]).column("image").to_pylist()

    def _commit(self, rows: list[Row]) -> None:
        try:
            os.makedirs(self.chunk_dir, exist_ok=True)
        except OSError as error:
            raise OutputError(
                f"{self.chunk_dir}: cannot create the chunk directory: {error.strerror}") from None
        if os.path.exists(self.path):  # a finished output to extend becomes the first chunk
            os.replace(self.path, self._chunk_name(0))
        final = self._chunk_name(len(self._chunks()))
        _write_atomically(final, pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA))

    def close(self) -> None:
        self.flush()
        if os.path.exists(self.path):  # finished before, and nothing added
            return
        chunks = self._chunks()
        # The output is written whole beside its chunks before they go: it needs their size.
        needed = sum(os.path.getsize(chunk) for chunk in chunks)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        if needed > free:
            raise OutputError(f"{self.path}: combining its chunks needs about "
                              f"{needed / 1e6:.1f} MB free beside them and {free / 1e6:.1f} MB "
                              "are; free some and run again to finish (the chunks are kept)")
        _write_atomically(self.path, _concatenated(chunks))
        shutil.rmtree(self.chunk_dir, ignore_errors=True)


def _output_fs(path: str, storage_options: StorageOptions | None) -> tuple[Any, str]:
    try:
        return storage.filesystem(path, storage_options)
    except DataError as error:
        raise OutputError(str(error)) from None


def exists(path: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether the file or object ``path`` exists."""
    if storage.is_remote(path):
        fs, remote = _output_fs(path, storage_options)
        return fs.exists(remote)
    return os.path.exists(storage.local_path(path))


def output_present(path: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether ``path`` holds any of an output: the file or object, or committed chunks."""
    return exists(path, storage_options) or exists(f"{path}.chunks", storage_options)


def manifest_path(output: str) -> str:
    """Where the manifest of ``output`` (``ownership``) lives: beside it."""
    return f"{output}{MANIFEST_SUFFIX}"


class ObjectChunkWriter(_ChunkBuffer):
    """JSONL or Parquet on an object store: committed chunk objects, combined on close.

    A chunk is one PUT; its name carries its row count, so resuming counts rows with one
    listing (``images`` then reads the chunks' image names).
    """

    def __init__(self, url: str, output_format: str, *, resume: bool, flush_rows: int = 1024,
                 flush_seconds: float = 30.0, storage_options: StorageOptions | None = None):
        super().__init__(flush_rows, flush_seconds)
        check_writable(url, storage_options)
        self.path = url
        self.output_format = output_format
        self.fs, self._final = _output_fs(url, storage_options)
        self._prefix = f"{self._final}.chunks"
        try:
            if not resume:
                self._remove_chunks()
                if self.fs.exists(self._final):
                    self.fs.rm_file(self._final)
            finished = self.fs.exists(self._final)
            if finished and self._list_chunks():
                # Killed after writing the final object but before deleting the chunks (or
                # after copying a finished output into chunk 0): the final object holds every
                # row.
                self._remove_chunks()
            self._chunks = self._list_chunks()
            # A finished output: left as it is until a row is added (``_commit``).
            self._finished_rows = self._count_final() if finished else None
            self.rows_done = (self._finished_rows if self._finished_rows is not None
                              else sum(rows for _, rows in self._chunks))
        except (OutputError, DataError):
            raise
        except Exception as error:
            raise OutputError(f"{url}: cannot read the output's chunks: "
                              f"{storage.describe(error)}") from None

    def _list_chunks(self) -> list[tuple[str, int]]:
        """(object, rows) of the committed chunks, in order."""
        try:
            names = self.fs.ls(self._prefix, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        chunks = []
        for name in sorted(names):
            match = _CHUNK_PATTERN.search(name)
            if match and match.group(3) == self.output_format:
                chunks.append((name, int(match.group(2))))
        return chunks

    def _remove_chunks(self) -> None:
        for name, _ in self._list_chunks():
            self.fs.rm_file(name)

    def _count_final(self) -> int:
        try:
            with self.fs.open(self._final, "rb") as handle:
                if self.output_format == "parquet":
                    parquet = pq.ParquetFile(handle)
                    parquet.schema_arrow.field("image")
                    return parquet.metadata.num_rows
                rows, last = 0, b""
                for line in handle:
                    rows, last = rows + 1, line
                if last and not last.endswith(b"\n"):
                    raise ValueError("torn last line")
                if last:
                    json.loads(last)["image"]
                return rows
        except (pa.ArrowException, KeyError, ValueError, TypeError):
            raise OutputError(f"{self.path}: exists but is not a {self.output_format} file of "
                              "caption rows", fix=("other_output", "start_over")) from None

    def _chunk_name(self, number: int, rows: int) -> str:
        return f"{self._prefix}/chunk-{number:06d}-{rows:08d}.{self.output_format}"

    def images(self) -> Iterator[str]:
        parts = [self._final] if self._finished_rows is not None else [
            name for name, _ in self._chunks]
        for name in parts:
            data = self.fs.cat_file(name)
            if self.output_format == "parquet":
                yield from pq.read_table(pa.BufferReader(data),
                                         columns=["image"]).column("image").to_pylist()
            else:
                yield from (_row_image(self.path, line) for line in data.splitlines())

    def _commit(self, rows: list[Row]) -> None:
        if self._finished_rows is not None:
            # A finished output to extend becomes chunk 0 (copied, then the final removed; a
            # kill in between leaves both, which opening resolves).
            first = self._chunk_name(0, self._finished_rows)
            self.fs.copy(self._final, first)
            self.fs.rm_file(self._final)
            self._chunks, self._finished_rows = [(first, self.rows_done)], None
        name = self._chunk_name(len(self._chunks), len(rows))
        if self.output_format == "parquet":
            buffer = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), buffer)
            payload = buffer.getvalue().to_pybytes()
        else:
            payload = "".join(_json_line(row) for row in rows).encode("utf-8")
        _put(self.fs, self.path, name, payload)
        self._chunks.append((name, len(rows)))

    def close(self) -> None:
        self.flush()
        if self._finished_rows is not None:  # finished before, and nothing added
            return
        try:
            with _upload(self.fs, self._final) as handle:
                if self.output_format == "parquet":
                    with pq.ParquetWriter(handle, PARQUET_SCHEMA) as writer:
                        for table in _concatenated(
                                pa.BufferReader(self.fs.cat_file(name))
                                for name, _ in self._chunks):
                            writer.write_table(table)
                else:
                    for name, _ in self._chunks:
                        handle.write(self.fs.cat_file(name))
            self._remove_chunks()
        except Exception as error:
            raise OutputError(f"{self.path}: cannot write the final object (the committed "
                              f"chunks stay; run again to finish): "
                              f"{storage.describe(error)}") from None


@contextlib.contextmanager
def _upload(fs: Any, path: str) -> Iterator[Any]:
    """A file object writing the object ``path``, which appears whole or not at all: on an
    error the upload is discarded (closing would commit what was written so far)."""
    handle = fs.open(path, "wb")
    try:
        yield handle
    except BaseException:
        handle.discard()
        if isinstance(handle, fsspec.spec.AbstractBufferedFile):
            handle.closed = True  # else closing it when collected would commit after all
        raise
    handle.close()


def _put(fs: Any, url: str, name: str, payload: bytes) -> None:
    """One PUT of ``payload``, retried on transient errors."""
    try:
        storage.with_retries(lambda: fs.pipe_file(name, payload), storage.url_of(fs, name))
    except CaptionerError as error:
        raise OutputError(f"{url}: cannot commit rows: {error}") from None


def _concatenated(paths: Iterable[Any]) -> Iterator[pa.Table]:
    """The tables of ``paths`` (files or buffers) regrouped into tables of about
    ``_ROW_GROUP_ROWS`` rows."""
    group: list[pa.Table] = []
    rows = 0
    for path in paths:
        table = pq.read_table(path, schema=PARQUET_SCHEMA)
        group.append(table)
        rows += table.num_rows
        if rows >= _ROW_GROUP_ROWS:
            yield pa.concat_tables(group)
            group, rows = [], 0
    if group:
        yield pa.concat_tables(group)


def _write_atomically(path: str, tables: pa.Table | Iterable[pa.Table]) -> None:
    """Writes Parquet to ``path.tmp``, syncs it, and renames it to ``path``.

    Raises:
      OutputError: the write failed, naming ``path``; the temporary file is removed.
    """
    temporary = f"{path}.tmp"
    with _naming_errors(path):
        try:
            with pq.ParquetWriter(temporary, PARQUET_SCHEMA) as writer:
                for table in [tables] if isinstance(tables, pa.Table) else tables:
                    writer.write_table(table)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            _remove(temporary)
            raise


@contextlib.contextmanager
def _naming_errors(path: str) -> Iterator[None]:
    """A write that fails (a full disk, a lost permission) as one line naming ``path``; the
    rows committed before it stay."""
    try:
        yield
    except (OSError, pa.ArrowException) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise OutputError(f"{path}: cannot write: {reason}; the rows committed before stay, "
                          "and running again resumes") from None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _open_binary(path: str, mode: str, storage_options: StorageOptions | None) -> Any:
    """A binary file object for a local path or a URL."""
    if storage.is_remote(path):
        fs, remote = _output_fs(path, storage_options)
        return fs.open(remote, mode)
    return open(storage.local_path(path), mode)


def count_rows(path: str, output_format: str,
               storage_options: StorageOptions | None = None) -> int:
    """Rows in a finished JSONL or Parquet output (a file or an object)."""
    with _open_binary(path, "rb", storage_options) as handle:
        if output_format == "parquet":
            return pq.ParquetFile(handle).metadata.num_rows
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def read_rows(path: str, output_format: str,
              storage_options: StorageOptions | None = None) -> Iterator[Row]:
    """The rows of a JSONL or Parquet output (a file or an object), streamed, as the JSONL
    writer writes them (Parquet nulls left out, float32 scores in their shortest form)."""
    with _open_binary(path, "rb", storage_options) as handle:
        if output_format == "parquet":
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=_READ_BATCH_ROWS):
                for row in batch.to_pylist():
                    yield _json_form(row)
            return
        for line in handle:
            yield json.loads(line)


def _json_form(row: Row) -> Row:
    """A Parquet row as the JSONL writer writes it: nulls left out, float32 numbers in their
    shortest form."""
    row = {key: value for key, value in row.items() if value is not None}
    if "score" in row:
        row["score"] = format_score(row["score"])
    if "token_logprobs" in row:
        row["token_logprobs"] = [format_score(value) for value in row["token_logprobs"]]
    if "sequences" in row:
        row["sequences"] = [_json_form(sequence) for sequence in row["sequences"]]
    return row


def write_rows(path: str, output_format: str, rows: Iterable[Row],
               storage_options: StorageOptions | None = None) -> int:
    """Writes ``rows`` to ``path`` atomically (temporary file, then rename; for a URL one
    upload, visible once complete); returns the count."""
    count = 0
    if storage.is_remote(path):
        with _upload(*_output_fs(path, storage_options)) as handle:
            if output_format == "parquet":
                with pq.ParquetWriter(handle, PARQUET_SCHEMA) as writer:
                    for batch in _batched(rows, _ROW_GROUP_ROWS):
                        count += len(batch)
                        writer.write_table(pa.Table.from_pylist(batch, schema=PARQUET_SCHEMA))
            else:
                for batch in _batched(rows, _READ_BATCH_ROWS):
                    count += len(batch)
                    handle.write("".join(_json_line(row) for row in batch).encode("utf-8"))
        return count
    path = storage.local_path(path)
    if output_format == "parquet":
        def tables() -> Iterator[pa.Table]:
            nonlocal count
            batch: list[Row] = []
            for row in rows:
                batch.append(row)
                if len(batch) == _ROW_GROUP_ROWS:
                    count += len(batch)
                    yield pa.Table.from_pylist(batch, schema=PARQUET_SCHEMA)
                    batch = []
            count += len(batch)
            yield pa.Table.from_pylist(batch, schema=PARQUET_SCHEMA)

        _write_atomically(path, tables())
        return count
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(_json_line(row))
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return count


def _batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def part_path(output: str, process_index: int, process_count: int) -> str:
    """Where process ``process_index`` of ``process_count`` writes its share of ``output``."""
    return f"{output}.part-{process_index:05d}-of-{process_count:05d}"


def merge_shards(output: str, output_format: str | None = None,
                 storage_options: StorageOptions | None = None) -> int:
    """Interleaves the per-process parts of a multi-process run into ``output``, in input
    order, then removes the parts; returns the row count.

    Process i of n captioned inputs i, i + n, i + 2n ... (``sharding.process_slice``), so
    taking one row from each part in turn restores the input order.

    Raises:
      OutputError: no parts, a part missing, or a part with the wrong number of rows (its
        process has not finished: run it again to resume, then merge).
      ValueError: ``output``'s suffix and ``output_format`` name no format, or two
        (``options.output_format``).
    """
    output_format = format_of(output, output_format)
    parts = find_parts(output, storage_options)
    if exists(output, storage_options) and not exists(manifest_path(output), storage_options):
        raise OutputError(f"{output}: exists and is not a flax-captioner output (no "
                          f"{manifest_path(output)}); it is left as it is",
                          fix=("other_output",))
    counts = [count_rows(part, output_format, storage_options) for part in parts]
    total = sum(counts)
    expected = [len(range(index, total, len(parts))) for index in range(len(parts))]
    if counts != expected:
        raise OutputError(
            f"{output}: part row counts {counts} cannot come from one finished run "
            f"(expected {expected})", fix=("resume_processes",))
    readers = [read_rows(part, output_format, storage_options) for part in parts]
    missing = object()
    rows = (row for group in itertools.zip_longest(*readers, fillvalue=missing)
            for row in group if row is not missing)
    written = write_rows(output, output_format, rows, storage_options)
    # The parts were made alike (their runs checked it): the first one's manifest says so.
    manifests = [manifest_path(part) for part in parts]
    if exists(manifests[0], storage_options):
        _copy(manifests[0], manifest_path(output), storage_options)
    for path in parts + manifests:
        if exists(path, storage_options):
            if storage.is_remote(path):
                fs, remote = _output_fs(path, storage_options)
                fs.rm_file(remote)
            else:
                os.remove(storage.local_path(path))
    return written


def _copy(source: str, destination: str, storage_options: StorageOptions | None) -> None:
    """Copies a file or object whole (a temporary file and a rename; one server-side copy)."""
    if storage.is_remote(source):
        fs, remote = _output_fs(source, storage_options)
        fs.copy(remote, _output_fs(destination, storage_options)[1])
        return
    shutil.copyfile(storage.local_path(source), f"{storage.local_path(destination)}.tmp")
    os.replace(f"{storage.local_path(destination)}.tmp", storage.local_path(destination))


def find_parts(output: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The part files of a multi-process run's ``output``, by process index.

    Raises:
      OutputError: no parts, parts of runs with different process counts, or a part missing.
    """
    if storage.is_remote(output):
        fs, remote = _output_fs(output, storage_options)
        found = fs.glob(f"{remote}.part-*-of-*", detail=True)
        candidates = [storage.url_of(fs, path) for path, info in found.items()
                      if info.get("type") == "file"]
    else:
        candidates = [path for path in glob.glob(f"{glob.escape(output)}.part-*-of-*")
                      if os.path.isfile(path)]
    numbered = {}
    for path in candidates:
        match = _PART_PATTERN.search(path)
        if match:
            numbered[path] = (int(match.group(1)), int(match.group(2)))
    if not numbered:
        raise OutputError(f"{output}: no part files {output}.part-NNNNN-of-NNNNN to merge")
    counts = {count for _, count in numbered.values()}
    if len(counts) > 1:
        raise OutputError(f"{output}: parts from runs with different process counts "
                          f"{sorted(counts)}")
    count = counts.pop()
    by_index = {index: path for path, (index, _) in numbered.items()}
    missing = [index for index in range(count) if index not in by_index]
    if missing:
        raise OutputError(f"{output}: parts {missing} of {count} are missing or unfinished",
                          fix=("resume_processes",))
    return [by_index[index] for index in range(count)]
