"""``python -m scripts.benchmark`` end to end on a tiny checkpoint: one run with every kind of
worker (PyTorch, ours in both dtypes, ours with each other kernel choice), timed batches
interleaved, ratios and caption checks in the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_interleaves_workers_and_reports_ratios_and_agreement(tiny_checkpoint,
                                                                       tmp_path):
    output = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--checkpoint", str(tiny_checkpoint),
         "--batch-size", "2", "--num-beams", "2", "--max-length", "6", "--repeats", "2",
         "--frameworks", "pytorch,ours", "--other-search-loop", "--other-cross-context",
         "--other-self-attention", "--json", str(output)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    rows = {(row["framework"], row["dtype"]): row for row in report["measurements"]}
    # PyTorch as the reference, ours in both dtypes, and each asked-for other choice.
    assert set(rows) == {("pytorch", "float32"), ("ours", "float32"), ("ours", "bfloat16"),
                         ("ours-loop", "float32"), ("ours-cross", "float32"),
                         ("ours-self", "float32")}

    # Batch r of every worker runs before batch r + 1 of any, each round in another order.
    turns = [line.split(": ", 1)[1].split(", ") for line in completed.stderr.splitlines()
             if line.startswith("timed batch ")]
    assert len(turns) == 2
    names = {f"{framework} ({dtype})" for framework, dtype in rows}
    for turn in turns:
        assert sorted(entry.rsplit(" ", 2)[0] for entry in turn) == sorted(names)
    assert turns[0][0].rsplit(" ", 2)[0] != turns[1][0].rsplit(" ", 2)[0]

    pytorch = rows["pytorch", "float32"]["images_per_second"]
    for (framework, _), row in rows.items():
        assert len(row["batch_seconds"]) == 2 and row["images_per_second"] > 0
        assert len(row["sequences"]) == 2 and len(row["sequences"][0]) == 6
        assert row["ratio_to_pytorch"] == pytest.approx(row["images_per_second"] / pytorch)
        if framework == "pytorch":
            assert row["compile_seconds"] is None  # eager: nothing compiled
        else:
            assert row["compile_seconds"] > 0
    # Exact float32 equals PyTorch; the other kernel choices give ours' captions.
    for check in ("ours_vs_pytorch", "ours_other_loop_vs_ours", "ours_other_cross_vs_ours",
                  "ours_other_self_vs_ours"):
        assert report["agreement"][check] == {"captions_equal": 1.0, "tokens_equal": 1.0}
    assert "ours_bfloat16_vs_float32" in report["agreement"]
    assert "x PyTorch" in completed.stdout
    assert "ours_vs_pytorch: captions equal 100%" in completed.stdout
