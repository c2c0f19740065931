"""Ray Data: ``CaptionImages`` in ``map_batches`` on a local Ray instance gives the captions
the command line gives for the same Parquet file, and so does a call of it in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from test_s3 import SETTINGS, SHAPES_MODEL, shapes_jpegs  # noqa: E402

from flax_captioner.captioner import Captioner  # noqa: E402
from flax_captioner.options import CaptionOptions  # noqa: E402
from flax_captioner.generator import Dispatched  # noqa: E402
from flax_captioner.ray_data import CaptionImages  # noqa: E402

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
                                              "id_column": "key", "batch_size": 2,
                                              **settings},
        batch_size=4, concurrency=1)  # calls of 4 rows, each two device batches
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
    assert completed.returncode == 3, completed.stderr[-2000:]  # one row is not an image
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
            # Ray's device batches of 2 compile another batch size than the CLI's 8:
            # float32 rounding moves a score by up to ~2e-7 (measured), never the caption.
            assert row["caption"] == reference["caption"]
            assert row["score"] == pytest.approx(reference["score"], rel=1e-4, abs=1e-5)


def test_a_call_captions_its_rows_over_several_device_batches(table, monkeypatch):
    """One call of 10 rows, one of them a bad image (which takes no place in a batch), in
    device batches of 4, 4 and 1: each row gets the caption ``Captioner.caption`` gives its
    image alone, and the devices run batch i + 1 while batch i's rows are made."""
    columns = pq.read_table(table).to_pydict()
    images = CaptionImages(CaptionOptions(model=str(SHAPES_MODEL), image_column="jpg",
                                          id_column="key", batch_size=4, decode_threads=1,
                                          **SETTINGS))
    events, dispatch, wait = [], images.captioner.generator.dispatch, Dispatched.result

    def recording_dispatch(pixel_values, *args, first_index, **kwargs):
        events.append(first_index)
        return dispatch(pixel_values, *args, first_index=first_index, **kwargs)

    monkeypatch.setattr(images.captioner.generator, "dispatch", recording_dispatch)
    monkeypatch.setattr(Dispatched, "result", lambda self: events.append("result") or wait(self))
    result = images({"key": np.array(columns["key"], dtype=object),
                     "jpg": np.array(columns["jpg"], dtype=object)})
    assert events == [0, 5, "result", 9, "result", "result"]  # first input index of each
    assert list(result["key"]) == columns["key"] and "jpg" not in result
    assert result["error"][3] and result["caption"][3] is None and np.isnan(result["score"][3])
    good = [index for index in range(10) if index != 3]
    expected = Captioner.from_pretrained(str(SHAPES_MODEL)).caption(
        [columns["jpg"][index] for index in good], batch_size=1, **SETTINGS)
    assert [result["caption"][index] for index in good] == expected
    assert all(result["error"][index] is None for index in good)
