"""A storage outage is not a bad image: failures of the store (refused or cut connections,
timeouts, 5xx) are retried for a bounded window, then stop the run with one StorageError line,
committed rows kept; a rerun continues. Unit checks of the retry and the feed, then a real S3
server (moto on 127.0.0.1) reached through a TCP proxy that is taken down mid-run."""

from __future__ import annotations

import errno
import http.server
import io
import itertools
import json
import re
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from flax_captioner import feed, storage
from flax_captioner.errors import DataError, ImageReadError, StorageError
from flax_captioner.generator import Generator
from flax_captioner.options import CaptionOptions
from flax_captioner.pipeline import run_pipeline
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.sources import InputItem, iter_inputs
from flax_captioner.testing import TcpProxy, moto_s3, tar_bytes, write_shapes_jpegs
from flax_captioner.writers import read_rows

REPO = Path(__file__).resolve().parent.parent
SHAPES_MODEL = REPO / "examples" / "shapes-captioner"
SETTINGS = {"num_beams": 2, "max_length": 12}
COMMITTED = ("the rows committed so far are kept, and running the same command again "
             "continues from them")
IMAGES = 26  # more than the feed reads ahead of the device (window + ready batches)


def png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (5, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def waits(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "flax_captioner.storage"]


# --- the retry, without a server ------------------------------------------------------------

@pytest.fixture()
def quick_backoff(monkeypatch):
    monkeypatch.setattr(storage, "_BACKOFF_SECONDS", 0.01)


def test_store_failures_are_retried_through_the_window_and_logged_once(quick_backoff, caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return b"ok"

    assert storage.with_retries(flaky, "s3://b/x.jpg", within=30) == b"ok" and len(calls) == 4
    assert waits(caplog) == ["s3://b/x.jpg: the store failed ([Errno 111] Connection refused); "
                             "retrying for up to 30 s"]


def test_a_store_still_failing_after_the_window_is_one_storage_error(quick_backoff):
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("timed out")),
                             "s3://b/y.jpg", within=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert str(raised.value) == (f"s3://b/y.jpg: the store still failed after 0.3 s of "
                                 f"retries: timed out; {COMMITTED}")
    assert not isinstance(raised.value, ImageReadError)  # never an error row


@pytest.mark.parametrize("error, reason", [
    (FileNotFoundError("b/z.jpg"), "no such object"),
    (PermissionError("Forbidden"), "access denied: Forbidden"),
    (OSError(errno.EINVAL, "InvalidRange"), "cannot read the object: [Errno 22] InvalidRange"),
    (ValueError("Attempt to open non key-like path: b"),  # s3fs, for a bucket's name
     "cannot read the object: Attempt to open non key-like path: b"),
])
def test_failures_about_the_object_are_error_rows_at_once(error, reason):
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(ImageReadError) as raised:
        storage.with_retries(fail, "s3://b/z.jpg", within=30)
    assert raised.value.reason == reason and len(calls) == 1


@pytest.mark.parametrize("error", [
    UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),
    json.JSONDecodeError("Expecting value", "<html>", 0),
    TypeError("string indices must be integers, not 'str'"),
], ids=["not UTF-8", "not JSON", "JSON but not an object"])
def test_a_response_the_client_cannot_decode_is_the_stores_failure(error, quick_backoff):
    """What gcsfs raises for a 5xx page it cannot read (the test below has it from a real
    client): retried like any failure of the store, never an error row."""
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise error
        return b"ok"

    assert storage.with_retries(flaky, "gs://b/x.jpg", within=30) == b"ok" and len(calls) == 3


def test_the_window_comes_from_the_environment(monkeypatch, quick_backoff):
    assert storage.retry_seconds() == storage.RETRY_SECONDS
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "0")
    with pytest.raises(StorageError, match=r"after 0 s of retries: reset"):
        storage.with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), "x")
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "soon")
    with pytest.raises(DataError, match=r"^FLAX_CAPTIONER_RETRY_SECONDS='soon': must be a "
                                        r"number of seconds >= 0$"):
        storage.with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), "x")


def failing_store(name: str) -> StorageError:
    return StorageError(name, "the store still failed after 1 s of retries: refused")


@pytest.mark.parametrize("source", ["fetch", "read_bytes"])
def test_a_storage_error_leaves_the_feed_after_the_items_before_it(source):
    """Loose objects (fetched on I/O threads) and stream members (read in order): the items
    before the failing one come out, then the StorageError, not an error row."""

    def reader(index: int):
        def read() -> bytes:
            if index == 5:
                raise failing_store(f"s3://b/{index}.png")
            return png(index)

        return read

    items = [InputItem(index, f"s3://b/{index}.png", **{source: reader(index)})
             for index in range(8)]
    seen = []
    with pytest.raises(StorageError, match=r"^s3://b/5.png: "):
        with feed.batches(items, PreprocessConfig(size=(4, 4)), 2, num_threads=2) as batches:
            for batch in batches:
                assert batch.errors == [None] * len(batch.items)
                seen.extend(item.index for item in batch.items)
    assert seen == [0, 1, 2, 3, 4]


