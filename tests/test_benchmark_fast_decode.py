"""scripts/benchmark_fast_decode.py on tiny sizes: speed rows, pixel differences, captions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_fast_decode.py"


def test_fast_decode_benchmark_reports_speed_pixels_and_caption_agreement(tmp_path):
    output = tmp_path / "fast.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "640x480", "--speed-images", "4",
         "--threads", "2", "--repeats", "1", "--caption-images", "6", "--json", str(output)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    assert [(row["width"], row["threads"]) for row in report["speed"]] == [(640, 1), (640, 2)]
    for row in report["speed"]:
        assert row["exact_images_per_second"] > 0 and row["fast_images_per_second"] > 0
        # 640x480 decodes at half size: close to the exact pixels, never equal.
        assert 0 < row["mean_abs_pixel_difference"] < 0.02
    captions = report["captions"]
    assert captions["images"] == 6 and 0 <= captions["captions_equal"] <= 6
    assert 0 <= captions["exact_accuracy"] <= 1 and 0 <= captions["fast_accuracy"] <= 1
    assert "captions (" in completed.stdout and "exact-caption accuracy" in completed.stdout
