"""Captioning throughput: PyTorch ``generate``, HF Flax ``generate`` under jit, and ours.

All frameworks caption the same seeded random pixels with the same weights (a full-size
random-weight model of the nlpconnect architecture, ViT-B/16 + GPT-2 12x768, vocab 50257,
unless --checkpoint names a directory) and the same beam-search settings. Each framework runs
in its own subprocess, so its memory numbers are its own. The processes load, compile and warm
up one at a time, then take turns: timed batch r of every framework runs before batch r + 1 of
any, in a rotating order, so a slow spell of a shared machine hits all of them alike rather
than whichever ran during it.

  peak RSS               ru_maxrss of the process: loading, compilation and generation
  generate peak RSS      the RSS high-water of the timed generate calls alone: after warm-up,
                         freed heap pages go back to the OS (glibc malloc_trim) and the
                         kernel's VmHWM is reset through /proc/self/clear_refs

Prints images/s (median over --repeats timed batches), the ratio to PyTorch, compile time
(JAX: lowering + XLA compilation of the whole search; PyTorch: none), and two caption checks:
ours vs PyTorch token for token, and ours in bfloat16 vs float32 (a second run of ours in the
other dtype, also timed). ``--json PATH`` writes everything, token ids included.

Example: python -m scripts.benchmark --batch-size 8 --num-beams 4 --max-length 16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from flax_captioner.testing import make_full_size_checkpoint
from scripts.common import (REPO, hf_flax_generate, make_generator, other_form, rotated,
                            seeded_pixels, timed, torch_generate)

FRAMEWORKS = ("pytorch", "hf-flax", "ours")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class WorkerResult:
    """What one worker measured: one framework in one dtype (seconds, MiB; sequences int
    [B * R, max_length])."""

    framework: str
    dtype: str
    images_per_second: float
    batch_seconds: list[float]
    compile_seconds: float | None
    first_call_seconds: float
    peak_rss_mib: float
    generate_peak_rss_mib: float | None
    load_average: tuple[float, float]
    sequences: list[list[int]]


def reset_peak_rss() -> bool:
    """Returns freed heap to the OS, then resets this process's RSS high-water mark (VmHWM).

    False where unsupported (not Linux/glibc), and the generate peak is then not reported.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except (OSError, AttributeError):
        return False


def peak_rss_since_reset_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no VmHWM")


def settings_for(config: Any, args: argparse.Namespace, output_scores: bool = False) -> Any:
    """The benchmark's search: the model's defaults with the command line's beams and length."""
    from flax_captioner.settings import GenerationSettings
    from flax_captioner.loading import generation_defaults

    return GenerationSettings.resolve(generation_defaults(config), max_length=args.max_length,
                                      num_beams=args.num_beams, output_scores=output_scores)


def prepare_pytorch(directory: Path, args: argparse.Namespace, dtype: str):
    """Returns (compile seconds or None, generate: pixels -> int sequences [N, max_length]).

    Always float32: the reference.
    """
    import torch
    from transformers import VisionEncoderDecoderModel

    torch.set_grad_enabled(False)
    model = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    settings = settings_for(model.config, args)
    return None, lambda pixels: torch_generate(model, pixels, settings)


def prepare_hf_flax(directory: Path, args: argparse.Namespace, dtype: str):
    """HF Flax ``generate`` under ``jax.jit``, compiled for the benchmark's batch
    (``FlaxVisionEncoderDecoderModel`` of the loaded weights, computing in ``dtype``;
    transformers < 5 only)."""
    import jax
    import jax.numpy as jnp

    from flax_captioner import hf_flax
    from flax_captioner.loading import load_checkpoint

    checkpoint = load_checkpoint(directory)
    model = hf_flax.to_flax_model(checkpoint.params, checkpoint.config,
                                  dtype=getattr(jnp, dtype))
    shape = jax.ShapeDtypeStruct((args.batch_size, 3, model.config.encoder.image_size,
                                  model.config.encoder.image_size), jnp.float32)
    generate, compile_seconds = hf_flax_generate(model, settings_for(model.config, args), shape)
    return compile_seconds, generate


