"""Inputs and outputs behind fsspec URLs, on ``memory://`` (no server): listing, brace
patterns, path lists with URL entries, tar shards, ``pipe:`` streams, Parquet/Arrow tables,
retries, the bytes budget, a missing extra, and chunked outputs that resume exactly."""

from __future__ import annotations

import concurrent.futures
import io
import sys
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flax_captioner import feed, storage, writers
from flax_captioner.errors import (DataError, ImageReadError, OptionError, OutputError,
                                   StorageError)
from flax_captioner.preprocess import PreprocessConfig, load_and_preprocess_one
from flax_captioner.sources import check_inputs, expand_braces, iter_inputs, sample_key
from flax_captioner.testing import tar_bytes

CONFIG = PreprocessConfig(size=(4, 4))


def png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (5, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def memfs():
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    yield fs
    fs.store.clear()


def decoded(items) -> list[tuple[str, object]]:
    """(name, pixels or error reason) per item, through the feed."""
    out = []
    with feed.batches(items, CONFIG, 3, num_threads=2) as batches:
        for batch in batches:
            pixels = iter(batch.pixel_values[:batch.num_decoded])
            for item, error in zip(batch.items, batch.errors):
                out.append((item.name, error.reason if error else next(pixels)))
    return out


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s3://b/shard-{000..002}.tar") == [
        "s3://b/shard-000.tar", "s3://b/shard-001.tar", "s3://b/shard-002.tar"]
    assert expand_braces("d/{a,b}-{8..10}.tar") == [
        "d/a-8.tar", "d/a-9.tar", "d/a-10.tar", "d/b-8.tar", "d/b-9.tar", "d/b-10.tar"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert sample_key("dir/000123.seg.jpg") == "dir/000123" and sample_key("7.png") == "7"


def test_prefix_glob_and_list_entries_read_objects_in_order(memfs, tmp_path):
    for index in range(5):
        memfs.pipe_file(f"/bkt/photos/{index}.png", png(index))
    memfs.pipe_file("/bkt/photos/notes.txt", b"not an image")
    (tmp_path / "list.txt").write_text(
        "memory://bkt/photos/3.png\nmemory://bkt/photos/missing.png\n")
    inputs = ["memory://bkt/photos/", "memory://bkt/photos/[01].png", str(tmp_path / "list.txt")]
    check_inputs(inputs)
    rows = decoded(iter_inputs(inputs))
    names = [name for name, _ in rows]
    assert names == [f"memory://bkt/photos/{index}.png" for index in range(5)] + [
        "memory:///bkt/photos/0.png", "memory:///bkt/photos/1.png",
        "memory://bkt/photos/3.png", "memory://bkt/photos/missing.png"]
    np.testing.assert_array_equal(rows[3][1], load_and_preprocess_one(png(3), CONFIG))
    assert rows[-1][1] == "no such object"


def test_remote_tar_shards_with_a_brace_pattern_and_a_truncated_shard(memfs):
    for shard in range(2):
        memfs.pipe_file(f"/bkt/shard-{shard:03d}.tar", tar_bytes(
            [(f"{shard}{index}.jpg", png(10 * shard + index)) for index in range(2)]
            + [(f"{shard}0.txt", b"caption")]))
    whole = tar_bytes([("x0.png", png(50)), ("x1.png", png(51) * 30)])
    memfs.pipe_file("/bkt/shard-002.tar", whole[:1200])
    rows = decoded(iter_inputs(["memory://bkt/shard-{000..002}.tar"]))
    assert [name for name, _ in rows] == [
        "memory://bkt/shard-000.tar/00.jpg", "memory://bkt/shard-000.tar/01.jpg",
        "memory://bkt/shard-001.tar/10.jpg", "memory://bkt/shard-001.tar/11.jpg",
        "memory://bkt/shard-002.tar/x0.png", "memory://bkt/shard-002.tar"]
    np.testing.assert_array_equal(rows[2][1], load_and_preprocess_one(png(10), CONFIG))
    assert rows[-1][1] == ("invalid tar header at byte 1024 of 1200; "
                           "the rest of the shard is skipped")


def test_shards_larger_than_a_block_stream_through_the_block_reader(memfs, monkeypatch):
    """A 700-byte block size: each shard spans many blocks, fetched ahead in the background."""
    from flax_captioner import sources

    monkeypatch.setattr(sources, "_REMOTE_BLOCK_SIZE", 700)
    members = [(f"{index}.png", png(index)) for index in range(4)]
    memfs.pipe_file("/bkt/big-0.tar", tar_bytes(members))
    memfs.pipe_file("/bkt/big-1.tar", tar_bytes(members[::-1]))
    rows = decoded(iter_inputs(["memory://bkt/big-{0..1}.tar"]))
    assert [name.rsplit("/", 1)[1] for name, _ in rows] == [
        "0.png", "1.png", "2.png", "3.png", "3.png", "2.png", "1.png", "0.png"]
    for (name, pixels), seed in zip(rows, [0, 1, 2, 3, 3, 2, 1, 0]):
        np.testing.assert_array_equal(pixels, load_and_preprocess_one(png(seed), CONFIG))
    reader = storage.BlockReader.open(memfs, "/bkt/big-0.tar", "big-0", block_size=700)
    assert reader.read() == memfs.cat_file("/bkt/big-0.tar")
    reader.seek(650)
    assert reader.read(100) == memfs.cat_file("/bkt/big-0.tar")[650:750]
    reader.close()


def test_pipe_sources_name_rows_by_sample_key_and_report_a_failing_command(tmp_path):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(tar_bytes([("a/000001.jpg", png(1)), ("a/000001.json", b"{}"),
                                 ("a/000002.png", png(2))]))
    command = f"pipe:{sys.executable} -c \"import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())\" {shard}"
    rows = decoded(iter_inputs([command, "pipe:echo oops >&2; exit 3"]))
    assert [name for name, _ in rows[:2]] == ["a/000001", "a/000002"]
    np.testing.assert_array_equal(rows[1][1], load_and_preprocess_one(png(2), CONFIG))
    assert rows[2][0] == "pipe:echo oops >&2; exit 3"
    assert rows[2][1] == "the command exited with status 3: oops"


def test_parquet_tables_img2dataset_and_hf_image_struct(memfs, tmp_path):
    img2dataset = pa.table({"key": ["000", "001", "002"], "caption": ["a", "b", "c"],
                            "jpg": [png(0), None, png(2)]})
    buffer = io.BytesIO()
    pq.write_table(img2dataset, buffer)
    memfs.pipe_file("/bkt/part-0.parquet", buffer.getvalue())
    (tmp_path / "side.png").write_bytes(png(7))
    hf = pa.table({"image": [{"bytes": png(5), "path": "five.png"},
                             {"bytes": None, "path": "side.png"}], "label": [0, 1]})
    with pa.OSFile(str(tmp_path / "hf.arrow"), "wb") as sink:  # datasets' Arrow stream
        with pa.ipc.new_stream(sink, hf.schema) as writer:
            writer.write_table(hf)
    inputs = ["memory://bkt/part-0.parquet", str(tmp_path / "hf.arrow")]
    check_inputs(inputs)
    rows = decoded(iter_inputs(inputs))
    assert [name for name, _ in rows] == ["000", "001", "002", "five.png",
                                          str(tmp_path / "side.png")]
    assert rows[1][1] == "no image in column 'jpg' of row 1"
    np.testing.assert_array_equal(rows[4][1], load_and_preprocess_one(png(7), CONFIG))
    with pytest.raises(OptionError, match=r"^image_column 'photo' is not a column of "
                                          r".*part-0.parquet \(columns: key, "):
        check_inputs(["memory://bkt/part-0.parquet"], image_column="photo")
    named = list(iter_inputs(["memory://bkt/part-0.parquet"], id_column="caption"))
    assert [item.name for item in named] == ["a", "b", "c"]


def test_http_urls_are_read_from_a_local_web_server(tmp_path):
    pytest.importorskip("aiohttp")
    import functools
    import http.server

    (tmp_path / "a.png").write_bytes(png(3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        rows = decoded(iter_inputs([f"{base}/a.png", f"{base}/missing.png"]))
    finally:
        server.shutdown()
    np.testing.assert_array_equal(rows[0][1], load_and_preprocess_one(png(3), CONFIG))
    assert rows[1] == (f"{base}/missing.png", "no such object")


def test_missing_objects_and_patterns_fail_before_any_work(memfs):
    memfs.pipe_file("/bkt/a.png", png(0))
    with pytest.raises(DataError, match=r"^memory://bkt/\*.tar: no objects match"):
        check_inputs(["memory://bkt/*.tar"])
    with pytest.raises(DataError, match=r"^memory://bkt/list.txt: no such object$"):
        check_inputs(["memory://bkt/list.txt"])


def test_checked_inputs_keep_their_glob_listing_and_report_the_first_failure(memfs):
    """check_inputs hands its listing on (iter_inputs does not list the glob again), and of
    checks run in parallel, the first failing input in order is the one reported."""
    for name in ("a", "b"):
        memfs.pipe_file(f"/bkt/{name}.png", png(0))
    checked = check_inputs(["memory://bkt/*.png"])
    memfs.pipe_file("/bkt/c.png", png(1))  # after the check: not in its listing
    assert check_inputs(checked) is checked
    assert [item.name for item in iter_inputs(checked)] == [
        "memory:///bkt/a.png", "memory:///bkt/b.png"]
    assert [item.name for item in iter_inputs(["memory://bkt/*.png"])][-1] == \
        "memory:///bkt/c.png"
    for shard in (*range(20), 25):
        memfs.pipe_file(f"/bkt/s-{shard}.tar", tar_bytes([("x.png", png(2))]))
    with pytest.raises(DataError, match=r"^memory://bkt/s-20.tar: no such object$"):
        check_inputs(["memory://bkt/s-{0..40}.tar"])


def test_a_protocol_without_its_extra_names_the_extra(monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(DataError) as raised:
        check_inputs(["s3://bucket/images/"])
    assert str(raised.value) == ("s3://bucket/images/: reading s3:// URLs needs an extra "
                                 "package: pip install 'flax-captioner[s3]'")


def test_transient_errors_are_retried_and_permanent_ones_are_not(monkeypatch):
    monkeypatch.setattr(storage, "_BACKOFF_SECONDS", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "0.2")
    assert storage.with_retries(flaky, "s3://b/x.jpg") == b"ok" and len(calls) == 3
    # A store that keeps failing stops the run (StorageError), never an error row.
    with pytest.raises(StorageError, match=r"^s3://b/y.jpg: the store still failed after "
                                           r"0.2 s of retries: timed out"):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("timed out")),
                             "s3://b/y.jpg")
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("b/z.jpg")

    with pytest.raises(ImageReadError, match=r"^s3://b/z.jpg: no such object$"):
        storage.with_retries(missing, "s3://b/z.jpg")
    assert len(calls) == 1


def test_bytes_in_flight_stay_within_the_budget():
    """16 fetch threads, objects of 1,000 bytes, a 3,000-byte budget: at most 3 fetched and
    not yet decoded at any time, and order and results unchanged."""
    budget_seen = []
    prefetcher = storage.Prefetcher(threads=16, bytes_in_flight=3000)
    lock = threading.Lock()

    def decode(data: bytes) -> int:
        with lock:
            budget_seen.append(prefetcher.budget.in_use)
        time.sleep(0.01)
        return len(data)

    with prefetcher, concurrent.futures.ThreadPoolExecutor(1) as decoder:
        futures = [prefetcher.submit(lambda index=index: bytes(1000 + index), 1000, decoder,
                                     decode, lambda error: None) for index in range(20)]
        assert [future.result() for future in futures] == [1000 + index for index in range(20)]
    assert max(budget_seen) <= 3000 + 3 * 19 and prefetcher.budget.in_use == 0


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_object_outputs_commit_chunks_and_resume_exactly(memfs, output_format):
    url = f"memory://out/captions.{output_format}"
    rows = [{"image": f"img{index}", "caption": f"c{index}", "score": -0.5} for index in range(7)]
    writer = writers.open_writer(url, output_format, resume=True)
    writer.flush_rows = 2
    writer.write(rows[:3])
    writer.write(rows[3:5])
    # A kill here: 5 rows committed as 2 chunks, nothing else.
    assert sorted(memfs.ls("/out/captions." + output_format + ".chunks", detail=False)) == [
        f"/out/captions.{output_format}.chunks/chunk-000000-00000003.{output_format}",
        f"/out/captions.{output_format}.chunks/chunk-000001-00000002.{output_format}"]
    resumed = writers.open_writer(url, output_format, resume=True)
    assert (resumed.rows_done, list(resumed.images())) == (5, [f"img{i}" for i in range(5)])
    resumed.write(rows[5:])
    resumed.close()
    assert list(writers.read_rows(url, output_format)) == rows
    assert not memfs.exists(f"/out/captions.{output_format}.chunks/chunk-000000-00000003."
                            f"{output_format}")
    extended = writers.open_writer(url, output_format, resume=True)
    assert extended.rows_done == 7
    extended.close()
    assert list(writers.read_rows(url, output_format)) == rows
    assert writers.open_writer(url, output_format, resume=False).rows_done == 0


def test_object_output_of_other_rows_is_refused(memfs):
    memfs.pipe_file("/out/x.jsonl", b"{\"not\": 1}\n")
    with pytest.raises(OutputError, match=r"^memory://out/x.jsonl: exists but is not a jsonl"):
        writers.open_writer("memory://out/x.jsonl", "jsonl", resume=True)


def test_multi_process_parts_on_a_store_merge_in_input_order(memfs):
    rows = [{"image": f"img{index}", "caption": "c", "score": -1.0} for index in range(7)]
    output = "memory://out/merged.parquet"
    for process in range(3):
        writers.write_rows(writers.part_path(output, process, 3), "parquet", rows[process::3])
    assert writers.merge_shards(output) == 7
    assert list(writers.read_rows(output, "parquet")) == rows
    assert memfs.ls("/out", detail=False) == ["/out/merged.parquet"]
