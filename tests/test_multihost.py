"""Two real JAX processes on localhost (jax.distributed, CPU): each captions its slice into
its own part, process 0 merges once every process has reported success, and the result
equals a one-process run. A process that fails or is killed is named by the other within a
bounded time, and running both again resumes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import pytest

from flax_captioner import multihost
from flax_captioner.errors import ProcessGroupError

from test_pipeline import BEAM_SETTINGS, run, write_image

# JAX ends every process this long after one stops sending heartbeats (default 100 s);
# shortened so that a killed process ends the test soon, but longer than the survivor's last
# batch plus its KILLED_PEER_TIMEOUT_S, so that the pipeline's own timeout speaks first.
HEARTBEAT_TIMEOUT_S = 20
KILLED_PEER_TIMEOUT_S = 4
# How long the in-thread processes' finish waits, unless a test sets a shorter one.
FINISH_TIMEOUT_S = 10.0

PROCESS_SCRIPT = (f"HEARTBEAT_TIMEOUT_S = {HEARTBEAT_TIMEOUT_S}\n"
                  f"BEAM_SETTINGS = {BEAM_SETTINGS!r}\n") + textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    checkpoint, port, process_id, inputs, output = sys.argv[1:6]
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=120,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    from flax_captioner import CaptionOptions
    from flax_captioner.captioner import Captioner
    from flax_captioner.errors import CaptionerError
    from flax_captioner.pipeline import run_pipeline

    captioner = Captioner.from_pretrained(checkpoint)
    failure = os.environ.get("FAIL_PROCESS_1_AT_BATCH_2")  # "raise" or "kill"
    if failure:
        # Process 1 fails at its second batch once process 0 has reached its own second
        # (last) one, which process 0 starts only after the failure, so it reaches the end
        # of its run after it (had process 0 been slower, it would have heard of the failure
        # between its batches and stopped with one batch undone).
        marker = Path(os.environ["FAILURE_MARKER"])
        at_second_batch = marker.with_name(marker.name + ".process-0-at-batch-2")
        dispatch, calls = captioner.generator.dispatch, []

        def dispatch_around_failure(*args, **kwargs):
            calls.append(None)
            if len(calls) == 2 and jax.process_index() == 1:
                while not at_second_batch.exists():
                    time.sleep(0.05)
                marker.write_text(str(time.time()))
                if failure == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("simulated device failure")
            if len(calls) == 2:
                at_second_batch.touch()
                while not marker.exists():
                    time.sleep(0.05)
            return dispatch(*args, **kwargs)

        captioner.generator.dispatch = dispatch_around_failure
    try:
        timeout = float(os.environ.get("PROCESS_TIMEOUT_S", 600))
        stats = run_pipeline([inputs], output, CaptionOptions(
            batch_size=2, decode_threads=1, flush_seconds=0, process_timeout_seconds=timeout,
            **BEAM_SETTINGS), captioner)
    except CaptionerError as error:
        print(error, file=sys.stderr, flush=True)
        sys.exit(3)
    print(f"process {jax.process_index()} of {jax.process_count()}: {stats.captioned} captioned, "
          f"{stats.resumed} resumed", flush=True)
""")

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(captioner_source, images: Path, output: Path, env: dict[str, str],
           timeout: float = 120) -> list[tuple[int, str, str, float]]:
    """Runs both processes to their end: (returncode, stdout, stderr, end time) per process."""
    port = free_port()
    processes = [
        subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, str(captioner_source),
                          str(port), str(process_id), str(images), str(output)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for process_id in range(2)]
    ended = [None, None]
    try:
        deadline = time.monotonic() + timeout
        while None in ended and time.monotonic() < deadline:
            for process_id, process in enumerate(processes):
                if ended[process_id] is None and process.poll() is not None:
                    ended[process_id] = time.time()
            time.sleep(0.05)
    finally:
        for process in processes:
            process.kill()
    assert None not in ended, f"processes still running after {timeout} s: {ended}"
    return [(process.returncode, *process.communicate(), end)
            for process, end in zip(processes, ended)]


