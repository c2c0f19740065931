"""Google Cloud Storage through gcsfs against a local emulator (gcp-storage-emulator on
127.0.0.1): a prefix and a tar shard in, JSONL committed to the bucket, captions equal to
the same images read from local disk, and a resumed run that adds nothing twice."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from test_s3 import SETTINGS, SHAPES_MODEL, shapes_jpegs  # noqa: E402

from flax_captioner.options import CaptionOptions  # noqa: E402
from flax_captioner.pipeline import run_pipeline  # noqa: E402
from flax_captioner.testing import gcs_emulator  # noqa: E402
from flax_captioner.writers import read_rows  # noqa: E402


@pytest.fixture(scope="module")
def options():
    with gcs_emulator("data") as options:
        yield options


def test_prefix_and_shard_on_gcs_give_the_local_captions(options, tmp_path):
    if not SHAPES_MODEL.is_dir():
        pytest.skip(f"{SHAPES_MODEL} is missing")
    import gcsfs

    from flax_captioner.captioner import Captioner

    captioner = Captioner.from_pretrained(str(SHAPES_MODEL))
    images = shapes_jpegs(tmp_path / "images", 6)
    common = CaptionOptions(batch_size=4, decode_threads=2, progress=False,
                            storage_options=options, **SETTINGS)
    run_pipeline([str(tmp_path / "images")], str(tmp_path / "local.jsonl"), common, captioner)
    local = [json.loads(line)["caption"] for line in (tmp_path / "local.jsonl").open()]

    fs = gcsfs.GCSFileSystem(**options)
    for path in images[:3]:
        fs.pipe_file(f"data/loose/{path.name}", path.read_bytes())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in images[3:]:
            archive.add(path, arcname=path.name)
    fs.pipe_file("data/shards/shard-0.tar", buffer.getvalue())
    inputs = ["gs://data/loose/", "gs://data/shards/shard-{0..0}.tar"]
    stats = run_pipeline(inputs, "gs://data/out/captions.jsonl", common, captioner)
    rows = list(read_rows("gs://data/out/captions.jsonl", "jsonl", options))
    assert [row["image"] for row in rows] == (
        [f"gs://data/loose/{path.name}" for path in images[:3]]
        + [f"gs://data/shards/shard-0.tar/{path.name}" for path in images[3:]])
    assert [row["caption"] for row in rows] == local and stats.captioned == 6

    again = run_pipeline(inputs, "gs://data/out/captions.jsonl", common, captioner)
    assert (again.resumed, again.captioned) == (6, 0)
    assert list(read_rows("gs://data/out/captions.jsonl", "jsonl", options)) == rows


def test_processes_probing_one_output_at_once_both_pass(options):
    """Every process of a multi-host run probes the shared output as it starts. GCS refuses
    to delete a missing object, so with one probe name for all, the process that deleted
    second was told its output could not be written. Here a second probe runs in full
    between the first one's write and its delete."""
    from flax_captioner.storage import filesystem
    from flax_captioner.writers import check_writable

    output = "gs://data/probed/captions.jsonl"
    fs, _ = filesystem(output, options)  # fsspec's cached instance, the one the probe gets
    write, nested = fs.pipe_file, []

    def pipe_file(path, value, **kwargs):
        write(path, value, **kwargs)
        if not nested:
            nested.append(path)
            check_writable(output, options)

    fs.pipe_file = pipe_file
    try:
        check_writable(output, options)
    finally:
        fs.pipe_file = write
    fs.invalidate_cache()
    assert nested and fs.find("data/probed/") == []
