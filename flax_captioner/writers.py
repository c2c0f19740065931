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
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flax_captioner.errors import OutputError

FORMATS = ("jsonl", "parquet")
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

_PARQUET_SUFFIXES = (".parquet", ".pq")
_PART_PATTERN = re.compile(r"\.part-(\d{5})-of-(\d{5})$")
_READ_BATCH_ROWS = 4096
_ROW_GROUP_ROWS = 65536


def resolve_format(output: str | None, output_format: str | None) -> str:
    """``output_format`` when given, else ``"parquet"`` for a .parquet/.pq output, else JSONL.

    Raises:
      ValueError: an unknown format, or Parquet to stdout.
    """
    if output_format is None:
        is_parquet = output is not None and output.lower().endswith(_PARQUET_SUFFIXES)
        output_format = "parquet" if is_parquet else "jsonl"
    if output_format not in FORMATS:
        raise ValueError(f"output format must be jsonl or parquet, got {output_format!r}")
    if output is None and output_format == "parquet":
        raise ValueError("Parquet output needs an output file; stdout gets JSONL")
    return output_format


def check_writable(path: str) -> None:
    """Raises ``OutputError`` unless a file can be created next to ``path`` and ``path``
    itself (when present) is a writable file. Creates and removes a probe file, which
    catches read-only mounts and permissions the way an actual write would.
    """
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
    last_image: str | None

    def write(self, rows: Sequence[Row]) -> None:
        """Appends ``rows``; they survive a kill once ``flush`` (or a JSONL write) returns."""

    def flush(self) -> None:
        """Makes every written row durable against a kill of this process."""

    def close(self) -> None:
        """Flushes and leaves the output complete and readable."""


def open_writer(path: str | None, output_format: str, *, resume: bool,
                flush_seconds: float = 30.0) -> RowWriter:
    """A writer for ``path`` (None: JSONL on stdout), resuming after its existing rows
    when ``resume`` is true, else starting over. Parquet rows reach disk at least every
    ``flush_seconds``.

    Raises:
      OutputError: the output cannot be written, or is not this pipeline's output.
    """
    if path is None:
        return StdoutWriter()
    if output_format == "parquet":
        return ParquetChunkWriter(path, resume=resume, flush_seconds=flush_seconds)
    return JsonlWriter(path, resume=resume)


