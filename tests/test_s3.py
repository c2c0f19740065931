"""End to end against a real S3-protocol server (moto on 127.0.0.1, through s3fs): images
under a prefix, brace-pattern tar shards and a Parquet table of image bytes in, JSONL and
Parquet out to the bucket, captions equal to the same images read from local disk; broken
objects, a missing bucket and refused credentials; kill -9 and resume on the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_pipeline import write_tar  # noqa: E402

from flax_captioner.errors import DataError, OutputError  # noqa: E402
from flax_captioner.options import CaptionOptions  # noqa: E402
from flax_captioner.pipeline import run_pipeline  # noqa: E402
from flax_captioner.preflight import check_run  # noqa: E402
from flax_captioner.testing import enforce_credentials, moto_s3, write_shapes_jpegs  # noqa: E402
from flax_captioner.writers import read_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES_MODEL = REPO / "examples" / "shapes-captioner"
SETTINGS = {"num_beams": 2, "max_length": 12}


def shapes_jpegs(directory: Path, count: int) -> list[Path]:
    """``count`` images of the shapes dataset as JPEG files."""
    return write_shapes_jpegs(directory, count)[0]


def caption(captioner, inputs, output, options, batch_size=4):
    return run_pipeline(inputs, output, CaptionOptions(
        batch_size=batch_size, decode_threads=2, progress=False, storage_options=options,
        **SETTINGS), captioner)


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="module")
def options(endpoint):
    return {"endpoint_url": endpoint}


@pytest.fixture(scope="module")
def bucket(options):
    """An s3fs file system on the server, with buckets ``data`` and ``out``."""
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("data")
    fs.mkdir("out")
    return fs


@pytest.fixture(scope="module")
def captioner():
    if not SHAPES_MODEL.is_dir():
        pytest.skip(f"{SHAPES_MODEL} is missing")
    from flax_captioner.captioner import Captioner

    return Captioner.from_pretrained(str(SHAPES_MODEL))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return shapes_jpegs(tmp_path_factory.mktemp("local") / "images", 12)


@pytest.fixture(scope="module")
def local_captions(captioner, images) -> dict[str, str]:
    """file name -> caption, captioned from local disk."""
    output = images[0].parent.parent / "local.jsonl"
    caption(captioner, [str(images[0].parent)], str(output), None)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    return {Path(row["image"]).name: row["caption"] for row in rows}


def test_images_under_a_prefix_give_the_local_captions_in_jsonl_on_the_bucket(
        captioner, bucket, options, images, local_captions):
    bucket.put([str(path) for path in images], "data/loose/")
    stats = caption(captioner, ["s3://data/loose/"], "s3://out/loose.jsonl", options)
    rows = list(read_rows("s3://out/loose.jsonl", "jsonl", options))
    assert [row["image"] for row in rows] == [f"s3://data/loose/{path.name}" for path in images]
    assert [row["caption"] for row in rows] == [local_captions[path.name] for path in images]
    assert stats.captioned == 12 and not bucket.exists("out/loose.jsonl.chunks")


def test_brace_pattern_tar_shards_give_the_local_captions_in_parquet_on_the_bucket(
        captioner, bucket, options, images, local_captions, tmp_path):
    for shard in range(3):
        members = images[4 * shard:4 * shard + 4]
        payload = write_tar(tmp_path / "shard.tar", [
            (entry, data) for path in members
            for entry, data in ((path.name, path.read_bytes()),
                                (path.stem + ".txt", b"a caption"))]).read_bytes()
        bucket.pipe_file(f"data/shards/shard-{shard:04d}.tar", payload)
    caption(captioner, ["s3://data/shards/shard-{0000..0002}.tar"], "s3://out/shards.parquet",
            options)
    table = pq.read_table(bucket.open("out/shards.parquet", "rb"))
    assert table.column("image").to_pylist() == [
        f"s3://data/shards/shard-{index // 4:04d}.tar/{path.name}"
        for index, path in enumerate(images)]
    assert table.column("caption").to_pylist() == [local_captions[path.name] for path in images]
    assert not bucket.exists("out/shards.parquet.chunks")


def test_a_parquet_table_of_image_bytes_gives_the_local_captions(
        captioner, bucket, options, images, local_captions):
    table = pa.table({"key": [f"{index:09d}" for index in range(len(images))],
                      "caption": ["?"] * len(images),
                      "jpg": [path.read_bytes() for path in images]})
    with bucket.open("data/img2dataset/00000.parquet", "wb") as handle:
        pq.write_table(table, handle)
    caption(captioner, ["s3://data/img2dataset/00000.parquet"], "s3://out/table.jsonl",
            options)
    rows = list(read_rows("s3://out/table.jsonl", "jsonl", options))
    assert [row["image"] for row in rows] == table.column("key").to_pylist()
    assert [row["caption"] for row in rows] == [local_captions[path.name] for path in images]


def test_unreadable_objects_and_a_truncated_shard_become_error_rows(
        captioner, bucket, options, images, tmp_path):
    bucket.pipe_file("data/broken/a.jpg", images[0].read_bytes())
    bucket.pipe_file("data/broken/b.jpg", b"this is not a JPEG")
    bucket.pipe_file("data/broken/list.txt",
                     b"a.jpg\ns3://data/broken/gone.jpg\ns3://nobucket/c.jpg\n")
    whole = write_tar(tmp_path / "t.tar",
                      [(path.name, path.read_bytes()) for path in images[:3]]).read_bytes()
    bucket.pipe_file("data/broken/cut.tar", whole[:len(whole) // 2])
    caption(captioner, ["s3://data/broken/b.jpg", "s3://data/broken/list.txt",
                        "s3://data/broken/cut.tar"], "s3://out/broken.jsonl", options)
    rows = {row["image"]: row for row in read_rows("s3://out/broken.jsonl", "jsonl", options)}
    assert rows["s3://data/broken/b.jpg"]["error"] == "not an image PIL can identify"
    assert "caption" in rows["s3://data/broken/a.jpg"]
    assert rows["s3://data/broken/gone.jpg"]["error"] == "no such object"
    assert rows["s3://nobucket/c.jpg"]["error"] == "no such object"
    cut = [row for name, row in rows.items() if name.startswith("s3://data/broken/cut.tar")]
    assert "caption" in cut[0] and any("error" in row for row in cut)


def test_a_missing_bucket_fails_before_any_work_in_one_line(bucket, options):
    with pytest.raises(DataError) as raised:
        check_run(["s3://no-such-bucket/images/"], None,
                  CaptionOptions(storage_options=options))
    assert str(raised.value) == "s3://no-such-bucket/images/: bucket no-such-bucket does not exist"
    with pytest.raises(OutputError) as raised:
        check_run(["s3://data/loose/"], "s3://no-such-bucket/out.jsonl",
                  CaptionOptions(storage_options=options))
    assert str(raised.value).startswith("s3://no-such-bucket/out.jsonl: cannot write the output: ")
    assert "\n" not in str(raised.value)


def test_a_prefix_without_images_is_one_line_from_the_run(bucket, options, capsys):
    """The command line does not list a bucket prefix an extra time to look for images before
    the model loads; the run itself reports that there were none."""
    from flax_captioner.cli import main

    bucket.pipe_file("data/notes/readme.txt", b"no images here")
    status = main(["caption", "s3://data/notes/", "--model", str(SHAPES_MODEL),
                   "--storage-options", json.dumps(options)])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "flax-captioner: error: s3://data/notes/: no images to caption")


def test_a_command_line_run_lists_a_bucket_prefix_once(bucket, options, images, tmp_path,
                                                     monkeypatch):
    import s3fs

    from flax_captioner.cli import main

    for path in images[:2]:
        bucket.pipe_file(f"data/listed/{path.name}", path.read_bytes())
    listings = []
    find = s3fs.S3FileSystem.find
    monkeypatch.setattr(s3fs.S3FileSystem, "find",
                        lambda fs, path, *args, **kwargs: listings.append(path)
                        or find(fs, path, *args, **kwargs))
    assert main(["caption", "s3://data/listed/", "--model", str(SHAPES_MODEL), "--max-length",
                 "4", "--storage-options", json.dumps(options),
                 "-o", str(tmp_path / "listed.jsonl")]) == 0
    assert len((tmp_path / "listed.jsonl").read_text().splitlines()) == 2
    assert listings == ["data/listed"]  # the run's own listing, nothing before the load


def test_a_command_line_run_lists_a_glob_once_and_checks_each_shard_once(
        bucket, options, images, tmp_path, monkeypatch):
    """The check before the load keeps its glob listing for the run, and the run checks the
    brace-expanded shards no second time: at bucket scale each listing or check is requests.
    The output is probed twice: before the load, and by its writer as the run starts (the run
    probed it a third time in between)."""
    import s3fs

    from flax_captioner.cli import main

    for path in images[:2]:
        bucket.pipe_file(f"data/globbed/{path.name}", path.read_bytes())
    for shard in range(3):
        bucket.pipe_file(f"data/checked/part-{shard}.tar", write_tar(
            tmp_path / "part.tar", [(images[shard].name, images[shard].read_bytes())]
        ).read_bytes())
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec binds sync methods per instance
    calls = []
    for method in ("glob", "exists"):
        original = getattr(s3fs.S3FileSystem, method)
        monkeypatch.setattr(s3fs.S3FileSystem, method,
                            lambda fs, path, *args, _method=method, _original=original, **kwargs:
                            calls.append((_method, path)) or _original(fs, path, *args, **kwargs))
    write = s3fs.S3FileSystem._pipe_file

    async def pipe_file(fs, path, *args, **kwargs):
        if ".flax-captioner-probe-" in path:
            calls.append(("probe", path.split(".flax-captioner-probe-")[0]))
        return await write(fs, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", pipe_file)
    assert main(["caption", "s3://data/globbed/*.jpg", "s3://data/checked/part-{0..2}.tar",
                 "--model", str(SHAPES_MODEL), "--max-length", "4",
                 "--storage-options", json.dumps(options),
                 "-o", "s3://data/out/globbed.jsonl"]) == 0
    assert len(list(read_rows("s3://data/out/globbed.jsonl", "jsonl", options))) == 5
    # Whether the output holds anything (the object, its chunks) is asked before the load
    # and again under its lock; the writer asks once more whether a finished output is there
    # to extend.
    assert sorted(calls) == [("exists", f"data/checked/part-{shard}.tar") for shard in range(3)] \
        + [("exists", "data/out/globbed.jsonl")] * 3 \
        + [("exists", "data/out/globbed.jsonl.chunks")] * 2 \
        + [("glob", "data/globbed/*.jpg")] + [("probe", "data/out/globbed.jsonl")] * 2


def test_refused_credentials_fail_before_any_work_in_one_line(bucket, endpoint, images):
    bucket.pipe_file("data/auth/a.jpg", images[0].read_bytes())
    bad = {"endpoint_url": endpoint, "key": "AKIAWRONG", "secret": "wrong"}
    enforce_credentials(endpoint, True)
    try:
        with pytest.raises(DataError) as inputs:
            check_run(["s3://data/auth/"], None, CaptionOptions(storage_options=bad))
        with pytest.raises(OutputError) as output:
            check_run([str(images[0])], "s3://out/auth.jsonl",
                      CaptionOptions(storage_options=bad))
    finally:
        enforce_credentials(endpoint, False)
    assert str(inputs.value) == "s3://data/auth/: access denied: Forbidden"
    assert str(output.value).startswith("s3://out/auth.jsonl: cannot write the output: ")
    assert "\n" not in str(inputs.value) + str(output.value)


# A run slow enough to kill mid-way: one batch of 2 every 0.3 s, each committed to the bucket.
SLOW_RUN = textwrap.dedent("""
    import sys, time
    from flax_captioner import CaptionOptions
    from flax_captioner.captioner import Captioner
    from flax_captioner.pipeline import run_pipeline

    captioner = Captioner.from_pretrained(sys.argv[1])
    dispatch = captioner.generator.dispatch
    def slow_dispatch(*args, **kwargs):
        time.sleep(0.3)
        return dispatch(*args, **kwargs)
    captioner.generator.dispatch = slow_dispatch
    run_pipeline([sys.argv[2]], sys.argv[3], CaptionOptions(
        batch_size=2, decode_threads=1, num_beams=2, max_length=12, flush_seconds=0,
        progress=False), captioner)
