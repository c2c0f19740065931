"""An output is owned by one run, made with one setting, from one input set: the output's
lock (two real processes; S3 leases on a real S3-protocol server), its manifest (resumes
with other settings, models or inputs refused; foreign files never touched) and object-store
finishes that appear whole or not at all."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flax_captioner import cli, ownership
from flax_captioner.errors import OptionError, OutputError
from flax_captioner.options import CaptionOptions
from flax_captioner.pipeline import run_pipeline
from flax_captioner.testing import make_checkpoint, moto_s3
from flax_captioner.writers import ObjectChunkWriter, manifest_path

SETTINGS = {"num_beams": 2, "max_length": 6, "batch_size": 4, "decode_threads": 2}


def write_images(directory: Path, count: int, start: int = 0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start, start + count):
        pixels = np.random.RandomState(seed).randint(0, 256, (14, 20, 3), dtype=np.uint8)
        path = directory / f"img{seed:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def run(captioner, inputs, output, **options):
    return run_pipeline([str(spec) for spec in inputs], str(output),
                        CaptionOptions(**{**SETTINGS, **options}), captioner)


def rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the lock: one run at a time ----------------------------------------------------------

# A run whose first batch waits for a gate file: it holds its output while the test acts.
_GATED_RUN = textwrap.dedent("""
    import os, sys, time
    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import Generator
    from flax_captioner.options import CaptionOptions
    from flax_captioner.pipeline import run_pipeline

    model, images, output, gate = sys.argv[1:5]
    dispatch = Generator.dispatch
    def gated(self, *args, **kwargs):
        print("holding", flush=True)
        while not os.path.exists(gate):
            time.sleep(0.05)
        return dispatch(self, *args, **kwargs)
    Generator.dispatch = gated
    options = CaptionOptions(num_beams=2, max_length=6, batch_size=4, decode_threads=2)
    run_pipeline([images], output, options, Captioner.from_pretrained(model))
""")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_second_run_on_an_output_is_refused_at_once_and_the_first_finishes_whole(
        tiny_checkpoint, tmp_path, subprocess_env, suffix):
    images = write_images(tmp_path / "images", 10)
    output, gate = tmp_path / f"out{suffix}", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", _GATED_RUN, str(tiny_checkpoint),
                              str(tmp_path / "images"), str(output), str(gate)],
                             stdout=subprocess.PIPE, text=True, env=subprocess_env)
    try:
        assert first.stdout.readline() == "holding\n"
        second = subprocess.run(
            [sys.executable, "-m", "flax_captioner.cli", "caption", str(tmp_path / "images"),
             "--model", str(tiny_checkpoint), "-o", str(output), "--num-beams", "2",
             "--max-length", "6"], capture_output=True, text=True, env=subprocess_env,
            timeout=300)
        assert second.returncode == 1, second.stderr
        message = second.stderr.strip().splitlines()
        assert len(message) == 1 and "another run is writing it" in message[0], message
        assert f"process {first.pid} on " in message[0] and "--output" in message[0]
        gate.touch()
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait()
    assert [row["image"] for row in rows(output)] == images  # each image once, readable
    assert not Path(f"{output}.lock").exists() and Path(manifest_path(str(output))).exists()


def test_the_lock_dies_with_its_process(captioner, tmp_path):
    output = tmp_path / "out.jsonl"
    write_images(tmp_path / "images", 3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flax_captioner import ownership\n"
         "with ownership.lock_output(sys.argv[1]):\n print('locked', flush=True)\n"
         " time.sleep(600)", str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputError, match=f"process {holder.pid} on"):
            run(captioner, [tmp_path / "images"], output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(captioner, [tmp_path / "images"], output).captioned == 3


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint},
                               skip_instance_cache=True)
        fs.mkdir("bucket")
        yield {"client_kwargs": {"endpoint_url": endpoint}}


def test_an_s3_lease_is_exclusive_renewed_and_taken_over_once_it_expires(s3):
    url = "s3://bucket/lease/out.parquet"
    with ownership.lock_output(url, s3, lease_seconds=1.5) as held:
        with pytest.raises(OutputError, match=r"another run is writing it \(process "
                                              rf"{os.getpid()} on .* lease ends in"):
            with ownership.lock_output(url, s3):
                pass
        time.sleep(2.5)  # longer than a lease: renewals keep it
        with pytest.raises(OutputError, match="another run is writing it"):
            with ownership.lock_output(url, s3):
                pass
        held.check()
    fs = fsspec.filesystem("s3", **s3, skip_instance_cache=True)
    assert not fs.exists("bucket/lease/out.parquet.lock")  # released

    # A run that died holding it: its lease expires, and one of two successors takes over.
    fs.pipe_file("bucket/lease/out.parquet.lock/00000007",
                 json.dumps({"pid": 1, "host": "gone", "expires": time.time() - 1}).encode())
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def successor() -> None:
        barrier.wait()
        try:
            with ownership.lock_output(url, s3) as lock:
                outcomes.append(lock.name)
                time.sleep(1.0)
        except OutputError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=successor) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [outcome for outcome in outcomes if outcome.endswith("/00000008")]
    assert len(winners) == 1, outcomes
    assert "another run is writing it" in next(o for o in outcomes if o not in winners)


def test_an_s3_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(s3):
    """A run killed here (kill -9, a crash) leaves a live lease; its successor on the same
    host sees its process gone and need not wait for the lease to run out."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    fs = fsspec.filesystem("s3", **s3, skip_instance_cache=True)
    fs.pipe_file("bucket/dead/out.jsonl.lock/00000003", json.dumps({
        "host": socket.gethostname(), "pid": int(gone.stdout), "started": time.time(),
        "expires": time.time() + 3600}).encode())
    with ownership.lock_output("s3://bucket/dead/out.jsonl", s3) as lock:
        assert lock.name.endswith("/00000004")
    assert not fs.exists("bucket/dead/out.jsonl.lock")


