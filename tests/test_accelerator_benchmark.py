"""scripts/accelerator_benchmark.py --smoke end to end: every part measured, JSON and Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "accelerator_benchmark.py"


def table_blocks(markdown: str) -> list[list[str]]:
    """Consecutive lines starting with '|', one list per table."""
    blocks, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


@pytest.mark.slow  # about a minute on an idle 2-core CPU: four worker processes, a few compiles
def test_smoke_run_measures_every_part_and_renders_markdown(tmp_path):
    # Budgets scaled up so a loaded CI machine skips nothing; the smoke sizes stay tiny.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--budget-scale", "6"],
        capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator-benchmark.json").read_text())
    markdown = (tmp_path / "accelerator-benchmark.md").read_text()
    assert completed.stdout.strip().endswith(markdown.strip())  # the tables print last
    parts = report["parts"]
    assert set(parts) == {"environment", "parity", "throughput", "end_to_end"}
    for name in ("parity", "throughput", "end_to_end"):
        assert parts[name]["status"].count(": ok") == len(parts[name]["status"].split("; "))
        assert parts[name]["skipped"] == [] and parts[name]["errors"] == []

    env = parts["environment"]
    assert env["jax_backend"] == "cpu" and env["packages"]["jax"] and env["host_cores"] >= 1

    # Parity: three chaotic checkpoints and the tiny random model, four settings each (and
    # the chaotic ones' beam search with the other cross-attention form), 0 off.
    parity = {(row["model"], row["setting"]): row for row in parts["parity"]["rows"]}
    assert set(parity) == {(model, setting)
                           for model in ("chaotic-1", "chaotic-5", "chaotic-6", "tiny random")
                           for setting in ("beam", "greedy", "min_length", "no_repeat_ngram")
                           } | {(f"chaotic-{seed}", "beam, einsum cross-attention")
                                for seed in (1, 5, 6)}
    assert all(row["captions"] == 4 and row["mismatched"] == 0 for row in parity.values())

    rows = {(row["framework"], row["variant"], row["batch"]): row
            for row in parts["throughput"]["rows"]}
    assert set(rows) == {("ours", "float32", 2), ("ours", "bfloat16", 2),
                         ("ours", "float32 einsum", 2), ("ours", "bfloat16 einsum", 2),
                         ("hf-flax", "float32", 2), ("pytorch", "float32", 2),
                         ("pytorch", "bfloat16-autocast", 2)}
    for row in rows.values():
        assert row["images_per_second"] > 0 and len(row["batch_seconds"]) == 2
    assert rows["ours", "float32", 2]["compile_seconds"] > 0

    pipelines = {(row["decode"], row["workers"]): row
                 for row in parts["end_to_end"]["pipelines"]}
    assert set(pipelines) == {("exact", "threads"), ("exact", "processes"),
                              ("fast", "processes")}
    for pipeline in pipelines.values():
        assert pipeline["images"] == 32 and pipeline["captioned"] == 32
        assert pipeline["errors"] == 0 and pipeline["input_wait_seconds"] >= 0
        assert 0 <= pipeline["rows_seconds"] < pipeline["wall_seconds"]
        assert pipeline["images_per_second"] > 0 and pipeline["bound"] in ("decode", "device")
    scaling = {(row["decode"], row["mode"], row["workers"])
               for row in parts["end_to_end"]["decode_scaling"]}
    assert scaling == {(decode, mode, workers) for decode, mode in (
        ("exact", "threads"), ("exact", "processes"), ("fast", "threads")) for workers in (1, 2)}

    targets = {target["target"]: target for target in report["targets"]}
    assert targets["exact float32 caption mismatches vs PyTorch"]["measured"] == 0
    assert targets["exact float32 caption mismatches vs PyTorch"]["met"] is True

    # Every table renders: a header, a separator, and rows with the header's cell count.
    tables = table_blocks(markdown)
    assert len(tables) == 6  # targets, environment, parity, throughput, pipeline, decode
    for table in tables:
        cells = table[0].count("|")
        assert table[1] == "|" + "---|" * (cells - 1)
        assert len(table) >= 3 and all(line.count("|") == cells for line in table)
    for heading in ("## Targets (issue 10)", "## 1. Environment", "## 2. Parity",
                    "## 3. Generator throughput", "## 4. End to end from JPEG files",
                    "### Host decode scaling"):
        assert heading in markdown