def prepare_ours(directory: Path, args: argparse.Namespace, dtype: str,
                 output_scores: bool = False, switched: str | None = None):
    """Compile seconds: ``Generator.compile_seconds`` (ahead-of-time compilation, timed
    apart from running the first batch). ``switched``: a ``backend.Kernels`` field to run
    with the other form (``common.other_form``)."""
    import jax
    import jax.numpy as jnp

    from flax_captioner.loading import load_checkpoint

    checkpoint = load_checkpoint(directory)
    platform = jax.devices()[0].platform
    choices = {switched: other_form(platform, switched, dtype)} if switched else {}
    generator = make_generator(checkpoint.params, checkpoint.config, choices,
                               dtype=getattr(jnp, dtype))
    settings = settings_for(checkpoint.config, args, output_scores)
    generator.generate(seeded_pixels(args.batch_size, checkpoint.config.encoder.image_size,
                                     args.seed), settings)
    return generator.compile_seconds, lambda pixels: generator.generate(pixels,
                                                                        settings).sequences


# "ours-scores": output_scores=True (per-step scores [B * K, max_length - 1, V] back);
# "ours-loop" / "ours-cross" / "ours-self": the search loop / cross-attention /
# self-attention form its platform does not use (a field of backend.Kernels switched).
PREPARE = {"pytorch": prepare_pytorch, "hf-flax": prepare_hf_flax, "ours": prepare_ours,
           "ours-scores": functools.partial(prepare_ours, output_scores=True),
           "ours-loop": functools.partial(prepare_ours, switched="search_loop"),
           "ours-cross": functools.partial(prepare_ours, switched="cross_context"),
           "ours-self": functools.partial(prepare_ours, switched="self_attention")}


READY, TIMED = "@benchmark ready", "@benchmark seconds"


def measure(framework: str, dtype: str, directory: Path,
            args: argparse.Namespace) -> WorkerResult:
    """Runs in the worker process: load, compile, one warm-up call, then one timed call per
    ``run`` line on stdin (answering ``TIMED <seconds>``) until stdin says ``finish``."""
    if dtype == "float32" and framework != "pytorch":
        import jax

        # Parity precision; on CPU float32 matmuls are exact anyway, on GPU this avoids TF32.
        jax.config.update("jax_default_matmul_precision", "highest")
    load_before = os.getloadavg()[0]
    compile_seconds, generate = PREPARE[framework](directory, args, dtype)
    pixels = seeded_pixels(args.batch_size, image_size_of(directory), args.seed)
    sequences, first_call = timed(lambda: generate(pixels))
    has_reset = reset_peak_rss()
    print(READY, flush=True)
    batch_seconds = []
    for command in sys.stdin:
        if command.strip() != "run":
            break
        batch_seconds.append(timed(lambda: generate(pixels))[1])
        print(f"{TIMED} {batch_seconds[-1]}", flush=True)
    return WorkerResult(
        framework=framework, dtype=dtype,
        images_per_second=args.batch_size / float(np.median(batch_seconds)),
        batch_seconds=batch_seconds, compile_seconds=compile_seconds,
        first_call_seconds=first_call,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        generate_peak_rss_mib=peak_rss_since_reset_mib() if has_reset else None,
        load_average=(load_before, os.getloadavg()[0]),
        sequences=np.asarray(sequences).tolist())


def image_size_of(directory: Path) -> int:
    config = json.loads((directory / "config.json").read_text())
    return int(config["encoder"]["image_size"])


class Worker:
    """One framework measured in its own Python process, driven over its stdin/stdout."""

    def __init__(self, framework: str, dtype: str, directory: Path, args: argparse.Namespace,
                 scratch: Path):
        self.name = f"{framework} ({dtype})"
        self.result = scratch / f"{framework}-{dtype}.json"
        self.stderr = (scratch / f"{framework}-{dtype}.log").open("w+")
        command = [sys.executable, "-m", "scripts.benchmark", "--checkpoint",
                   str(directory.resolve()),
                   "--batch-size", str(args.batch_size), "--num-beams", str(args.num_beams),
                   "--max-length", str(args.max_length), "--seed", str(args.seed),
                   "--worker", framework, "--dtype", dtype, "--worker-result", str(self.result)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, cwd=REPO)

    def expect(self, prefix: str) -> str:
        """The rest of the worker's next stdout line starting with ``prefix`` (other output
        of the libraries is skipped); exits with the worker's stderr if it died first."""
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.fail()

    def fail(self) -> NoReturn:
        self.process.wait()
        self.stderr.seek(0)
        raise SystemExit(f"{self.name} failed:\n{self.stderr.read()[-3000:]}")

    def run_batch(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self.expect(TIMED))

    def finish(self) -> WorkerResult:
        self.process.stdin.write("finish\n")
        self.process.stdin.close()
        if self.process.wait() != 0:
            self.fail()
        self.stderr.close()
        return WorkerResult(**json.loads(self.result.read_text()))