def test_an_s3_owner_whose_lease_was_taken_over_stops(s3):
    url = "s3://bucket/lost/out.jsonl"
    fs = fsspec.filesystem("s3", **s3, skip_instance_cache=True)
    with ownership.lock_output(url, s3, lease_seconds=1.2) as held:
        fs.pipe_file("bucket/lost/out.jsonl.lock/00000002", b'{"pid": 2, "expires": 0}')
        time.sleep(1.0)  # one renewal period and a margin
        with pytest.raises(OutputError, match="lost the output's lock: another run took"):
            held.check()


# ---- nothing touched before the checks; foreign files never ------------------------------

def test_a_file_that_is_not_this_tools_output_is_never_touched(captioner, tmp_path):
    images = write_images(tmp_path / "images", 3)
    dataset = tmp_path / "dataset.parquet"
    pq.write_table(pa.table({"image": [b"not used"], "key": ["a"]}), dataset)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"id": 1}\n')
    for foreign in (dataset, notes):
        before = foreign.read_bytes()
        for resume in (True, False):
            with pytest.raises(OutputError, match="is not a flax-captioner output"):
                run(captioner, images, foreign, resume=resume)
        assert foreign.read_bytes() == before
        assert not Path(f"{foreign}.chunks").exists()
        assert not Path(manifest_path(str(foreign))).exists()


