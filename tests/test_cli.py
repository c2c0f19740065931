"""The command line end to end: output rows, exit codes, one-line errors, Captioner API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_captioner.captioner import Captioner
from flax_captioner.errors import ImageReadError


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flax_captioner.cli", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three small RGB images in a nested directory, plus one text file posing as a JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        path = root / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + index, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (root / "broken.jpg").write_text("not an image")
    return paths


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint) -> Captioner:
    return Captioner.from_pretrained(tiny_checkpoint, parallelism="none")


def test_caption_api_matches_generate(captioner, images):
    captions = captioner.caption(images, num_beams=3, max_length=10, batch_size=2)
    pixel_values = captioner.preprocess(images)
    output = captioner.generate(pixel_values, num_beams=3, max_length=10)
    assert output.sequences.shape == (3, 10) and output.sequences.dtype == np.int32
    assert output.scores.shape == (3,) and output.scores.dtype == np.float32
    assert (output.sequences[:, 0] == captioner.generation_defaults.decoder_start_token_id).all()
    assert captions == captioner.decode(output.sequences)
    assert captioner.caption(Image.open(images[0]), num_beams=3, max_length=10) == captions[:1]


def test_caption_api_names_unreadable_input(captioner, images):
    broken = images[0].parent / "broken.jpg"
    with pytest.raises(ImageReadError, match="broken.jpg"):
        captioner.caption([images[0], broken])


def test_cli_captions_directory_in_input_order_with_error_rows(tiny_checkpoint, images,
                                                               tmp_path):
    output = tmp_path / "captions.jsonl"
    root = images[0].parent
    result = run_cli("caption", str(root), "--model", str(tiny_checkpoint), "--output",
                     str(output), "--num-beams", "2", "--max-length", "8",
                     "--parallelism", "none")
    assert result.returncode == 1, result.stderr  # broken.jpg failed, the rest were written
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [Path(row["image"]).name for row in rows] == ["a.png", "b.jpg", "broken.jpg", "c.png"]
    assert "error" in rows[2] and "caption" not in rows[2]
    captioner = Captioner.from_pretrained(tiny_checkpoint, parallelism="none")
    expected = captioner.caption(images, num_beams=2, max_length=8)
    assert [row["caption"] for row in rows if "caption" in row] == expected
    assert "Traceback" not in result.stderr


def test_cli_stdout_and_exit_zero(tiny_checkpoint, images):
    result = run_cli("caption", str(images[0]), str(images[1]), "--model", str(tiny_checkpoint),
                     "--num-beams", "1", "--max-length", "6", "--parallelism", "none")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(images[0]), str(images[1])]


@pytest.mark.parametrize("args,message", [
    (["caption", "x.png", "--num-beams", "zero"], "invalid int value"),
    (["caption", "x.png", "--early-stopping", "maybe"], "expected true, false or never"),
    (["bogus"], "invalid choice"),
])
def test_cli_usage_errors_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_invalid_settings_exit_2(tiny_checkpoint, images):
    result = run_cli("caption", str(images[0]), "--model", str(tiny_checkpoint),
                     "--num-beams", "2", "--num-return-sequences", "3", "--parallelism", "none")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("flax-captioner: error:") and "num_return_sequences" in last_line


def test_cli_missing_model_is_one_line(images, tmp_path):
    result = run_cli("caption", str(images[0]), "--model", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"flax-captioner: error: {tmp_path / 'missing'}: no such directory")


def test_cli_parity_on_shipped_checkpoint(tmp_path):
    """The parity tool on a Flax-only directory (PyTorch gets the same weights)."""
    repo = Path(__file__).resolve().parents[1]
    flax_only = tmp_path / "flax"
    assert run_cli("convert", str(repo / "examples/shapes-captioner"), str(flax_only)).returncode == 0
    images = sorted(str(path) for path in (repo / "examples/images").glob("*.png"))[:3]
    result = run_cli("parity", "--model", str(flax_only), *images, "--num-beams", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[:3]] == images
    assert all(": match," in line for line in lines[:3])
    assert lines[-1].startswith("images matching: 3/3; captions matching: 3/3")


def test_cli_parity_unreadable_image_is_one_line(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = run_cli("parity", "--model", str(repo / "examples/shapes-captioner"), str(broken))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"flax-captioner: error: {broken}:")
