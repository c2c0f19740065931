"""Inputs that used to stop a whole run, or to mislead it, against real files: file names
that are not UTF-8, a damaged Parquet row group, tables written by ``datasets`` elsewhere,
byte-order marks, failing ``pipe:`` commands, exceptions quoting image bytes, 16-bit PNGs."""

from __future__ import annotations

import io
import logging
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flax_captioner import preprocess
from flax_captioner.preprocess import PreprocessConfig, load_and_preprocess_one
from flax_captioner.writers import read_rows
from test_pipeline import image_bytes, jsonl_rows, run, write_image  # noqa: E402

NOT_UTF8 = "file name is not valid UTF-8"


def rows_by_image(rows: list[dict]) -> dict[str, dict]:
    return {row["image"]: row for row in rows}


def errors_of(rows: list[dict]) -> dict[str, str]:
    return {row["image"]: row["error"] for row in rows if "error" in row}


def captioned(rows: list[dict]) -> list[str]:
    return [row["image"] for row in rows if "caption" in row]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_file_names_that_are_not_utf8_become_error_rows_and_resume(captioner, tmp_path, suffix):
    folder = tmp_path / "photos"
    png = image_bytes(1, "PNG")
    write_image(folder / "good.png", 0)
    # Made through bytes paths: the bytes 0xff and 0xe9 are not UTF-8 on their own.
    with open(os.path.join(os.fsencode(folder), b"bad-\xff.png"), "wb") as handle:
        handle.write(png)
    (tmp_path / "list.txt").write_bytes(b"photos/good.png\nphotos/bad-\xff.png\ncaf\xe9.png\n")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in ("000001.png", os.fsdecode(b"bad-\xff.png"), "000002.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png)
            archive.addfile(info, io.BytesIO(png))
    inputs = [folder, tmp_path / "list.txt", shard, f"pipe:cat {shard}"]
    output = tmp_path / f"out{suffix}"

    stats = run(captioner, inputs, output, batch_size=2)

    rows = list(read_rows(str(output), suffix[1:]))
    assert errors_of(rows) == {
        f"{folder}/bad-\\xff.png": NOT_UTF8,  # the directory's file, then the list's entry
        f"{tmp_path}/caf\\xe9.png": NOT_UTF8,
        f"{shard}/bad-\\xff.png": NOT_UTF8,
        "bad-\\xff": NOT_UTF8}  # the pipe: stream's sample key
    assert [row["image"] for row in rows].count(f"{folder}/bad-\\xff.png") == 2
    assert captioned(rows) == [
        f"{folder}/good.png", f"{tmp_path}/photos/good.png", f"{shard}/000001.png",
        f"{shard}/000002.png", "000001", "000002"]
    assert (stats.captioned, stats.errors) == (6, 5)

    again = run(captioner, inputs, output, batch_size=2)
    assert (again.resumed, again.captioned, again.errors) == (11, 0, 0)
    assert list(read_rows(str(output), suffix[1:])) == rows


def write_table(path: Path, row_group_rows: int, groups: int) -> None:
    """A Parquet table of encoded PNGs (``key``, ``jpg``) with ``groups`` row groups."""
    count = row_group_rows * groups
    table = pa.table({"key": [f"k{row}" for row in range(count)],
                      "jpg": [image_bytes(row, "PNG") for row in range(count)]})
    pq.write_table(table, path, row_group_size=row_group_rows)


def damage_row_group(path: Path, group: int) -> None:
    """Overwrites the page header at the start of ``group``'s image column chunk."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_a_damaged_parquet_row_group_costs_only_its_own_rows(captioner, tmp_path):
    table = tmp_path / "images.parquet"
    write_table(table, row_group_rows=3, groups=3)
    damage_row_group(table, 1)
    with pytest.raises(OSError):  # the defect: this group cannot be read, on every run
        pq.ParquetFile(table).read_row_group(1)
    after = write_image(tmp_path / "after.png", 9)
    output = tmp_path / "out.jsonl"

    stats = run(captioner, [table, after], output)

    rows = jsonl_rows(output)
    assert [row["image"] for row in rows] == [
        "k0", "k1", "k2", f"{table}#3", f"{table}#4", f"{table}#5", "k6", "k7", "k8",
        str(after)]
    errors = errors_of(rows)
    assert list(errors) == [f"{table}#3", f"{table}#4", f"{table}#5"]
    for reason in errors.values():
        assert reason.startswith("cannot read row group 1 (rows 3-5): ")
        assert "\n" not in reason and len(reason) < 400
    assert (stats.captioned, stats.errors) == (7, 3)
    again = run(captioner, [table, after], output)
    assert (again.resumed, again.captioned, again.errors) == (10, 0, 0)


def test_a_cut_arrow_stream_gives_its_rows_then_one_error_row(captioner, tmp_path):
    table = pa.table({"key": [f"k{row}" for row in range(9)],
                      "image": [image_bytes(row, "PNG") for row in range(9)]})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # as ``datasets`` caches a table
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    cut = tmp_path / "cut.arrow"  # a download that stopped inside the last batch
    cut.write_bytes(sink.getvalue()[:-1000])
    after = write_image(tmp_path / "after.png", 9)
    output = tmp_path / "out.jsonl"

    run(captioner, [cut, after], output)

    rows = jsonl_rows(output)
    assert captioned(rows) == ["k0", "k1", "k2", "k3", "k4", "k5", str(after)]
    error = errors_of(rows)[str(cut)]
    assert error.startswith("cannot read the table from row 6 on (")
    assert error.endswith("); the rest of it is skipped")


def write_datasets_table(path: Path, paths: list[str]) -> None:
    """A table as ``datasets`` writes an Image column of files (``Dataset.to_parquet``): a
    struct whose bytes are null and whose path is the one it was given."""
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": None, "path": name} for name in paths],
                                        kind)})
    table = table.replace_schema_metadata(
        {"huggingface": '{"info": {"features": {"image": {"_type": "Image"}}}}'})
    pq.write_table(table, path)


def test_datasets_paths_are_read_from_the_working_directory_then_the_table(
        captioner, tmp_path, monkeypatch):
    workdir, moved = tmp_path / "where-datasets-ran", tmp_path / "moved"
    write_image(workdir / "imgs" / "a.png", 1)
    write_image(moved / "imgs" / "b.png", 2)  # kept next to the table instead
    table = moved / "train.parquet"
    write_datasets_table(table, ["imgs/a.png", "imgs/b.png", "imgs/gone.png"])
    monkeypatch.chdir(workdir)
    output = tmp_path / "out.jsonl"

    stats = run(captioner, [table], output)

    rows = jsonl_rows(output)
    assert captioned(rows) == ["imgs/a.png", f"{moved}/imgs/b.png"]
    assert errors_of(rows) == {f"{moved}/imgs/gone.png": "no such file"}
    assert (stats.captioned, stats.errors) == (2, 1)


def test_a_byte_order_mark_does_not_spoil_the_first_entry(captioner, tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    bom = "\N{BYTE ORDER MARK}"
    (tmp_path / "list.txt").write_text(f"{bom}a.png\nb.png\n", encoding="utf-8")
    (tmp_path / "list.csv").write_text(f"{bom}image,caption\nb.png,x\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"

    stats = run(captioner, [tmp_path / "list.txt", tmp_path / "list.csv"], output)

    rows = jsonl_rows(output)
    assert captioned(rows) == [str(tmp_path / name) for name in ("a.png", "b.png", "b.png")]
    assert stats.errors == 0


def test_a_failing_pipe_command_reports_its_stderr_or_its_status(captioner, tmp_path):
    good = write_image(tmp_path / "good.png", 1)
    said = "pipe:echo 'curl: (6) Could not resolve host: nowhere' >&2; exit 3"
    silent = "pipe:exit 4"
    output = tmp_path / "out.jsonl"

    run(captioner, [said, silent, good], output)

    rows = jsonl_rows(output)
    assert errors_of(rows) == {
        said: "the command exited with status 3: curl: (6) Could not resolve host: nowhere",
        silent: "the command exited with status 4 (it wrote nothing on stderr)"}
    assert captioned(rows) == [str(good)]


def jpeg_with_exif_tag(path: Path, tag: int, kind: int, value: bytes) -> Path:
    """A JPEG whose EXIF says "rotate" (Orientation 6) and holds ``tag`` stored with the TIFF
    type ``kind`` (not the tag's usual one) and ``value``: PIL fails rewriting it."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (tag, kind, len(value), None)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    tiff = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for entry_tag, entry_kind, count, inline in entries:
        tiff += struct.pack("<HHI", entry_tag, entry_kind, count)
        tiff += inline or struct.pack("<I", data_offset)
    exif = b"Exif\x00\x00" + tiff + struct.pack("<I", 0) + value
    Image.fromarray(np.zeros((14, 20, 3), np.uint8)).save(path, "JPEG", exif=exif)
    return path


def test_error_reasons_never_carry_the_image_data(captioner, tmp_path):
    thumbnail = image_bytes(3, "JPEG")  # an EXIF thumbnail's worth of JPEG bytes
    # ConvergenceAngle (a rational) stored as text: PIL's message quotes all of it.
    quoting = jpeg_with_exif_tag(tmp_path / "quoting.jpg", 45573, 2, thumbnail)
    # XResolution (a rational) stored as raw bytes: PIL raised TypeError, which stopped the run.
    raising = jpeg_with_exif_tag(tmp_path / "raising.jpg", 0x011A, 7, thumbnail)
    good = write_image(tmp_path / "good.png", 1)
    output = tmp_path / "out.jsonl"

    stats = run(captioner, [quoting, raising, good], output, exif_transpose=True)

    rows = jsonl_rows(output)
    errors = errors_of(rows)
    assert list(errors) == [str(quoting), str(raising)]
    for reason in errors.values():
        assert reason.startswith("cannot apply the EXIF orientation: ")
        assert len(reason) <= preprocess.REASON_CHARS and reason.isprintable()
        assert "JFIF" not in reason and "\xff" not in reason and "\\xff" not in reason
    assert "characters left out" in errors[str(quoting)]
    assert captioned(rows) == [str(good)]
    assert stats.errors == 2


def test_a_16_bit_png_keeps_its_pixels_and_is_warned_about_once_per_run(captioner, tmp_path,
                                                                       caplog):
    deep = []
    for seed in range(3):
        values = np.random.RandomState(seed).randint(0, 65536, (14, 20)).astype(np.uint16)
        Image.fromarray(values).save(tmp_path / f"deep{seed}.png")
        deep.append(tmp_path / f"deep{seed}.png")
    with Image.open(deep[0]) as opened:
        assert opened.mode == "I;16"
    dark = tmp_path / "dark.png"  # 16 bits, every value within 0..255: nothing is clipped
    Image.fromarray(np.full((14, 20), 200, np.uint16)).save(dark)

    def warnings_of_a_run(output) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flax_captioner"):
            stats = run(captioner, [dark, *deep], output)
        assert stats.captioned == 4
        return [record.getMessage() for record in caplog.records
                if record.name.startswith("flax_captioner")]

    # Three clipped images on two decode threads: one warning, naming the first one decoded.
    first = warnings_of_a_run(tmp_path / "first.jsonl")
    assert len(first) == 1
    assert any(first[0].startswith(f"{path}: a I;16 image with values from ") for path in deep)
    assert "clipped to 0..255" in first[0]
    # The warning is the run's, not the process's: the next run in this process warns again.
    second = warnings_of_a_run(tmp_path / "second.jsonl")
    assert len(second) == 1 and "clipped to 0..255" in second[0]
    # The pixels stay the model card's: Image.open(path).convert("RGB"), clipped.
    config = PreprocessConfig()
    with Image.open(deep[0]) as opened:
        card = preprocess.preprocess([opened.convert("RGB")], config)[0]
    np.testing.assert_array_equal(load_and_preprocess_one(deep[0], config), card)
