"""Pipeline inputs: image files, directories, globs, path lists and WebDataset tar shards,
streamed as ``InputItem``s in a deterministic order (``feed`` decodes them).

Nothing here holds more than one tar member's bytes at a time: inputs are listed lazily, so
memory does not grow with the number of images.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence

from PIL import Image

from flax_captioner.errors import DataError, ImageReadError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"})
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".lst"})
TAR_EXTENSIONS = frozenset({".tar"})
# Header names (lower case) of the CSV column holding image paths; otherwise column 0.
CSV_PATH_COLUMNS = ("image", "path", "filepath", "file_path", "image_path", "filename", "file")
_TAR_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image to caption (or to train on).

    Attributes:
      index: position in the whole input order, 0-based; the same on every run and process.
      image: the name written in output rows and error messages: the path of an image file
        (list entries joined to the list's directory), ``shard.tar/member`` for a tar member,
        the tar's own path for a row reporting a damaged tar, or a caller's name for an
        in-memory image.
      read_bytes: for members of a stream (tar), returns the encoded image (raises
        ``ImageReadError``); the feed calls it in input order on its reader thread, before the
        stream moves on and closes the member.
      data: an in-memory image (encoded bytes or a PIL image) to decode instead of a file.
      When both are None the decoder opens ``image`` as a path.
    """

    index: int
    image: str
    read_bytes: Callable[[], bytes] | None = None
    data: bytes | Image.Image | None = None


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def check_inputs(inputs: Sequence[str]) -> None:
    """Fails fast, before any work, on inputs that would make the whole run pointless.

    A glob matching nothing, a path list or tar shard that does not exist, or a directory
    without image files raises. A missing image file does not: it becomes an error row, like
    a missing list entry.

    Raises:
      DataError: naming the input and the cause.
    """
    if not inputs:
        raise DataError("no inputs given")
    for spec in inputs:
        if os.path.isdir(spec):
            if next(_walk_images(spec), None) is None:
                raise DataError(f"{spec}: no image files in this directory (looked for "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            continue
        if os.path.exists(spec):
            continue
        if glob.has_magic(spec):
            if not glob.glob(spec, recursive=True):
                raise DataError(f"{spec}: no files match this pattern")
        elif _extension(spec) in LIST_EXTENSIONS | TAR_EXTENSIONS:
            raise DataError(f"{spec}: no such file")


def iter_inputs(inputs: Sequence[str]) -> Iterator[InputItem]:
    """Every image named by ``inputs``, in order, each with its global index.

    - a directory: its image files (by extension), recursively, sorted by path;
    - a glob (``*``, ``?``, ``[]``, ``**``): its matches sorted, each expanded as here;
    - ``.txt`` / ``.lst``: one path per line (blank lines and ``#`` comments skipped);
      ``.csv``: the column headed image/path/filepath/filename/file, else the first column;
      relative entries are relative to the list's directory;
    - ``.tar``: a WebDataset shard as img2dataset writes it (``key.jpg`` next to optional
      ``key.txt`` / ``key.json``); its image members in archive order;
    - anything else: an image file (a missing or unreadable one becomes an error row).

    Raises:
      DataError: a glob matches nothing, or a path list cannot be read.
    """
    counter = itertools.count()
    for spec in inputs:
        if not os.path.exists(spec) and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"{spec}: no files match this pattern")
        else:
            matches = [spec]
        for path in matches:
            for image, read_bytes in _expand_path(path):
                yield InputItem(next(counter), image, read_bytes)


ExpandedItem = tuple[str, Callable[[], bytes] | None]


def _expand_path(path: str) -> Iterator[ExpandedItem]:
    if os.path.isdir(path):
        yield from ((image, None) for image in _walk_images(path))
    elif _extension(path) in TAR_EXTENSIONS:
        yield from _tar_members(path)
    elif _extension(path) in LIST_EXTENSIONS:
        yield from ((image, None) for image in _list_entries(path))
    else:
        yield path, None


def _walk_images(directory: str) -> Iterator[str]:
    """Image files under ``directory``, depth first, each directory's entries sorted."""
    for root, subdirectories, files in os.walk(directory):
        subdirectories.sort()
        for name in sorted(files):
            if _extension(name) in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def _list_entries(list_path: str) -> Iterator[str]:
    """The image paths a .txt/.lst/.csv list names, joined to the list's directory."""
    base = os.path.dirname(list_path)
    try:
        with open(list_path, newline="", encoding="utf-8") as handle:
            if _extension(list_path) == ".csv":
                entries = _csv_paths(csv.reader(handle))
            else:
                entries = (line.strip() for line in handle)
                entries = (line for line in entries if line and not line.startswith("#"))
            for entry in entries:
                yield os.path.join(base, os.path.expanduser(entry))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{list_path}: cannot read the path list: {error}") from None


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

    return read_bytes


def _tar_members(path: str) -> Iterator[ExpandedItem]:
    """Image members of a tar shard in archive order; a damaged shard adds one error item.

    tarfile ends iteration silently at a corrupt header past the first member, so the bytes
    after the last member are checked: anything but end-of-archive zeros means a damaged tar.
    """
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as error:
        yield path, _failing_reader(path, f"not a readable tar archive: {error}")
        return
    with archive:
        try:
            for member in archive:
                if member.isfile() and _extension(member.name) in IMAGE_EXTENSIONS:
                    name = f"{path}/{member.name}"
                    yield name, _member_reader(archive, member, name)
        except (tarfile.TarError, OSError) as error:
            yield path, _failing_reader(
                path, f"tar ends early or is corrupt at byte {archive.offset} ({error}); "
                      "the rest of the shard is skipped")
            return
        damage = _tail_damage(path, archive.offset)
        if damage:
            yield path, _failing_reader(path, damage)


def _tail_damage(path: str, offset: int) -> str | None:
    """Why the bytes from ``offset`` (where tarfile stopped) are not a clean archive end."""
    size = os.path.getsize(path)
    if offset > size:
        return None  # a truncated last member; its own read reports it
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read(2 * _TAR_BLOCK)
    if tail.strip(b"\0"):
        return (f"invalid tar header at byte {offset} of {size}; "
                "the rest of the shard is skipped")
    if len(tail) < 2 * _TAR_BLOCK:
        return f"tar ends at byte {size} without an end-of-archive marker (truncated?)"
    return None
