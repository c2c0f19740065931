"""Ray Data: ``CaptionImages`` in ``map_batches`` on a local Ray instance gives the captions
the command line gives for the same Parquet file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from test_s3 import SETTINGS, SHAPES_MODEL, shapes_jpegs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

RAY_DRIVER = """
import json, math, sys
import ray
from flax_captioner.ray_data import CaptionImages

table, model, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
try:
    dataset = ray.data.read_parquet(table).map_batches(
        CaptionImages, fn_constructor_kwargs={"model": model, "image_column": "jpg",
                                              "id_column": "key", **settings},
        batch_size=4, concurrency=1)
    rows = dataset.take_all()
finally:
    ray.shutdown()
clean = lambda value: None if isinstance(value, float) and math.isnan(value) else value
print(json.dumps([{key: clean(value.item() if hasattr(value, "item") else value)
                   for key, value in row.items()} for row in rows]))
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """img2dataset's layout: ``key`` and encoded ``jpg``; one row is not an image."""
    if not SHAPES_MODEL.is_dir():
        pytest.skip(f"{SHAPES_MODEL} is missing")
    directory = tmp_path_factory.mktemp("ray")
    images = [path.read_bytes() for path in shapes_jpegs(directory / "images", 10)]
    images[3] = b"not a JPEG"
    path = directory / "images.parquet"
    pq.write_table(pa.table({"key": [f"{index:05d}" for index in range(10)], "jpg": images}),
                   path, row_group_size=4)
    return path


@pytest.mark.slow  # a Ray instance, an actor and a CLI process: about 2 minutes on 2 cores
def test_map_batches_gives_the_command_lines_captions(table, tmp_path):
    output = tmp_path / "cli.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "flax_captioner.cli", "caption", str(table), "--model",
         str(SHAPES_MODEL), "--image-column", "jpg", "--id-column", "key", "--output",
         str(output), "--num-beams", str(SETTINGS["num_beams"]), "--max-length",
         str(SETTINGS["max_length"])], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 1, completed.stderr[-2000:]  # one row is not an image
    expected = [json.loads(line) for line in output.read_text().splitlines()]

    # The Ray driver runs in its own process, as a user's script would: Ray's runtime (its
    # threads, gRPC, signal handlers) then never shares the test process.
    driver = subprocess.run([sys.executable, "-c", RAY_DRIVER, str(table), str(SHAPES_MODEL),
                             json.dumps(SETTINGS)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    rows = sorted(json.loads(driver.stdout.strip().splitlines()[-1]), key=lambda row: row["key"])
    assert [row["key"] for row in rows] == [row["image"] for row in expected]
    assert "jpg" not in rows[0]
    for row, reference in zip(rows, expected):
        if "error" in reference:
            assert row["caption"] is None and row["score"] is None  # NaN, as JSON null
            assert row["error"] == reference["error"]
        else:
            assert row["error"] is None
            # Ray's batches of 4 compile another batch size than the CLI's 8: float32
            # rounding moves a score by up to ~2e-7 (measured), never the caption.
            assert row["caption"] == reference["caption"]
            assert row["score"] == pytest.approx(reference["score"], rel=1e-4, abs=1e-5)
