"""Start-up latency of the command line, each measurement in fresh processes.

Four measurements with the shipped shapes model and the 8 sample images:

  bad flag value        ``caption IMAGES --model M --num-beams 0``: process start to exit
                        (the run must fail with a usage error, exit code 2)
  --help                ``--help``: process start to exit (exit code 0)
  first row, cold       ``caption IMAGES --model M``: process start to the first JSONL row on
                        stdout, without a compilation cache
  first row, warm cache the same with ``--compilation-cache DIR``, DIR filled by one untimed run

Every run is ``python -m flax_captioner.cli ...`` in a scratch working directory with
``PYTHONPATH`` set to a ``--tree``, so another checkout (``git archive`` of an older commit)
is measured by the same script, the same way. With several ``--tree``s the runs interleave
(run r of every tree before run r + 1 of any), so a shared machine's changing load falls on
all of them alike. Targets are the ones of issue 9 on a 2-core CPU machine; the table prints
them beside the medians.

Usage:
  python -m scripts.benchmark_startup --repeats 3
  git archive 6bf2f99 | tar -x -C /tmp/before
  python -m scripts.benchmark_startup --tree /tmp/before --tree . --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.common import REPO, SAMPLE_IMAGES, SHAPES_MODEL


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured command: ``args`` after ``python -m flax_captioner.cli``."""

    name: str
    args: tuple[str, ...]
    target_seconds: float
    expected_exit: int
    until_first_row: bool = False  # stop the clock at the first stdout line, not at exit


@dataclasses.dataclass
class Measurement:
    """One case on one tree: seconds of the good runs, reasons of the failed ones."""

    case: Case
    tree: Path
    seconds: list[float]
    failures: list[str]

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def as_dict(self) -> dict:
        return {"name": self.case.name, "tree": str(self.tree),
                "command": ["flax-captioner", *self.case.args],
                "target_seconds": self.case.target_seconds, "median_seconds": self.median,
                "seconds": self.seconds, "failures": self.failures}


def cases(model: Path, images: Path, cache: Path) -> list[Case]:
    """The four measured commands, with their targets (issue 9) and expected exit codes."""
    caption = ("caption", str(images), "--model", str(model))
    return [
        Case("bad flag value", (*caption, "--num-beams", "0"), 2.0, expected_exit=2),
        Case("--help", ("--help",), 1.0, expected_exit=0),
        Case("first row, cold", caption, 10.0, expected_exit=0, until_first_row=True),
        Case("first row, warm cache", (*caption, "--compilation-cache", str(cache)), 6.0,
             expected_exit=0, until_first_row=True),
    ]


def run_once(case: Case, tree: Path, workdir: Path) -> tuple[float | None, str]:
    """Seconds from process start to exit (or to the first stdout line); a failure reason."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "flax_captioner.cli", *case.args],
                                   cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=stderr)
        first_line = process.stdout.readline() if case.until_first_row else b""
        first_row_at = time.perf_counter()
        process.stdout.read()
        exit_code = process.wait()
        exited_at = time.perf_counter()
        stderr.seek(0)
        last_error = (stderr.read().decode(errors="replace").strip().splitlines() or [""])[-1]
    if exit_code != case.expected_exit:
        return None, f"exit {exit_code} (expected {case.expected_exit}): {last_error[:200]}"
    if case.until_first_row:
        try:
            json.loads(first_line)
        except ValueError:
            return None, f"first stdout line is not a JSONL row: {first_line[:200]!r}"
        return first_row_at - started, ""
    return exited_at - started, ""


def measure(trees: list[Path], model: Path, images: Path, repeats: int,
            workdir: Path) -> list[Measurement]:
    """Every case for every tree, ``repeats`` timed runs each, trees interleaved per run."""
    per_tree = [cases(model, images, workdir / f"compilation-cache-{index}")
                for index in range(len(trees))]
    results = []
    for case_index in range(len(per_tree[0])):
        row = [Measurement(tree_cases[case_index], tree, [], [])
               for tree, tree_cases in zip(trees, per_tree)]
        for measurement in row:
            if "--compilation-cache" in measurement.case.args:
                run_once(measurement.case, measurement.tree, workdir)  # fills the cache; untimed
        for _ in range(repeats):
            for measurement in row:
                seconds, failure = run_once(measurement.case, measurement.tree, workdir)
                if seconds is None:
                    measurement.failures.append(failure)
                else:
                    measurement.seconds.append(seconds)
                print(f"{measurement.case.name} [{measurement.tree.name}]: "
                      f"{failure or f'{seconds:.2f} s'}", file=sys.stderr)
        results.extend(row)
    return results


def format_table(results: list[Measurement]) -> str:
    """One row per measurement (and tree, when there are several), failures below it."""
    several = len({result.tree for result in results}) > 1
    lines = [f"{'measurement':<24}{'median s':>10}{'min s':>8}{'max s':>8}{'target s':>10}  runs"
             + ("  tree" if several else ""), "-" * (68 + 16 * several)]
    for result in results:
        runs = f"{len(result.seconds)}/{len(result.seconds) + len(result.failures)}"
        if result.seconds:
            numbers = (f"{result.median:>10.2f}{min(result.seconds):>8.2f}"
                       f"{max(result.seconds):>8.2f}")
        else:
            numbers = f"{'failed':>10}{'':>16}"
        tree = f"{runs:<4}  {result.tree.name}" if several else runs
        lines.append(f"{result.case.name:<24}{numbers}{result.case.target_seconds:>10.1f}  {tree}")
        lines.extend(f"  failed: {failure}" for failure in dict.fromkeys(result.failures))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append",
                        help="source tree whose flax_captioner is measured; repeat to compare "
                             "trees [this checkout]")
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL)
    parser.add_argument("--images", type=Path, default=SAMPLE_IMAGES)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement [3]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as workdir:
        trees = [tree.resolve() for tree in args.tree or [REPO]]
        results = measure(trees, args.model.resolve(), args.images.resolve(), args.repeats,
                          Path(workdir))
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(
            {"repeats": args.repeats, "results": [result.as_dict() for result in results]},
            indent=2) + "\n")
    return 1 if any(result.failures for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
