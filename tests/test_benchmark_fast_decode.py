"""``python -m scripts.benchmark_fast_decode`` on tiny sizes: speed rows, pixel differences,
captions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_fast_decode_benchmark_reports_speed_pixels_and_caption_agreement(tmp_path):
    output = tmp_path / "fast.json"
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_fast_decode", "--sizes", "640x480",
         "--speed-images", "4", "--threads", "2", "--repeats", "1", "--caption-images", "6",
         "--json", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    # One row per size and thread count asked for.
    assert {(row["width"], row["height"], row["threads"]) for row in report["speed"]} == {
        (640, 480, 1), (640, 480, 2)}
    for row in report["speed"]:
        assert row["exact_images_per_second"] > 0 and row["fast_images_per_second"] > 0
        assert row["fast_vs_exact"] == row["fast_images_per_second"] / row[
            "exact_images_per_second"]
        # 640x480 decodes at half size: close to the exact pixels, never equal.
        assert 0 < row["mean_abs_pixel_difference"] < 0.02
    captions = report["captions"]
    assert captions["images"] == 6 and 0 <= captions["captions_equal"] <= 6
    assert captions["captions_equal_share"] == captions["captions_equal"] / 6
    assert 0 <= captions["exact_accuracy"] <= 1 and 0 <= captions["fast_accuracy"] <= 1
    assert "captions (" in completed.stdout and "exact-caption accuracy" in completed.stdout