def build_checkpoint(directory: Path) -> Path:
    """The full-size random-weight checkpoint (the test suite's seeded builder), plus a
    ``flax_model.msgpack`` so the JAX workers load without PyTorch. The PyTorch weights
    stay beside it (the PyTorch worker loads them); the JAX workers load the msgpack, which
    ``loading`` prefers."""
    import jax
    from flax.serialization import to_bytes

    from flax_captioner import loading

    make_full_size_checkpoint(directory)
    params = loading.load_checkpoint(directory).params
    (directory / loading.FLAX_WEIGHTS).write_bytes(to_bytes(jax.device_get(params)))
    return directory


def token_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """Fractions of identical captions and of identical token positions."""
    ours_array, theirs_array = np.asarray(ours), np.asarray(theirs)
    return {"captions_equal": float(np.mean(np.all(ours_array == theirs_array, axis=1))),
            "tokens_equal": float(np.mean(ours_array == theirs_array))}


def report(measurements: list[WorkerResult], args: argparse.Namespace) -> dict[str, Any]:
    """Prints the table and the caption checks; returns the JSON report."""
    by_key = {(m.framework, m.dtype): m for m in measurements}
    reference = by_key.get(("pytorch", "float32"))
    hf_flax = by_key.get(("hf-flax", args.dtype))
    print(f"batch {args.batch_size}, num_beams {args.num_beams}, max_length "
          f"{args.max_length}, {args.repeats} timed batches; {platform.processor() or 'cpu'} "
          f"x{os.cpu_count()}; timed batches interleaved across frameworks; load avg = "
          "1-minute load at each worker's start->end")
    header = (f"{'framework':<12}{'dtype':<10}{'img/s':>8}{'x PyTorch':>11}{'x HF Flax':>11}"
              f"{'compile s':>11}{'first s':>9}{'peak MiB':>10}{'gen MiB':>9}  load avg")
    print(header)
    rows = []
    for m in measurements:
        vs_torch = m.images_per_second / reference.images_per_second if reference else None
        vs_flax = m.images_per_second / hf_flax.images_per_second if hf_flax else None
        rows.append(dataclasses.asdict(m) | {"ratio_to_pytorch": vs_torch,
                                             "ratio_to_hf_flax": vs_flax})

        def cell(value, width, spec):
            return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

        print(f"{m.framework:<12}{m.dtype:<10}{m.images_per_second:>8.2f}"
              f"{cell(vs_torch, 11, '.2f')}{cell(vs_flax, 11, '.2f')}"
              f"{cell(m.compile_seconds, 11, '.1f')}{m.first_call_seconds:>9.1f}"
              f"{m.peak_rss_mib:>10.0f}{cell(m.generate_peak_rss_mib, 9, '.0f')}"
              f"  {m.load_average[0]:.1f}->{m.load_average[1]:.1f}")

    checks = {}
    ours = by_key.get(("ours", args.dtype))
    if ours and reference:
        checks["ours_vs_pytorch"] = token_agreement(ours.sequences, reference.sequences)
    if hf_flax and reference:
        checks["hf_flax_vs_pytorch"] = token_agreement(hf_flax.sequences, reference.sequences)
    if ours and ("ours-loop", args.dtype) in by_key:  # the loop forms' contract: equal
        checks["ours_other_loop_vs_ours"] = token_agreement(
            by_key["ours-loop", args.dtype].sequences, ours.sequences)
    for other in ("cross", "self"):  # equal up to float rounding
        if ours and (f"ours-{other}", args.dtype) in by_key:
            checks[f"ours_other_{other}_vs_ours"] = token_agreement(
                by_key[f"ours-{other}", args.dtype].sequences, ours.sequences)
    if ("ours", "float32") in by_key and ("ours", "bfloat16") in by_key:
        checks["ours_bfloat16_vs_float32"] = token_agreement(
            by_key["ours", "bfloat16"].sequences, by_key["ours", "float32"].sequences)
    for name, values in checks.items():
        print(f"{name}: captions equal {values['captions_equal']:.0%}, "
              f"tokens equal {values['tokens_equal']:.1%}")
    return {"settings": {"batch_size": args.batch_size, "num_beams": args.num_beams,
                         "max_length": args.max_length, "dtype": args.dtype,
                         "repeats": args.repeats, "seed": args.seed},
            "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "load_average": os.getloadavg()[0]},
            "measurements": rows, "agreement": checks}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        help="checkpoint directory (default: build the full-size random one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of hf-flax and ours (PyTorch stays float32)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"comma-separated subset of {','.join(FRAMEWORKS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per framework")
    parser.add_argument("--seed", type=int, default=0, help="pixel seed")
    parser.add_argument("--no-dtype-check", action="store_true",
                        help="skip the second run of ours in the other dtype")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--output-scores", action="store_true",
                        help="also run ours with output_scores=True ('ours-scores', per-step "
                             "scores [B * K, max_length - 1, V] returned), interleaved with "
                             "the others: the cost of asking for them")
    parser.add_argument("--other-search-loop", action="store_true",
                        help="also run ours with the search loop form its platform does not "
                             "use ('ours-loop'; backend.Kernels), interleaved")
    parser.add_argument("--other-cross-context", action="store_true",
                        help="also run ours with the cross-attention form its platform does "
                             "not use ('ours-cross'; backend.Kernels), interleaved")
    parser.add_argument("--other-self-attention", action="store_true",
                        help="also run ours with the self-attention form its platform does "
                             "not use ('ours-self'; backend.Kernels), interleaved")
    parser.add_argument("--worker", choices=tuple(PREPARE), help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.frameworks.split(",")) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"--frameworks: unknown {', '.join(sorted(unknown))}")
    if min(args.batch_size, args.num_beams, args.repeats) < 1 or args.max_length < 2:
        parser.error("--batch-size, --num-beams, --repeats must be >= 1, --max-length >= 2")
    return args


