"""Writes that fail (a full disk, a file-size limit) name the output file in one line, keep
what was committed, and the same command resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax_captioner import writers
from flax_captioner.errors import OutputError

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes-captioner"


def caption(output: Path, limit_kib: int | None = None):
    """The 8 sample images four times over: 32 rows, about 4 KB of JSONL. ``limit_kib``: what
    a full disk does to a write, for real: the kernel refuses bytes past that size (EFBIG;
    SIGXFSZ ignored, so the write fails instead of killing the process)."""
    command = [sys.executable, "-m", "flax_captioner.cli", "caption", *[str(SAMPLES)] * 4,
               "--model", str(SHAPES), "-o", str(output), "--batch-size", "2"]
    if limit_kib is not None:
        command = ["bash", "-c", f"trap '' XFSZ; ulimit -f {limit_kib}; exec \"$@\"",
                   "bash", *command]
    return subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def test_a_failing_write_names_the_file_and_the_run_resumes(tmp_path):
    output = tmp_path / "out.jsonl"
    failed = caption(output, limit_kib=2)  # room for the manifest, not for every row
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert lines[0].startswith(f"flax-captioner: error: {output}: cannot write: File too large")
    assert 0 < len(output.read_text().splitlines()) < 32
    finished = caption(output)
    assert finished.returncode == 0, finished.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["image"] for row in rows] == sorted(str(path) for path in SAMPLES.glob("*.png")) * 4


def test_combining_parquet_chunks_without_room_keeps_them_and_says_so(tmp_path, monkeypatch):
    output = tmp_path / "out.parquet"
    writer = writers.open_writer(str(output), "parquet", resume=False)
    writer.write([{"image": "a.png", "caption": "a", "score": -1.0}])
    monkeypatch.setattr(writers.shutil, "disk_usage", lambda path: type(
        "Usage", (), {"free": 10})())
    with pytest.raises(OutputError, match=r"out\.parquet: combining its chunks needs about "
                                          r"0\.0 MB free beside them and 0\.0 MB are"):
        writer.close()
    assert not output.exists() and len(list(Path(f"{output}.chunks").iterdir())) == 1