def test_an_output_that_is_also_an_input_is_refused(captioner, tmp_path):
    table = tmp_path / "table.parquet"
    pixels = np.zeros((8, 8, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    pq.write_table(pa.table({"image": [buffer.getvalue()], "key": ["k"]}), table)
    before = table.read_bytes()
    for inputs in ([table], [tmp_path / "*.parquet"]):
        with pytest.raises(OutputError, match="is also an input"):
            run(captioner, inputs, table, resume=False)
    assert table.read_bytes() == before


def test_another_format_on_a_finished_output_is_refused_before_it_is_touched(
        captioner, tmp_path):
    images = write_images(tmp_path / "images", 3)
    output = tmp_path / "captions.out"
    run(captioner, images, output, output_format="parquet")
    before = output.read_bytes()
    with pytest.raises(OutputError, match="holds parquet rows, not the jsonl asked for"):
        run(captioner, images, output, output_format="jsonl")
    assert output.read_bytes() == before and pq.read_table(output).num_rows == 3
    # Starting over in the other format is the user's call, and it is this tool's file.
    assert run(captioner, images, output, output_format="jsonl", resume=False).captioned == 3
    assert len(output.read_text().splitlines()) == 3


def test_the_command_line_refuses_a_foreign_output_before_loading(tmp_path, capsys):
    write_images(tmp_path / "images", 2)
    output = tmp_path / "theirs.jsonl"
    output.write_text('{"theirs": true}\n')
    status = cli.main(["caption", str(tmp_path / "images"), "--model",
                       str(tmp_path / "no-such-model"), "-o", str(output), "--no-resume"])
    error = capsys.readouterr().err
    assert status == 1 and "is not a flax-captioner output" in error
    assert "write to another --output" in error and "no-such-model" not in error
    assert output.read_text() == '{"theirs": true}\n'


# ---- the manifest: one setting, one model, one input set ---------------------------------

@pytest.mark.parametrize("change,named", [
    ({"num_beams": 1, "max_length": 5}, "max_length 6 -> 5; num_beams 2 -> 1"),
    ({"dtype": "bfloat16"}, "dtype 'float32' -> 'bfloat16'"),
    ({"token_logprobs": True}, "token_logprobs False -> True"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(captioner, tmp_path, change,
                                                             named):
    images = write_images(tmp_path / "images", 6)
    output = tmp_path / "out.jsonl"
    run(captioner, images[:3], output)  # what a killed run leaves
    before = output.read_bytes()
    with pytest.raises(OutputError, match="its rows were made otherwise") as raised:
        run(captioner, images, output, **change)
    assert named in str(raised.value) and output.read_bytes() == before
    assert run(captioner, images, output).resumed == 3  # the same settings resume


def test_a_resume_with_another_model_is_refused(captioner, tmp_path):
    images = write_images(tmp_path / "images", 4)
    output = tmp_path / "out.parquet"
    run(captioner, images[:2], output)
    from flax_captioner.captioner import Captioner

    other = Captioner.from_pretrained(make_checkpoint(tmp_path / "other", seed=5))
    with pytest.raises(OutputError, match=r"model .* \(other weights\)"):
        run(other, images, output)
    assert pq.read_table(output).num_rows == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_resume_over_changed_inputs_is_refused_and_extend_adds_only_new_ones(
        captioner, tmp_path, suffix):
    directory = tmp_path / "images"
    images = write_images(directory, 5)
    output = tmp_path / f"out{suffix}"
    run(captioner, [directory], output)
    before = output.read_bytes()
    os.remove(images[1])  # one captioned file gone, one new one
    added = write_images(directory, 1, start=50)
    with pytest.raises(OutputError, match=r"row 2 of its 5 is .*img001\.png' where these "
                                          r"inputs give .*img002\.png'.*other inputs"):
        run(captioner, [directory], output)
    assert output.read_bytes() == before and not Path(f"{output}.chunks").exists()
    stats = run(captioner, [directory], output, extend=True)
    assert (stats.resumed, stats.captioned) == (5, 1)
    assert [row["image"] for row in rows(output)] == images + added
    assert run(captioner, [directory], output, extend=True).captioned == 0


def test_extend_needs_the_rows_it_adds_to():
    with pytest.raises(OptionError, match="extend adds to the output's rows"):
        CaptionOptions(extend=True, resume=False)


# ---- object-store finishes: whole or not at all ------------------------------------------

def test_a_failed_object_store_finish_leaves_no_partial_object(s3):
    url = "s3://bucket/finish/out.parquet"
    writer = ObjectChunkWriter(url, "parquet", resume=False, flush_rows=2,
                               storage_options=s3)
    for first in (0, 2):  # two chunks committed
        writer.write([{"image": f"img{index}", "caption": "a", "score": -1.0}
                      for index in range(first, first + 2)])
    fs = fsspec.filesystem("s3", **s3, skip_instance_cache=True)
    chunks = sorted(fs.ls("bucket/finish/out.parquet.chunks", refresh=True))
    fs.pipe_file(chunks[1], b"not parquet")  # the combine fails after the first table
    with pytest.raises(OutputError, match="cannot write the final object"):
        writer.close()
    assert not fs.exists("bucket/finish/out.parquet")
    assert sorted(fs.ls("bucket/finish/out.parquet.chunks", refresh=True)) == chunks