@pytest.fixture()
def images(tmp_path) -> Path:
    """8 inputs: 4 per process, 2 batches of 2 each."""
    root = tmp_path / "images"
    for seed in range(7):
        write_image(root / f"img{seed}.png", seed, size=(10 + seed, 9))
    (root / "broken.png").write_bytes(b"broken")  # error rows are sliced and merged too
    return root


@pytest.mark.slow
def test_two_processes_merge_into_the_single_process_output(captioner, captioner_source,
                                                            subprocess_env, images, tmp_path):
    single = tmp_path / "single.jsonl"
    run(captioner, [images], single, batch_size=2, decode_threads=1)
    output = tmp_path / "merged.jsonl"
    results = launch(captioner_source, images, output, subprocess_env)
    for returncode, _, stderr, _ in results:
        assert returncode == 0, stderr[-3000:]
    # 8 inputs round-robin over 2 processes: 4 each (one of process 0's is the broken one).
    assert "process 0 of 2: 3 captioned, 0 resumed" in results[0][1]
    assert "process 1 of 2: 4 captioned, 0 resumed" in results[1][1]
    assert output.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("merged.jsonl.part-*"))


@contextlib.contextmanager
def s3_bucket(name: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """A bucket on moto's S3 server: (s3fs file system, the workers' environment)."""
    s3fs = pytest.importorskip("s3fs")
    from flax_captioner.testing import CREDENTIALS, moto_s3

    with moto_s3() as endpoint:
        store = s3fs.S3FileSystem(endpoint_url=endpoint)
        store.mkdir(name)
        yield store, dict(FSSPEC_S3_ENDPOINT_URL=endpoint, **CREDENTIALS)


@contextlib.contextmanager
def gcs_bucket(name: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """A bucket on the GCS emulator: (gcsfs file system, the workers' environment)."""
    gcsfs = pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from flax_captioner.testing import fsspec_env, gcs_emulator

    with gcs_emulator(name) as options:
        yield gcsfs.GCSFileSystem(**options), fsspec_env(options)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_two_processes_merge_their_parts_on_an_object_store(
        captioner, captioner_source, subprocess_env, images, tmp_path, scheme):
    """Both processes probe the output and commit their parts as chunk objects, and process
    0 merges them, on S3 and on GCS (the store of TPU jobs, whose semantics differ: it
    refuses to delete a missing object, for one)."""
    single = tmp_path / "single.jsonl"
    run(captioner, [images], single, batch_size=2, decode_threads=1)
    with (s3_bucket if scheme == "s3" else gcs_bucket)("captions") as (store, store_env):
        # The endpoint reaches both processes through fsspec's standard configuration.
        results = launch(captioner_source, images, f"{scheme}://captions/merged.jsonl",
                         dict(subprocess_env, **store_env))
        for returncode, _, stderr, _ in results:
            assert returncode == 0, stderr[-3000:]
        store.invalidate_cache()
        assert store.cat_file("captions/merged.jsonl") == single.read_bytes()
        # The parts' manifests became the merged output's; no lock or part is left.
        assert store.find("captions") == ["captions/merged.jsonl",
                                          "captions/merged.jsonl.manifest.json"]


def assert_rerun_resumes(captioner, captioner_source, images, output, env, tmp_path, *,
                         kept_by_process_1: int) -> None:
    """Both processes again, unchanged: process 1 redoes only what it had not written
    (``4 - kept_by_process_1`` rows), and the merged output is the one-process run's."""
    results = launch(captioner_source, images, output, env)
    for returncode, _, stderr, _ in results:
        assert returncode == 0, stderr[-3000:]
    assert "process 0 of 2: 0 captioned, 4 resumed" in results[0][1]
    assert (f"process 1 of 2: {4 - kept_by_process_1} captioned, {kept_by_process_1} resumed"
            in results[1][1])
    single = tmp_path / "single.jsonl"
    run(captioner, [images], single, batch_size=2, decode_threads=1)
    assert output.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("merged.jsonl.part-*"))


@pytest.mark.slow
def test_a_failed_process_is_named_by_the_others_at_once_and_a_rerun_resumes(
        captioner, captioner_source, subprocess_env, images, tmp_path):
    output, marker = tmp_path / "merged.jsonl", tmp_path / "failed-at"
    failed, survivor = launch(captioner_source, images, output, dict(
        subprocess_env, FAIL_PROCESS_1_AT_BATCH_2="raise", FAILURE_MARKER=str(marker)))[::-1]
    assert failed[0] == 1 and "RuntimeError: simulated device failure" in failed[2]
    # Process 0 (exit 3: the script's CaptionerError) ends right after its last batch, not
    # after a barrier's timeout (30 s on CPU) or JAX's shutdown barrier's (300 s).
    assert survivor[0] == 3, survivor[2][-3000:]
    assert survivor[3] - float(marker.read_text()) < 25
    assert survivor[2].strip().splitlines()[-1] == (
        f"{output}: process 1 of 2 failed: RuntimeError: simulated device failure; process 0 "
        "stopped, keeping its work; run every process again to resume")
    assert not output.exists()
    # Failing to dispatch its second batch, process 1 still wrote the first one's rows.
    assert_rerun_resumes(captioner, captioner_source, images, output, subprocess_env, tmp_path,
                         kept_by_process_1=2)


@pytest.mark.slow
def test_a_killed_process_is_named_after_the_timeout_and_a_rerun_resumes(
        captioner, captioner_source, subprocess_env, images, tmp_path):
    output, marker = tmp_path / "merged.jsonl", tmp_path / "failed-at"
    killed, survivor = launch(captioner_source, images, output, dict(
        subprocess_env, FAIL_PROCESS_1_AT_BATCH_2="kill", FAILURE_MARKER=str(marker),
        PROCESS_TIMEOUT_S=str(KILLED_PEER_TIMEOUT_S)))[::-1]
    assert killed[0] == -9
    message = (f"{output}: process 1 of 2 neither finished nor progressed for "
               f"{KILLED_PEER_TIMEOUT_S} s (crashed, killed or hung?); process 0 stopped, keeping its work; run every "
               "process again to resume")
    assert message in survivor[2].splitlines(), survivor[2][-3000:]
    # After that line, process 0's exit waits at JAX's shutdown barrier until the heartbeat
    # check gives process 1 up and aborts process 0 (SIGABRT).
    assert survivor[0] != 0
    assert survivor[3] - float(marker.read_text()) < HEARTBEAT_TIMEOUT_S + 15
    assert not output.exists()
    # Killed while dispatching its second batch, process 1 had not yet written the first
    # one's rows (they are written once the next batch is on the device): both are redone.
    assert_rerun_resumes(captioner, captioner_source, images, output, subprocess_env, tmp_path,
                         kept_by_process_1=0)


class FakeCoordinationService:
    """The key-value calls ``multihost`` makes, in memory, shared by threads that stand in for
    processes (the real service is exercised by the two-process tests above)."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key: str, value: str) -> None:
        with self.changed:
            if key in self.values:
                raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self.values[key] = value
            self.changed.notify_all()

    def key_value_increment(self, key: str, increment: int) -> int:
        with self.changed:
            value = int(self.values.get(key, 0)) + increment
            self.values[key] = str(value)
            return value

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() {key}")
            return self.values[key]

    def key_value_try_get(self, key: str) -> str:
        with self.changed:
            if key not in self.values:
                raise jax.errors.JaxRuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.values[key]

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        with self.changed:
            return [(key, value) for key, value in self.values.items()
                    if key.startswith(prefix)]


@pytest.fixture()
def processes(monkeypatch):
    """Runs ``outcomes[i]`` (an exception, None for success, or "silent") as process i of
    len(outcomes) in threads; returns what ``finish`` raised in each (None: returned)."""
    service, here = FakeCoordinationService(), threading.local()
    monkeypatch.setattr(multihost, "_client", lambda: service)

    def run(outcomes: list, name: str = "out.jsonl",
            timeout_s: float = FINISH_TIMEOUT_S) -> list:
        monkeypatch.setattr(jax, "process_count", lambda: len(outcomes))
        monkeypatch.setattr(jax, "process_index", lambda: here.index)
        raised: list = [None] * len(outcomes)

        def process(index: int) -> None:
            here.index = index
            if callable(outcomes[index]):  # a process still working: runs this instead
                raised[index] = outcomes[index]()
            elif outcomes[index] != "silent":
                try:
                    multihost.finish(name, error=outcomes[index], timeout_s=timeout_s)
                except ProcessGroupError as error:
                    raised[index] = error

        threads = [threading.Thread(target=process, args=(index,))
                   for index in range(len(outcomes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return raised

    return run


def test_every_process_returns_once_all_succeeded(processes):
    assert processes([None, None, None]) == [None, None, None]


def test_the_others_name_the_first_process_that_failed(processes):
    raised = processes([None, ValueError("bad value\nmore detail"), None])
    assert raised[1] is None  # the failed process re-raises its own error
    for index in (0, 2):
        assert raised[index].process_index == 1
        assert str(raised[index]) == (
            f"out.jsonl: process 1 of 3 failed: ValueError: bad value; process {index} "
            "stopped, keeping its work; run every process again to resume")


def test_processes_that_never_report_are_named_after_the_timeout(processes):
    started = time.monotonic()
    raised = processes([None] + ["silent"] * 10, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert raised[0].process_index == 1
    assert str(raised[0]).startswith(
        "out.jsonl: processes 1, 2, 3, 4, 5, 6, 7, 8 and 2 more of 11 neither finished nor "
        "progressed for 0.3 s (crashed, killed or hung?); process 0 stopped")


def test_a_slow_process_that_progresses_is_waited_for_past_the_timeout(processes):
    def slow_but_alive() -> None:
        """Six batches of 0.1 s, 0.6 s in all: twice the others' timeout, never silent
        for as long as it."""
        for _ in range(6):
            multihost.raise_if_failed("out.jsonl")
            time.sleep(0.1)
        multihost.finish("out.jsonl", timeout_s=FINISH_TIMEOUT_S)

    started = time.monotonic()
    assert processes([None, slow_but_alive, None], timeout_s=0.3) == [None, None, None]
    assert time.monotonic() - started >= 0.6

    def progresses_then_hangs() -> None:
        for _ in range(3):
            multihost.raise_if_failed("out.jsonl")
            time.sleep(0.1)

    started = time.monotonic()
    raised = processes([None, progresses_then_hangs], timeout_s=0.3)
    assert raised[0].process_index == 1 and "neither finished nor progressed" in str(raised[0])
    assert 0.5 <= time.monotonic() - started < 5


def test_a_run_after_a_failed_one_in_the_same_launch_is_not_confused_by_its_keys(processes):
    assert processes([RuntimeError("first attempt"), None])[1].process_index == 0
    assert processes([None, None]) == [None, None]
    assert processes([None, None], name="other.jsonl") == [None, None]


def test_one_process_needs_no_coordination_service(monkeypatch):
    monkeypatch.setattr(multihost, "_client", lambda: None)
    multihost.finish("out.jsonl", timeout_s=1)
    multihost.finish("out.jsonl", error=RuntimeError("reported by the caller"), timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        multihost.finish("out.jsonl", timeout_s=0)


def test_a_working_process_hears_of_a_failure_between_batches(processes):
    def working() -> ProcessGroupError | None:
        """Checks between batches until it hears of the failure, then reports it as the
        pipeline's exception path does."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                multihost.raise_if_failed("out.jsonl")
            except ProcessGroupError as error:
                multihost.finish("out.jsonl", timeout_s=FINISH_TIMEOUT_S, error=error)
                return error
            time.sleep(0.01)
        return None

    def working_then_done() -> None:
        multihost.raise_if_failed("out.jsonl")
        multihost.finish("out.jsonl", timeout_s=FINISH_TIMEOUT_S)

    raised = processes([working, RuntimeError("device lost")])
    assert raised[0].process_index == 1
    assert "process 1 of 2 failed: RuntimeError: device lost" in str(raised[0])
    # The next run of the same name is not confused by the failed one's keys.
    assert processes([working_then_done, None]) == [None, None]
