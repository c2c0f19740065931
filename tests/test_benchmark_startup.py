"""scripts/benchmark_startup.py: the table it prints, and one quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_startup.py"
ROWS = ["bad flag value", "--help", "first row, cold", "first row, warm cache"]


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_startup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_table_has_the_four_measurements_with_targets_and_failures(tmp_path):
    script = _script()
    cases = script.cases(tmp_path / "model", tmp_path / "images", tmp_path / "cache")
    assert [case.name for case in cases] == ROWS
    assert [case.target_seconds for case in cases] == [2.0, 1.0, 10.0, 6.0]
    assert cases[0].args[-2:] == ("--num-beams", "0") and cases[0].expected_exit == 2
    assert cases[3].args[-2:] == ("--compilation-cache", str(tmp_path / "cache"))
    tree = tmp_path / "main"
    results = [script.Measurement(cases[0], tree, [1.5, 0.5, 1.0], []),
               script.Measurement(cases[1], tree, [0.25], ["exit 1 (expected 0): boom"]),
               script.Measurement(cases[2], tree, [], ["exit 1 (expected 0): boom"] * 2),
               script.Measurement(cases[3], tree, [4.0], [])]
    lines = script.format_table(results).splitlines()
    assert lines[2].split() == ["bad", "flag", "value", "1.00", "0.50", "1.50", "2.0", "3/3"]
    assert lines[3].split() == ["--help", "0.25", "0.25", "0.25", "1.0", "1/2"]
    assert lines[4].strip() == "failed: exit 1 (expected 0): boom"
    assert lines[5].split() == ["first", "row,", "cold", "failed", "10.0", "0/2"]
    assert lines[6].strip() == "failed: exit 1 (expected 0): boom"  # repeated failures once
    assert lines[7].split() == ["first", "row,", "warm", "cache", "4.00", "4.00", "4.00", "6.0",
                                "1/1"]


def test_several_trees_get_a_tree_column(tmp_path):
    script = _script()
    case = script.cases(tmp_path, tmp_path, tmp_path)[1]
    lines = script.format_table([script.Measurement(case, tmp_path / "before", [3.0], []),
                                 script.Measurement(case, tmp_path / "main", [0.5], [])])
    assert lines.splitlines()[0].split()[-1] == "tree"
    assert [line.split()[-1] for line in lines.splitlines()[2:]] == ["before", "main"]


@pytest.mark.slow
def test_quick_run_measures_all_four(tiny_checkpoint, tmp_path):
    report = tmp_path / "startup.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_checkpoint), "--repeats", "1",
         "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    table = completed.stdout.splitlines()
    assert [line[:24].strip() for line in table[2:]] == ROWS
    results = json.loads(report.read_text())["results"]
    assert [result["name"] for result in results] == ROWS
    for result in results:
        assert result["failures"] == [] and len(result["seconds"]) == 1
        assert 0 < result["median_seconds"] < 600
