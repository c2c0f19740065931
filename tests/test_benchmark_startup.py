"""``python -m scripts.benchmark_startup``: one quick end-to-end run, and the table it prints
for failed runs and several trees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import benchmark_startup
from scripts.benchmark_startup import Measurement

REPO = Path(__file__).resolve().parent.parent


def row_of(table: str, name: str) -> str:
    [line] = [line for line in table.splitlines() if line.startswith(name + " ")]
    return line


def test_the_table_counts_good_runs_and_names_each_failure_once(tmp_path):
    cases = benchmark_startup.cases(tmp_path / "model", tmp_path / "images", tmp_path / "cache")
    tree = tmp_path / "main"
    boom = "exit 1 (expected 0): boom"
    good, flaky, broken = (Measurement(cases[0], tree, [1.5, 0.5, 1.0], []),
                           Measurement(cases[1], tree, [0.25], [boom]),
                           Measurement(cases[2], tree, [], [boom, boom]))
    table = benchmark_startup.format_table([good, flaky, broken])
    assert "1.00" in row_of(table, good.case.name).split()  # the median
    assert row_of(table, good.case.name).split()[-1] == "3/3"
    assert row_of(table, flaky.case.name).split()[-1] == "1/2"
    assert "failed" in row_of(table, broken.case.name).split()
    assert row_of(table, broken.case.name).split()[-1] == "0/2"
    # Each failure under its row, a repeated one once.
    assert table.count(f"failed: {boom}") == 2


def test_several_trees_get_a_tree_column(tmp_path):
    case = benchmark_startup.cases(tmp_path, tmp_path, tmp_path)[1]
    table = benchmark_startup.format_table([Measurement(case, tmp_path / "before", [3.0], []),
                                            Measurement(case, tmp_path / "main", [0.5], [])])
    assert table.splitlines()[0].split()[-1] == "tree"
    assert [line.split()[-1] for line in table.splitlines() if line.startswith(case.name)] == [
        "before", "main"]


@pytest.mark.slow
def test_quick_run_measures_every_case(tiny_checkpoint, tmp_path):
    report = tmp_path / "startup.json"
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_startup", "--model", str(tiny_checkpoint),
         "--repeats", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    names = [case.name for case in benchmark_startup.cases(tmp_path, tmp_path, tmp_path)]
    results = json.loads(report.read_text())["results"]
    assert [result["name"] for result in results] == names
    for result in results:
        assert result["failures"] == [] and len(result["seconds"]) == 1
        assert 0 < result["median_seconds"] < 600
        assert row_of(completed.stdout, result["name"]).split()[-1] == "1/1"
