"""Two real JAX processes on localhost (jax.distributed, CPU): each captions its slice into
its own part, process 0 merges after a barrier, and the result equals a one-process run."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The captioner fixtures are shared with the pipeline tests (one tiny model per session).
from test_pipeline import (captioner, captioner_source, run, subprocess_env,  # noqa: F401
                           write_image)

PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    tests_dir, checkpoint, port, process_id, inputs, output = sys.argv[1:7]
    sys.path.insert(0, tests_dir)
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=120)
    from test_pipeline import BEAM_SETTINGS, make_captioner
    from flax_captioner.pipeline import run_pipeline

    stats = run_pipeline(make_captioner(checkpoint), [inputs], output, batch_size=2,
                         settings=BEAM_SETTINGS, num_threads=1)
    print(f"process {jax.process_index()} of {jax.process_count()}: {stats.captioned} captioned",
          flush=True)
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_into_the_single_process_output(captioner, captioner_source,
                                                            subprocess_env, tmp_path):
    images = tmp_path / "images"
    for seed in range(7):
        write_image(images / f"img{seed}.png", seed, size=(10 + seed, 9))
    (images / "broken.png").write_bytes(b"broken")  # error rows are sliced and merged too
    single = tmp_path / "single.jsonl"
    run(captioner, [images], single, batch_size=2, num_threads=1)

    output = tmp_path / "merged.jsonl"
    port = free_port()
    processes = [
        subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, str(Path(__file__).parent),
                          str(captioner_source), str(port), str(process_id), str(images),
                          str(output)],
                         env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for process_id in range(2)]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            results.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            process.kill()
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
    # 8 inputs round-robin over 2 processes: 4 each (one of process 0's is the broken one).
    assert "process 0 of 2: 3 captioned" in results[0][1]
    assert "process 1 of 2: 4 captioned" in results[1][1]
    assert output.read_bytes() == single.read_bytes()
    assert not list(tmp_path.glob("merged.jsonl.part-*"))
