"""Fault campaign: caption runs killed, signalled, run twice at once or resumed with other
settings or inputs, each checked to lose, duplicate, mix or corrupt nothing.

    python -m scripts.fault_campaign --scenarios 40 --images 240 --out /tmp/campaign

Each scenario disturbs one or more ``flax-captioner caption`` processes (the shipped shapes
model, local JSONL or Parquet output), then runs the same command to completion and checks
that the output equals an undisturbed run's, row for row, and that every refusal left the
output's bytes as they were. A scenario's processes count as runs. It prints one line per
scenario and the counts at the end; any failed check makes the exit status 1.

Scenarios: ``kill9`` (SIGKILL at a random moment: imports, load, compile, captioning,
finish), ``sigterm`` / ``sigint`` (one signal, or two 0.5 s apart; exit 128 + n or 0, never a
traceback), ``concurrent`` (a second run on the same output started while the first runs: it
is refused, or finds the output finished), ``settings`` (a killed run resumed with other
settings: refused), ``inputs`` (a killed run resumed after a captioned file was removed and
another added: refused), ``outage`` (the images on an S3-protocol server on 127.0.0.1, moto,
reached through a proxy that goes down for 0.5 to 6 s at a random moment while reads are
retried for 3 s: the run finishes, or stops with exit 1 and no error row, and resumes).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec

from scripts.common import SHAPES_MODEL


KINDS = ("kill9", "sigterm", "sigint", "concurrent", "settings", "inputs", "outage")


def caption_command(images: Path | str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flax_captioner.cli", "caption", str(images), "--model",
            str(SHAPES_MODEL), "-o", str(output), "--batch-size", "8", *extra]


def s3_command(proxy_url: str, output: Path) -> list[str]:
    """Captions the bucket's images through the proxy; botocore's own retries are off, so
    the tool's retry window is the one that counts."""
    options = {"client_kwargs": {"endpoint_url": proxy_url},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    return caption_command("s3://campaign/images/", output, "--storage-options",
                           json.dumps(options))


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def disturbed(command: list[str], env: dict[str, str], delay: float,
              signals: list[int]) -> subprocess.CompletedProcess:
    """Runs ``command``, sends ``signals`` (0.5 s apart) after ``delay`` seconds."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    time.sleep(delay)
    for index, signum in enumerate(signals):
        if index:
            time.sleep(0.5)
        if process.poll() is None:
            process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def snapshot(output: Path) -> str:
    """A digest of everything the output consists of (the file, its chunks, its manifest)."""
    digest = hashlib.sha256()
    for path in sorted(output.parent.glob(output.name + "*")):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and not file.name.endswith(".lock"):
                digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def clean(output: Path) -> None:
    for path in output.parent.glob(output.name + "*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def scenario(kind: str, rng: random.Random, images: Path, output: Path, full_seconds: float,
             env: dict[str, str], proxy: Any) -> tuple[int, list[str]]:
    """Runs one scenario; returns (processes run, failed checks)."""
    command = s3_command(proxy.url, output) if kind == "outage" else \
        caption_command(images, output)
    failures: list[str] = []
    runs = 0

    def expect(condition: bool, what: str, result: subprocess.CompletedProcess) -> None:
        if not condition:
            failures.append(f"{what} (exit {result.returncode}: "
                            f"{result.stderr.strip().splitlines()[-1:]})")

    def no_traceback(result: subprocess.CompletedProcess) -> None:
        expect("Traceback" not in result.stderr and result.returncode not in (-11, 139),
               "a traceback or a crash", result)

    delay = rng.uniform(0.2, full_seconds)
    if kind == "kill9":
        result = disturbed(command, env, delay, [signal.SIGKILL])
        runs += 1
    elif kind in ("sigterm", "sigint"):
        signum = signal.SIGTERM if kind == "sigterm" else signal.SIGINT
        result = disturbed(command, env, delay, [signum] * rng.choice((1, 2)))
        runs += 1
        no_traceback(result)
        # -signum: the signal came as the interpreter finalized, after the run's end, when
        # Python has put back the default handler; a shell reports it as 128 + signum too.
        expect(result.returncode in (0, 128 + signum, -signum), f"exit 0 or {128 + signum}",
               result)
    elif kind == "concurrent":
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        time.sleep(rng.uniform(0.0, full_seconds))
        second = run(command, env)
        out, err = first.communicate(timeout=600)
        runs += 2
        first_result = subprocess.CompletedProcess(command, first.returncode, out, err)
        expect(first.returncode == 0, "the first run finishes", first_result)
        expect(second.returncode == 0 or "another run is writing it" in second.stderr,
               "the second run is refused or finds the output done", second)
        no_traceback(second)
    elif kind == "outage":
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)
        time.sleep(delay)
        proxy.down()
        time.sleep(rng.uniform(0.5, 6.0))
        proxy.up()
        out, err = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(command, process.returncode, out, err)
        runs += 1
        no_traceback(result)
        expect(result.returncode == 0 or (result.returncode == 1 and (
            "the store still failed" in err)),
            "finished, or stopped on the store", result)
    elif kind in ("settings", "inputs"):
        disturbed(command, env, delay, [signal.SIGKILL])
        runs += 1
        before = snapshot(output)
        # Other settings are refused once an output is there (the file, or its chunk folder);
        # other inputs once it holds rows to compare them with.
        chunks = Path(f"{output}.chunks")
        present = output.exists() or chunks.exists()
        has_rows = (output.exists() and output.stat().st_size > 0) or (
            chunks.exists() and any(chunks.glob("chunk-*.parquet")))
        if kind == "settings":
            changed = run(caption_command(images, output, "--num-beams", "1"), env)
            words = "made otherwise"
        else:
            first_image = sorted(images.iterdir())[0]
            moved = first_image.with_name("zz_moved_" + first_image.name)
            first_image.rename(moved)
            shutil.copyfile(moved, images / "zz_added.jpg")
            changed = run(command, env)
            words = "made from other inputs"
            moved.rename(first_image)
            (images / "zz_added.jpg").unlink()
        runs += 1
        if present if kind == "settings" else has_rows:
            expect(changed.returncode == 1 and words in changed.stderr,
                   f"refused: {words}", changed)
            expect(snapshot(output) == before, "a refusal leaves the output as it was", changed)
        else:
            clean(output)  # nothing to mix with: the changed run was a new one; start over
    finished = run(command, env)
    runs += 1
    expect(finished.returncode == 0, "the same command then finishes", finished)
    return runs, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=int, default=40)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fault-campaign"))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS,
                        help="the scenarios to run, in turn")
    args = parser.parse_args()

    from flax_captioner.testing import CREDENTIALS, TcpProxy, moto_s3, write_shapes_jpegs

    shutil.rmtree(args.out, ignore_errors=True)
    images = args.out / "images"
    write_shapes_jpegs(images, args.images, seed=args.seed)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(args.out / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", FLAX_CAPTIONER_RETRY_SECONDS="3",
               **CREDENTIALS)
    with moto_s3(own_process=True) as endpoint, TcpProxy(endpoint) as proxy:
        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("campaign")
        fs.put(f"{images}/", "campaign/images/", recursive=True)
        campaign(args, images, env, proxy)


def campaign(args: argparse.Namespace, images: Path, env: dict[str, str], proxy: Any) -> None:
    references = {}
    full_seconds = 0.0
    for name, command in ((".jsonl", caption_command), (".parquet", caption_command),
                          ("s3.jsonl", None)):
        reference = args.out / f"reference{name}"
        started = time.perf_counter()
        result = run(s3_command(proxy.url, reference) if command is None
                     else command(images, reference), env)
        full_seconds = max(full_seconds, time.perf_counter() - started)
        if result.returncode != 0:
            sys.exit(f"the reference run failed: {result.stderr.strip()}")
        references[name] = reference.read_bytes()

    rng = random.Random(args.seed)
    kinds = args.kinds
    counts: collections.Counter[str] = collections.Counter()
    runs, failed = 0, 0
    for number in range(args.scenarios):
        kind = kinds[number % len(kinds)]
        suffix = "s3.jsonl" if kind == "outage" else rng.choice((".jsonl", ".parquet"))
        output = args.out / f"out{suffix}"
        clean(output)
        scenario_runs, failures = scenario(kind, rng, images, output, full_seconds, env, proxy)
        if not output.exists() or output.read_bytes() != references[suffix]:
            failures.append("the finished output differs from the undisturbed run's")
        if failures and output.exists():  # kept for a look
            shutil.copyfile(output, args.out / f"failed-{number}{suffix}")
        runs += scenario_runs
        counts[kind] += 1
        failed += bool(failures)
        print(f"{number:3d} {kind:10s} {suffix:8s} {scenario_runs} runs: "
              f"{'; '.join(failures) or 'ok'}", flush=True)
    print(f"{args.scenarios} scenarios ({dict(counts)}), {runs} runs, {failed} failed; "
          f"undisturbed run {full_seconds:.1f} s, {args.images} images")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