def test_a_shard_the_store_cannot_serve_stops_the_inputs_instead_of_an_error_row(
        monkeypatch, quick_backoff):
    """The second shard is opened in the background while the first is read; its failure
    comes after the first shard's members, as a StorageError naming it."""
    fs = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("0.png")
        info.size = len(png(0))
        archive.addfile(info, io.BytesIO(png(0)))
    for shard in ("a", "b"):
        fs.pipe_file(f"/outage/{shard}.tar", buffer.getvalue())
    cat_file = type(fs).cat_file

    def refused(self, path, *args, **kwargs):
        if path.endswith("b.tar"):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "cat_file", refused)
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "0.2")
    names = []
    try:
        with pytest.raises(StorageError, match=r"^memory://outage/b.tar: the store still "
                                               r"failed after 0.2 s of retries: "):
            names.extend(item.name for item in iter_inputs(["memory://outage/{a,b}.tar"]))
    finally:
        fs.rm("/outage", recursive=True)
    assert names == ["memory://outage/a.tar/0.png"]


# --- a real S3 server behind a proxy that goes down -----------------------------------------

@pytest.fixture(scope="module")
def endpoint():
    pytest.importorskip("moto.server")
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="module")
def bucket(endpoint):
    """The server reached directly (never down), with bucket ``outage``: to put inputs and
    read outputs. The moto servers of one process share their buckets (tests/test_s3.py's)."""
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    if not fs.exists("outage"):
        fs.mkdir("outage")
    return fs


@pytest.fixture()
def proxy(endpoint):
    with TcpProxy(endpoint) as proxy:
        yield proxy


@pytest.fixture()
def options(proxy):
    """The run's storage options: the server through the proxy. botocore's own retries are
    off, so a refused request fails in milliseconds and the tests' short windows hold."""
    return {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_shapes_jpegs(tmp_path_factory.mktemp("outage"), IMAGES)[0]


@pytest.fixture(scope="module")
def captioner():
    if not SHAPES_MODEL.is_dir():
        pytest.skip(f"{SHAPES_MODEL} is missing")
    from flax_captioner.captioner import Captioner

    return Captioner.from_pretrained(str(SHAPES_MODEL))


def outage_at_second_batch(monkeypatch, proxy: TcpProxy, seconds: float | None = None) -> None:
    """Takes ``proxy`` down as the second batch goes to the device (the first one's rows are
    then written), and back up ``seconds`` later (None: it stays down)."""
    dispatch = Generator.dispatch
    calls = itertools.count()

    def dispatch_then_fail(self, *args, **kwargs):
        if next(calls) == 1:
            proxy.down()
            if seconds is not None:
                timer = threading.Timer(seconds, proxy.up)
                timer.daemon = True
                timer.start()
        return dispatch(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "dispatch", dispatch_then_fail)


def caption_options(options: dict) -> CaptionOptions:
    return CaptionOptions(batch_size=2, decode_threads=1, progress=False, flush_seconds=0,
                          storage_options=options, **SETTINGS)


def assert_each_image_once(rows: list[dict], names: list[str]) -> None:
    assert [row["image"] for row in rows] == names
    assert all("caption" in row and "error" not in row for row in rows)


def test_an_outage_shorter_than_the_window_loses_no_image(
        captioner, endpoint, bucket, proxy, options, images, monkeypatch, caplog):
    """Inputs and the output on the store: the fetches and the chunk PUTs wait the outage
    out."""
    bucket.put([str(path) for path in images], "outage/short/")
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "60")
    outage_at_second_batch(monkeypatch, proxy, seconds=2)
    stats = run_pipeline(["s3://outage/short/"], "s3://outage/out/short.jsonl",
                         caption_options(options), captioner)
    assert stats.captioned == IMAGES and stats.errors == 0
    assert_each_image_once(list(read_rows("s3://outage/out/short.jsonl", "jsonl",
                                          {"endpoint_url": endpoint})),
                           [f"s3://outage/short/{path.name}" for path in images])
    assert waits(caplog) and all(line.endswith("retrying for up to 60 s")
                                 for line in waits(caplog))