def _json_line(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


class StdoutWriter:
    """JSONL on stdout; nothing to resume from."""

    rows_done = 0
    last_image = None

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
        self.rows_done, self.last_image = (
            _repair_jsonl(path) if resume and os.path.exists(path) else (0, None))
        self._file = open(path, "ab" if resume else "wb")

    def write(self, rows: Sequence[Row]) -> None:
        self._file.write("".join(_json_line(row) for row in rows).encode("utf-8"))
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _repair_jsonl(path: str) -> tuple[int, str | None]:
    """Truncates a partial last line; returns (complete rows, image of the last row)."""
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
        if end == 0:
            return 0, None
        handle.seek(0)
        rows = sum(block.count(b"\n") for block in iter(lambda: handle.read(block_size), b""))
        handle.seek(max(0, end - block_size))
        last_line = handle.read(end - handle.tell()).rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return rows, _row_image(path, last_line)


def _row_image(path: str, line: bytes) -> str:
    try:
        row = json.loads(line)
        return str(row["image"])
    except (ValueError, KeyError, TypeError):
        raise OutputError(
            f"{path}: exists but its last line is not a caption row",
            fix=("other_output", "start_over")) from None


class ParquetChunkWriter:
    """Parquet through atomically renamed chunk files, combined into the output on close.

    A chunk is written every ``flush_rows`` rows or ``flush_seconds`` seconds, whichever
    comes first, so a kill loses little work even when the model is slow.
    """

    def __init__(self, path: str, *, resume: bool, flush_rows: int = 1024,
                 flush_seconds: float = 30.0):
        check_writable(path)
        self.path = path
        self.chunk_dir = f"{path}.chunks"
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._pending: list[Row] = []
        self._last_flush = time.monotonic()
        if not resume:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
            _remove(path)
        self._recover()
        self.rows_done = sum(pq.ParquetFile(chunk).metadata.num_rows for chunk in self._chunks())
        self.last_image = self._last_image()

    def _recover(self) -> None:
        """Brings the output back to: complete chunk files only, final output absent."""
        _remove(f"{self.path}.tmp")
        if os.path.exists(self.path) and os.path.isdir(self.chunk_dir):
            # Killed after combining but before removing the chunks: the output is complete.
            shutil.rmtree(self.chunk_dir)
        try:
            os.makedirs(self.chunk_dir, exist_ok=True)
        except OSError as error:
            raise OutputError(
                f"{self.chunk_dir}: cannot create the chunk directory: {error.strerror}") from None
        for stray in glob.glob(os.path.join(self.chunk_dir, "*.tmp")):
            os.remove(stray)
        if os.path.exists(self.path):
            # A finished output to extend: it becomes the first chunk.
            try:
                pq.ParquetFile(self.path).schema_arrow.field("image")
            except (pa.ArrowException, KeyError, OSError):
                raise OutputError(
                    f"{self.path}: exists but is not a Parquet file of caption rows",
                    fix=("other_output", "start_over")) from None
            os.replace(self.path, self._chunk_name(0))

    def _chunks(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.chunk_dir, "chunk-*.parquet")))

    def _chunk_name(self, number: int) -> str:
        return os.path.join(self.chunk_dir, f"chunk-{number:06d}.parquet")

    def _last_image(self) -> str | None:
        chunks = self._chunks()
        if not chunks:
            return None
        images = pq.read_table(chunks[-1], columns=["image"]).column("image")
        return images[len(images) - 1].as_py() if len(images) else None

    def write(self, rows: Sequence[Row]) -> None:
        self._pending.extend(rows)
        if (len(self._pending) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        final = self._chunk_name(len(self._chunks()))
        _write_atomically(final, pa.Table.from_pylist(self._pending, schema=PARQUET_SCHEMA))
        self._pending = []

    def close(self) -> None:
        self.flush()
        _write_atomically(self.path, _concatenated(self._chunks()))
        shutil.rmtree(self.chunk_dir)


def _concatenated(paths: Sequence[str]) -> Iterator[pa.Table]:
    """The tables of ``paths`` regrouped into tables of about ``_ROW_GROUP_ROWS`` rows."""
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
    """Writes Parquet to ``path.tmp``, syncs it, and renames it to ``path``."""
    temporary = f"{path}.tmp"
    with pq.ParquetWriter(temporary, PARQUET_SCHEMA) as writer:
        for table in [tables] if isinstance(tables, pa.Table) else tables:
            writer.write_table(table)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def count_rows(path: str, output_format: str) -> int:
    """Rows in a finished JSONL or Parquet output."""
    if output_format == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def read_rows(path: str, output_format: str) -> Iterator[Row]:
    """The rows of a JSONL or Parquet output, streamed, as the JSONL writer writes them
    (Parquet nulls left out, float32 scores in their shortest form)."""
    if output_format == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_BATCH_ROWS):
            for row in batch.to_pylist():
                yield _json_form(row)
        return
    with open(path, encoding="utf-8") as handle:
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


def write_rows(path: str, output_format: str, rows: Iterable[Row]) -> int:
    """Writes ``rows`` to ``path`` atomically (temporary file, then rename); returns the count."""
    count = 0
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


def part_path(output: str, process_index: int, process_count: int) -> str:
    """Where process ``process_index`` of ``process_count`` writes its share of ``output``."""
    return f"{output}.part-{process_index:05d}-of-{process_count:05d}"


def merge_shards(output: str, output_format: str | None = None) -> int:
    """Interleaves the per-process parts of a multi-process run into ``output``, in input
    order, then removes the parts; returns the row count.

    Process i of n captioned inputs i, i + n, i + 2n ... (``sharding.process_slice``), so
    taking one row from each part in turn restores the input order.

    Raises:
      OutputError: no parts, a part missing, or a part with the wrong number of rows (its
        process has not finished: run it again to resume, then merge).
    """
    output_format = resolve_format(output, output_format)
    parts = _find_parts(output)
    counts = [count_rows(part, output_format) for part in parts]
    total = sum(counts)
    expected = [len(range(index, total, len(parts))) for index in range(len(parts))]
    if counts != expected:
        raise OutputError(
            f"{output}: part row counts {counts} cannot come from one finished run "
            f"(expected {expected})", fix=("resume_processes",))
    readers = [read_rows(part, output_format) for part in parts]
    missing = object()
    rows = (row for group in itertools.zip_longest(*readers, fillvalue=missing)
            for row in group if row is not missing)
    written = write_rows(output, output_format, rows)
    for part in parts:
        os.remove(part)
    return written


def _find_parts(output: str) -> list[str]:
    candidates = glob.glob(f"{glob.escape(output)}.part-*-of-*")
    numbered = {}
    for path in candidates:
        match = _PART_PATTERN.search(path)
        if match and os.path.isfile(path):
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