def hf_flax_available() -> bool:
    """Whether HF Flax can be measured; says on stderr why not where it cannot (the
    installed transformers has no Flax classes: 5.0 removed them)."""
    from flax_captioner import hf_flax

    if hf_flax.available():
        return True
    import transformers

    print(f"hf-flax skipped: transformers {transformers.__version__} has no "
          "FlaxVisionEncoderDecoderModel (removed in 5.0; install transformers<5 to "
          "measure it)", file=sys.stderr, flush=True)
    return False


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        measurement = measure(args.worker, args.dtype, args.checkpoint, args)
        args.worker_result.write_text(json.dumps(dataclasses.asdict(measurement)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.checkpoint or build_checkpoint(Path(scratch) / "model")
        frameworks = args.frameworks.split(",")
        if "hf-flax" in frameworks and not hf_flax_available():
            frameworks.remove("hf-flax")
        runs = [(framework, "float32" if framework == "pytorch" else args.dtype)
                for framework in frameworks]
        if "ours" in args.frameworks.split(",") and not args.no_dtype_check:
            runs.append(("ours", "bfloat16" if args.dtype == "float32" else "float32"))
        if args.output_scores:
            runs.append(("ours-scores", args.dtype))
        if args.other_search_loop:
            runs.append(("ours-loop", args.dtype))
        if args.other_cross_context:
            runs.append(("ours-cross", args.dtype))
        if args.other_self_attention:
            runs.append(("ours-self", args.dtype))
        workers = []
        for framework, dtype in runs:
            print(f"loading, compiling, warming up {framework} ({dtype}) ...", file=sys.stderr,
                  flush=True)
            workers.append(Worker(framework, dtype, directory, args, Path(scratch)))
            workers[-1].expect(READY)
        for repeat in range(args.repeats):
            turn = rotated(workers, repeat)
            print(f"timed batch {repeat + 1}/{args.repeats}: "
                  + ", ".join(f"{worker.name} {worker.run_batch():.2f} s" for worker in turn),
                  file=sys.stderr, flush=True)
        measurements = [worker.finish() for worker in workers]
    results = report(measurements, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
