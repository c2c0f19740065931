"""scripts/benchmark.py end to end on a tiny checkpoint: workers, interleaving, JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


def test_benchmark_interleaves_frameworks_and_reports_ratios(tiny_checkpoint, tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), "--batch-size", "2",
         "--num-beams", "2", "--max-length", "6", "--repeats", "2",
         "--frameworks", "pytorch,ours", "--json", str(output)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    # Batch r of every framework runs before batch r + 1 of any, in a rotating order.
    turns = [line.split(": ", 1)[1] for line in completed.stderr.splitlines()
             if line.startswith("timed batch ")]
    assert len(turns) == 2
    assert turns[0].startswith("pytorch (float32)") and turns[1].startswith("ours (float32)")
    assert all("ours (bfloat16)" in turn for turn in turns)

    report = json.loads(output.read_text())
    rows = {(row["framework"], row["dtype"]): row for row in report["measurements"]}
    assert set(rows) == {("pytorch", "float32"), ("ours", "float32"), ("ours", "bfloat16")}
    for row in rows.values():
        assert len(row["batch_seconds"]) == 2 and row["images_per_second"] > 0
        assert len(row["sequences"]) == 2 and len(row["sequences"][0]) == 6
    assert rows["pytorch", "float32"]["ratio_to_pytorch"] == 1.0
    assert rows["ours", "float32"]["compile_seconds"] > 0
    assert report["agreement"]["ours_vs_pytorch"] == {"captions_equal": 1.0,
                                                      "tokens_equal": 1.0}
    assert "x PyTorch" in completed.stdout and "ours_vs_pytorch: captions equal 100%" in (
        completed.stdout)


def test_benchmark_times_the_other_backend_choices_beside_ours(tiny_checkpoint, tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), "--batch-size", "2",
         "--num-beams", "2", "--max-length", "6", "--repeats", "1", "--frameworks", "ours",
         "--no-dtype-check", "--other-search-loop", "--other-cross-context",
         "--other-self-attention", "--json", str(output)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    assert [row["framework"] for row in report["measurements"]] == ["ours", "ours-loop",
                                                                    "ours-cross", "ours-self"]
    for check in ("ours_other_loop_vs_ours", "ours_other_cross_vs_ours",
                  "ours_other_self_vs_ours"):
        assert report["agreement"][check] == {"captions_equal": 1.0, "tokens_equal": 1.0}
