"""The orchestrator: builds the checkpoints, runs each part's workers under their budgets,
records the environment and writes the report after every worker."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flax_captioner.testing import (CHAOTIC_SEEDS, CHAOTIC_VOCAB, make_chaotic_checkpoint,
                                    make_checkpoint, make_full_size_checkpoint)
from scripts.accelerator import __doc__ as DESCRIPTION
from scripts.accelerator.plan import PARTS, PROFILES, WORKERS, Profile
from scripts.accelerator.report import assemble, write_report
from scripts.accelerator.traces import keep_traces
from scripts.accelerator.workers import WORKER_FUNCTIONS, Recorder
from scripts.common import REPO, cpu_model, host_cores


def build_checkpoints(work: Path, profile: Profile, parts: set[str]) -> float:
    """The chaotic tiny checkpoints (parity) and the 'full' model (nlpconnect architecture
    with random weights, or a tiny one for --smoke); returns seconds taken."""
    started = time.perf_counter()
    if "parity" in parts:
        for seed in CHAOTIC_SEEDS:
            make_chaotic_checkpoint(work / f"chaotic-{seed}", seed)
    if profile.full_size:
        make_full_size_checkpoint(work / "full")
    else:  # the chaotic checkpoints' shapes, so parity reuses their programs
        make_checkpoint(work / "full", seed=0, vocab_size=CHAOTIC_VOCAB)
    return time.perf_counter() - started


def run_worker(name: str, work: Path, profile: Profile, log: Path) -> dict[str, Any]:
    """Runs one worker under its budget; returns its status and recorded lines."""
    budget = profile.budgets[name]
    deadline = time.time() + budget
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               # JAX allocates on demand (not 75% of the GPU at start), so PyTorch in the same
               # process (parity) has memory, and the peak statistics mean something.
               XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.9",
               TF_CPP_MIN_LOG_LEVEL="2", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=" ".join(filter(None, (os.environ.get("XLA_FLAGS"),
                                                profile.xla_flags))))
    command = [sys.executable, "-m", "scripts.accelerator", "--worker", name,
               "--work", str(work), "--profile", profile.name, "--deadline", str(deadline)]
    started = time.perf_counter()
    with log.open("a") as log_file:
        log_file.write(f"\n===== {name} (budget {budget:.0f} s) =====\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO, start_new_session=True)
        try:
            returncode = process.wait(timeout=budget + 10)
            status = "ok" if returncode == 0 else f"failed (exit {returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"stopped at its {budget:.0f} s budget; rows so far kept"
    lines = []
    results = work / f"{name}.jsonl"
    if results.exists():
        lines = [json.loads(line) for line in results.read_text().splitlines() if line]
    if status.startswith("stopped"):
        status += cut_short(lines, deadline)
    if status.startswith("failed"):
        status += ": " + last_error_line(log)
    return {"status": status, "seconds": time.perf_counter() - started, "lines": lines}


def cut_short(lines: list[dict[str, Any]], deadline: float) -> str:
    """"; <what> had run N s without finishing" where a stopped worker's last record is a
    start (``Recorder.fits``): what the budget cut short, and a lower bound on its time."""
    if not lines or lines[-1]["kind"] != "started":
        return ""
    return f"; {lines[-1]['what']} had run {deadline - lines[-1]['at']:.0f} s without finishing"


def last_error_line(log: Path) -> str:
    """The log's last line that names an error (else its last line): why a worker failed."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["no output"])[-1][:300]


def environment(profile: Profile) -> dict[str, Any]:
    """Part 1: the date, the host, the packages' versions and the GPUs (the workers add what
    JAX and PyTorch see)."""
    packages = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
                 "transformers", "tokenizers", "huggingface_hub", "torch", "numpy", "pillow",
                 "safetensors"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "profile": profile.name,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "host_cores": host_cores(),
        "host_memory_gib": host_memory_gib(),
        "packages": packages,
    }
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
        info["cuda_driver_api"] = cuda.group(1) if cuda else None
    return info


def host_memory_gib() -> float | None:
    """The host's memory from /proc/meminfo (None where unreadable)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"MemTotal:\s*(\d+) kB", meminfo)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def gpu_present() -> bool:
    """Whether nvidia-smi lists a GPU: the run then takes the "gpu" profile."""
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return probe.returncode == 0 and "GPU" in probe.stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.accelerator",
                                     description=DESCRIPTION.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny models, about a minute (what the test runs)")
    parser.add_argument("--out", type=Path, help="where the JSON, Markdown and log go "
                        "(default: $OUT, else ./accelerator-benchmark-results)")
    parser.add_argument("--parts", default=",".join(PARTS[1:]),
                        help=f"comma-separated subset of {','.join(PARTS[1:])} "
                        "(the environment is always recorded)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's time budget")
    parser.add_argument("--worker", choices=sorted(WORKER_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS[1:])
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    """The orchestrator, or with ``--worker`` (hidden) one worker in its own process."""
    args = parse_args(argv)
    if args.worker:
        profile = PROFILES[args.profile]
        recorder = Recorder(args.work / f"{args.worker}.jsonl", args.deadline)
        WORKER_FUNCTIONS[args.worker](args.work, profile, recorder)
        return
    started = time.perf_counter()
    profile = PROFILES["smoke" if args.smoke else "gpu" if gpu_present() else "cpu"]
    profile = dataclasses.replace(profile, budgets={
        name: seconds * args.budget_scale for name, seconds in profile.budgets.items()})
    out = args.out or Path(os.environ.get("OUT") or "accelerator-benchmark-results")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "workers.log"
    log.write_text("")
    parts = set(args.parts.split(","))
    env = environment(profile)
    print(f"accelerator benchmark: profile {profile.name}, parts {sorted(parts)}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="accelerator-benchmark-") as scratch:
        work = Path(scratch)
        setup_seconds = build_checkpoints(work, profile, parts)
        workers: dict[str, dict[str, Any]] = {}
        markdown = write_report(out, assemble(profile, dict(env), setup_seconds, workers,
                                              time.perf_counter() - started))
        for part in PARTS[1:]:
            if part not in parts:
                continue
            for name in WORKERS[part]:
                print(f"{name}: budget {profile.budgets[name]:.0f} s ...", file=sys.stderr,
                      flush=True)
                workers[name] = run_worker(name, work, profile, log)
                print(f"{name}: {workers[name]['status']} in {workers[name]['seconds']:.0f} s",
                      file=sys.stderr, flush=True)
                # After each worker, so a run stopped from outside keeps what it measured.
                markdown = write_report(out, assemble(profile, dict(env), setup_seconds,
                                                      workers, time.perf_counter() - started))
        keep_traces(work / "traces", out / "traces")
    print(markdown)