def test_an_outage_longer_than_the_window_stops_the_command_and_a_rerun_finishes(
        bucket, proxy, options, images, monkeypatch, tmp_path, capsys):
    from flax_captioner.cli import main

    bucket.put([str(path) for path in images], "outage/long/")
    output = tmp_path / "long.jsonl"
    command = ["caption", "s3://outage/long/", "--model", str(SHAPES_MODEL), "--batch-size", "2",
               "--threads", "1", "--num-beams", "2", "--max-length", "12",
               "--storage-options", json.dumps(options), "-o", str(output)]
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "2")
    outage_at_second_batch(monkeypatch, proxy)
    assert main(command) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    waiting = [line for line in lines if "retrying for up to" in line]
    assert waiting and all(re.search(  # a progress bar may precede it on its line
        r"flax-captioner: s3://outage/long/shapes_\d{5}\.jpg: the store failed \(.+\); "
        r"retrying for up to 2 s$", line) for line in waiting)
    assert re.fullmatch(r"flax-captioner: error: s3://outage/long/shapes_\d{5}\.jpg: the store "
                        r"still failed after 2 s of retries: .+; " + re.escape(COMMITTED),
                        lines[-1])
    names = [f"s3://outage/long/{path.name}" for path in images]
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert 2 <= len(kept) < IMAGES
    assert_each_image_once(kept, names[:len(kept)])

    proxy.up()
    monkeypatch.undo()  # the store stays up
    assert main(command) == 0
    assert_each_image_once([json.loads(line) for line in output.read_text().splitlines()],
                           names)


def shard_with_filler(images: list[Path], filler_after: int) -> bytes:
    """A tar shard of ``images`` with a 2 MB non-image member after the first
    ``filler_after``: reading on past it needs blocks fetched after the outage began."""
    members = [(path.name, path.read_bytes()) for path in images]
    members.insert(filler_after, ("filler.bin", np.random.RandomState(0).bytes(2_000_000)))
    return tar_bytes(members)


def test_an_outage_mid_shard_stops_the_run_and_a_rerun_finishes_the_shard(
        captioner, bucket, proxy, options, images, monkeypatch, tmp_path, caplog):
    from flax_captioner import sources

    # Blocks of 256 KiB: the shard streams through the block reader, read as the feed goes.
    monkeypatch.setattr(sources, "_REMOTE_BLOCK_SIZE", 256 << 10)
    bucket.pipe_file("outage/tar/shard-0.tar", shard_with_filler(images, IMAGES - 6))
    output = str(tmp_path / "tar.jsonl")
    monkeypatch.setenv("FLAX_CAPTIONER_RETRY_SECONDS", "2")
    outage_at_second_batch(monkeypatch, proxy)
    with pytest.raises(StorageError) as raised:
        run_pipeline(["s3://outage/tar/shard-0.tar"], output, caption_options(options), captioner)
    assert str(raised.value).startswith("s3://outage/tar/shard-0.tar: the store still failed "
                                        "after 2 s of retries: ")
    assert waits(caplog)
    names = [f"s3://outage/tar/shard-0.tar/{path.name}" for path in images]
    kept = list(read_rows(output, "jsonl"))
    assert 2 <= len(kept) < IMAGES
    assert_each_image_once(kept, names[:len(kept)])

    proxy.up()
    stats = run_pipeline(["s3://outage/tar/shard-0.tar"], output, caption_options(options),
                         captioner)
    assert stats.resumed == len(kept) and stats.errors == 0
    assert_each_image_once(list(read_rows(output, "jsonl")), names)


# --- a real GCS emulator behind a load balancer that answers 503 ----------------------------

@pytest.fixture(scope="module")
def gcs():
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from flax_captioner.testing import gcs_emulator

    with gcs_emulator("data") as options:
        yield options


def maintenance_server(page: bytes) -> http.server.ThreadingHTTPServer:
    """What a load balancer answers while the store behind it is down: 503 and ``page``."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(503)
            self.send_header("Content-Type", "text/html; charset=iso-8859-1")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(page)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("page, cause", [
    ("<html>Service momentanément indisponible</html>".encode("latin-1"),
     "'utf-8' codec can't decode byte 0xe9"),
    (b'"unavailable"', "string indices must be integers"),
], ids=["Latin-1 page", "JSON string"])
def test_a_load_balancers_503_page_is_retried_not_an_error_row(gcs, page, cause, quick_backoff,
                                                               caplog):
    """gcsfs reads a 5xx page's message before its own retries see it: a page that is not
    UTF-8 raises UnicodeDecodeError (a ValueError), JSON that is not an object TypeError. Both
    are the store's failure: retried until the store is back, not an error row."""
    import gcsfs

    gcsfs.GCSFileSystem(**gcs, skip_instance_cache=True).pipe_file("data/lb.png", png(0))
    server = maintenance_server(page)
    try:
        with TcpProxy(gcs["endpoint_url"]) as proxy:
            store, proxy.target = proxy.target, server.server_address  # the store is down
            back = threading.Timer(1.0, setattr, (proxy, "target", store))
            back.start()
            try:
                fetch = storage.fetcher("gs://data/lb.png",
                                        {**gcs, "endpoint_url": proxy.url})
                started = time.monotonic()
                assert fetch() == png(0)
                assert time.monotonic() - started >= 1.0
            finally:
                back.cancel()
    finally:
        server.shutdown()
        server.server_close()
    (wait,) = waits(caplog)
    assert wait.startswith("gs://data/lb.png: the store failed (") and cause in wait