""")


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_writes_every_image_exactly_once(
        captioner, bucket, endpoint, options, images, local_captions, tmp_path):
    bucket.put([str(path) for path in images], "data/kill/")
    env = dict(os.environ, FSSPEC_S3_ENDPOINT_URL=endpoint, JAX_PLATFORMS="cpu")
    killed = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(SHAPES_MODEL),
                               "s3://data/kill/", "s3://out/kill.jsonl"],
                              env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    committed = 0
    while committed < 4:
        assert killed.poll() is None, killed.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no rows committed in 180 s"
        time.sleep(0.05)
        chunks = bucket.ls("out/kill.jsonl.chunks", refresh=True) \
            if bucket.exists("out/kill.jsonl.chunks") else []
        committed = sum(int(name.rsplit("-", 1)[1].split(".")[0]) for name in chunks)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not bucket.exists("out/kill.jsonl")

    stats = caption(captioner, ["s3://data/kill/"], "s3://out/kill.jsonl", options,
                    batch_size=2)
    assert 4 <= stats.resumed < 12 and stats.resumed + stats.captioned == 12
    rows = list(read_rows("s3://out/kill.jsonl", "jsonl", options))
    assert [row["image"] for row in rows] == [f"s3://data/kill/{path.name}" for path in images]
    assert [row["caption"] for row in rows] == [local_captions[path.name] for path in images]
