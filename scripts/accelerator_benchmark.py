"""One prepared accelerator benchmark: parity, generator throughput, end to end, host decode.

Run on a machine with one GPU (``bash scripts/accelerator_benchmark.sh`` installs the carried
wheels first); it finishes in under 8 minutes and writes ``accelerator-benchmark.json`` and
``accelerator-benchmark.md`` (plus ``workers.log``) into ``--out`` (default ``$OUT``, else
``./accelerator-benchmark-results``). The four parts of issue 10:

1. environment: devices, driver, CPU, versions of jax/jaxlib/flax/transformers/torch;
2. parity on the device: the shipped shapes model, the three chaotic tiny checkpoints of
   tests/test_parity_generate.py and full-size random weights, exact mode (float32, "highest")
   against PyTorch float32 with TF32 off, for beam / greedy / min_length / no_repeat_ngram:
   mismatched captions (target 0); plus beam search with the other cross- and self-attention
   forms (``backend.CROSS_CONTEXT``, ``SELF_ATTENTION``) on the chaotic checkpoints;
3. generator throughput, nlpconnect architecture with random weights, 4 beams, max_length 16:
   ours at batch 64 / 256 / 1024 in float32 (exact) and bfloat16, PyTorch ``generate`` float32
   eager (TF32 off) and float16 / bfloat16 weights with SDPA attention at the same batches,
   HF Flax ``generate`` under jit at batch 64: images/s (host pixel values in, host tokens
   out; ours also streamed, batches dispatched one ahead as ``caption`` runs them, from the
   first dispatch and, a long job's rate, from the first result to the last), compile
   seconds, peak device memory; at batch 256, ours with one of ``backend.py``'s choices
   switched, to decide it for the platform (``throughput_variants``: the other
   cross-attention form, the other search loop, on GPUs cuDNN's fused attention and the
   other matmul backend); and one bfloat16 batch of 256 and one of 1,024, and one float32
   batch of 256, under ``jax.profiler``: kernels per step, the device's busy share, the
   host's input copy and program setup (``device_activity``; the traces are kept in
   ``traces/``);
4. end to end: 4,096 JPEGs (640x480) on local disk through ``pipeline.run_pipeline`` with a
   decode thread per host core, bfloat16, batch 256: exact decoding on threads, then on
   processes (``decode_processes``), then ``--fast-decode`` on processes: images/s, device
   input wait, decode capacity against device rate (which bounds the run), the calling
   process's CPU per image; plus host decode scaling: images/s against threads and processes.

Each heavy part runs in its own subprocess with its own time budget (its memory is its own,
and JAX does not hold the GPU memory PyTorch needs); a part skips the rows its remaining
budget cannot fit and says so, and a part that overruns is stopped with its rows so far kept.

Without a GPU the same parts run on the CPU at batch 8, with PyTorch bfloat16 autocast (what
a CPU user chasing speed would pick) beside our bfloat16. ``--smoke`` runs everything on CPU
with tiny models in about a minute (tests/test_accelerator_benchmark.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "scripts", REPO / "tests", REPO):  # benchmark_pipeline, checkpoints, package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from checkpoints import CHAOTIC_SEEDS  # noqa: E402  (tests/test_parity_generate.py's checkpoints)

PARTS = ("environment", "parity", "throughput", "end_to_end")
# part -> the workers (subprocesses) that measure it
WORKERS = {"parity": ("parity",), "throughput": ("torch_throughput", "jax_throughput"),
           "end_to_end": ("end_to_end",)}
NUM_BEAMS, MAX_LENGTH = 4, 16
CHAOTIC_VOCAB = 32
SHAPES_MODEL = REPO / "examples" / "shapes-captioner"
SAMPLE_IMAGES = REPO / "examples" / "images"
RESULT_NAME = "accelerator-benchmark"


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and time budgets (seconds per worker) of one kind of run."""

    name: str  # "gpu", "cpu" or "smoke"
    full_size: bool  # nlpconnect architecture, else a tiny random model
    batches: tuple[int, ...]
    hf_flax_batch: int
    torch_variants: tuple[str, ...]
    parity_images: int
    e2e_images: int
    e2e_batch: int
    jpeg_size: tuple[int, int]
    decode_workers: tuple[int, ...]
    budgets: dict[str, float]
    repeats: int
    shapes_parity: bool = True  # the shipped shapes model in the parity part
    xla_flags: str = ""  # added to XLA_FLAGS in the workers


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_counts(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the host's cores, the core count itself last."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < cores]
    return tuple(counts + [cores])


PROFILES = {
    # Budgets sum to 440 s; with the setup (~30 s) and the wheel install, under 8 minutes.
    # XLA:GPU compiles take 11-19 s per batch size (one H200, 2026-12-04; float32 on Triton
    # GEMMs 65 s, last in the plan), so the throughput worker fits about ten. PyTorch
    # bfloat16 was its fastest variant (773 images/s at batch 1,024, 2026-12-04): float16
    # comes last, where a short budget drops it. In run 2 (2026-11-27) PyTorch's rows took
    # 27 s of its 70 s (float32 at 1,024 alone 16 s; imports, CUDA start-up and model loads
    # the rest), and its bfloat16 rows at 256 and 1,024 did not fit: 80 s now, taken from
    # parity's, and largest batches first.
    "gpu": Profile("gpu", True, (64, 256, 1024), 64,
                   ("float32", "bfloat16-sdpa", "float16-sdpa"), 8, 4096, 256, (640, 480),
                   worker_counts(host_cores()),
                   {"parity": 80, "torch_throughput": 80, "jax_throughput": 210,
                    "end_to_end": 70}, 3),
    "cpu": Profile("cpu", True, (8,), 8, ("float32", "bfloat16-autocast"), 4, 64, 8,
                   (640, 480), worker_counts(host_cores()),
                   {"parity": 1500, "torch_throughput": 600, "jax_throughput": 900,
                    "end_to_end": 300}, 3),
    # Few compiles: parity's models share one architecture, and the end-to-end batch is the
    # throughput batch, whose program it loads from the persistent compilation cache.
    "smoke": Profile("smoke", False, (2,), 2, ("float32", "bfloat16-autocast"), 4, 32, 2,
                     (64, 48), (1, 2),
                     {"parity": 60, "torch_throughput": 30, "jax_throughput": 45,
                      "end_to_end": 40}, 2, shapes_parity=False,
                     # Halves XLA:CPU compile time; smoke numbers measure nothing anyway.
                     xla_flags="--xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true"),
}


# ---------------------------------------------------------------------------------------------
# Worker side: each worker appends JSON lines to WORK/<worker>.jsonl as it goes.


class Recorder:
    """Appends one JSON object per line, flushed at once, so a stopped worker loses nothing."""

    def __init__(self, path: Path, deadline: float):
        self.path = path
        self.deadline = deadline

    def emit(self, kind: str, **data: Any) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **data}, default=_jsonable) + "\n")

    def fits(self, what: str, estimate: float) -> bool:
        """Whether ``estimate`` seconds still fit the budget; records a skip when not, and
        that ``what`` starts when so (``run_worker`` names it if the budget ends first)."""
        left = self.deadline - time.time()
        if estimate <= left:
            self.emit("started", what=what, at=time.time())
            return True
        self.emit("skipped", what=what,
                  why=f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s of the budget left")
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def seeded_pixels(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
    """float32 [B, 3, S, S] in [-1, 1], the range of normalized nlpconnect inputs."""
    return np.random.default_rng(seed).uniform(
        -1, 1, (batch, 3, image_size, image_size)).astype(np.float32)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def timed_repeats(call: Callable[[], Any], repeats: int, recorder: Recorder,
                  what: str) -> tuple[float, list[float]]:
    """Seconds of a first call, then of ``repeats`` timed calls, none where those no longer
    fit the budget (a speed guess far off)."""
    _, first = timed(call)
    if not recorder.fits(f"{what}, timed batches", repeats * first):
        return first, []
    return first, [timed(call)[1] for _ in range(repeats)]


def check_backend(profile: Profile, recorder: Recorder) -> None:
    """A GPU run must see the GPU from JAX (and PyTorch where imported); stops otherwise."""
    import jax

    recorder.emit("info", jax_backend=jax.default_backend(),
                  jax_devices=[f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                               for d in jax.devices()])
    if profile.name == "gpu" and jax.default_backend() not in ("gpu", "cuda", "rocm"):
        recorder.emit("error", message=f"JAX runs on {jax.default_backend()}, not the GPU: "
                      "the GPU rows would be CPU numbers; stopped")
        raise SystemExit(3)


def torch_device(profile: Profile) -> str:
    import torch

    if profile.name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no CUDA device on a GPU run")
    return "cuda" if profile.name == "gpu" else "cpu"


def torch_sequences(model: Any, pixels: np.ndarray, settings: Any, device: str,
                    dtype: Any = None, autocast: bool = False) -> np.ndarray:
    """PyTorch ``generate`` from host pixels to host tokens, int32 [N, max_length], padded as
    ``parity.pytorch_generate`` pads; float32 runs with TF32 off (matmul and cuDNN), and
    ``autocast`` runs float32 weights under bfloat16 autocast."""
    import contextlib

    import torch

    from flax_captioner.parity import pytorch_generate_kwargs, pytorch_without_tf32

    kwargs = pytorch_generate_kwargs(settings) | dict(output_scores=False,
                                                      return_dict_in_generate=False)
    mixed = (torch.autocast(device, dtype=torch.bfloat16) if autocast
             else contextlib.nullcontext())
    with torch.no_grad(), pytorch_without_tf32(), mixed:
        inputs = torch.from_numpy(pixels).to(device, dtype or torch.float32)
        generated = model.generate(pixel_values=inputs, **kwargs).cpu().numpy()
    fill = settings.pad_token_id
    if settings.num_beams > 1:
        fill = settings.pad_token_id or settings.eos_token_id
    sequences = np.full((len(generated), settings.max_length), fill, np.int32)
    sequences[:, :generated.shape[1]] = generated
    return sequences


def parity_settings(max_length: int) -> list[tuple[str, dict[str, Any]]]:
    common = dict(max_length=max_length, min_length=0, no_repeat_ngram_size=0,
                  num_return_sequences=1)
    return [("beam", common | dict(num_beams=NUM_BEAMS)),
            ("greedy", common | dict(num_beams=1)),
            ("min_length", common | dict(num_beams=NUM_BEAMS, min_length=max_length // 2)),
            ("no_repeat_ngram", common | dict(num_beams=NUM_BEAMS, no_repeat_ngram_size=2))]


def parity_models(work: Path, profile: Profile) -> Iterator[tuple[str, Path, Callable, int]]:
    """(name, checkpoint directory, pixels(preprocess_config) -> float32 [N, 3, S, S],
    max_length) for the shapes model, the chaotic checkpoints and the full-size one."""
    count = profile.parity_images

    def sample_images(config: Any) -> np.ndarray:
        from flax_captioner.preprocess import load_and_preprocess_one

        paths = sorted(SAMPLE_IMAGES.glob("*.png"))[:count]
        return np.stack([load_and_preprocess_one(str(path), config) for path in paths])

    # The full-size model first: its programs are the ones users run, and its compiles are
    # the longest, so a short budget drops tiny models rather than it.
    yield ("full-size random" if profile.full_size else "tiny random", work / "full",
           lambda config: seeded_pixels(count, config.size[0]), MAX_LENGTH)
    if profile.shapes_parity and SHAPES_MODEL.is_dir():
        yield "shapes", SHAPES_MODEL, sample_images, MAX_LENGTH
    for seed in CHAOTIC_SEEDS:
        def chaotic_pixels(config: Any, seed: int = seed) -> np.ndarray:
            pixels = np.random.default_rng(seed).standard_normal((count, 3, 32, 32))
            return pixels.astype(np.float32)

        yield f"chaotic-{seed}", work / f"chaotic-{seed}", chaotic_pixels, 20


def run_parity(work: Path, profile: Profile, recorder: Recorder) -> None:
    import jax
    import torch
    from benchmark import other_cross_context, other_self_attention
    from transformers import VisionEncoderDecoderModel

    from flax_captioner import loading
    from flax_captioner.decoder import DecoderSpec
    from flax_captioner.generator import GenerationSettings, Generator

    check_backend(profile, recorder)
    device = torch_device(profile)
    recorder.emit("info", torch_device=torch.cuda.get_device_name(0) if device == "cuda"
                  else "cpu")
    generators: dict[DecoderSpec, Any] = {}  # same architecture: same compiled programs
    # The other cross- and self-attention forms (backend.CROSS_CONTEXT, SELF_ATTENTION), so a
    # platform can switch to either knowing its captions.
    platform = jax.devices()[0].platform
    other_cross, other_self = other_cross_context(platform), other_self_attention(platform)
    other_forms = {f"{other_cross} cross-attention": {"cross_context": other_cross},
                   f"{other_self} self-attention": {"self_attention": other_self}}
    other_generators: dict[tuple[str, DecoderSpec], Any] = {}
    for name, directory, make_pixels, max_length in parity_models(work, profile):
        # A row is mostly its compile; the first of a model is guessed, the rest measured.
        estimate = 20.0 if profile.full_size and name.startswith("full") else 8.0
        checkpoint = loading.load_checkpoint(directory)
        pixels = make_pixels(checkpoint.preprocess_config)
        reference = VisionEncoderDecoderModel.from_pretrained(directory).to(device).eval()
        architecture = DecoderSpec.from_config(checkpoint.model.config)
        generator = generators.get(architecture)
        swap = {}
        if generator is None:
            generator = generators[architecture] = Generator(
                checkpoint.model.params, checkpoint.model.config)
        else:  # the compiled programs of the first model with these shapes, other weights
            swap = {"params": generator.data_parallel.replicate(checkpoint.model.params)}
            estimate = 2.0
        for setting, overrides in parity_settings(max_length):
            if not recorder.fits(f"parity {name} {setting}", estimate):
                continue
            settings = GenerationSettings.resolve(checkpoint.generation_defaults, **overrides)
            started = time.perf_counter()
            ours = generator.generate(pixels, settings, **swap).sequences
            theirs = torch_sequences(reference, pixels, settings, device)
            differs = np.flatnonzero((ours != theirs).any(axis=1))
            estimate = time.perf_counter() - started
            recorder.emit("parity", model=name, setting=setting, captions=len(ours),
                          mismatched=len(differs), first_mismatch=differs[:1].tolist(),
                          seconds=estimate)
        for form, switched in other_forms.items():
            if not (name.startswith("chaotic")
                    and recorder.fits(f"parity {name} beam, {form}", 10.0)):
                continue
            if (form, architecture) not in other_generators:
                other_generators[form, architecture] = Generator(
                    checkpoint.model.params, checkpoint.model.config, **switched)
            other = other_generators[form, architecture]
            settings = GenerationSettings.resolve(checkpoint.generation_defaults,
                                                  **parity_settings(max_length)[0][1])
            started = time.perf_counter()
            ours = other.generate(pixels, settings, params=other.data_parallel.replicate(
                checkpoint.model.params)).sequences
            theirs = torch_sequences(reference, pixels, settings, device)
            differs = np.flatnonzero((ours != theirs).any(axis=1))
            recorder.emit("parity", model=name, setting=f"beam, {form}",
                          captions=len(ours), mismatched=len(differs),
                          first_mismatch=differs[:1].tolist(),
                          seconds=time.perf_counter() - started)
        del reference
        if device == "cuda":
            torch.cuda.empty_cache()


def run_torch_throughput(work: Path, profile: Profile, recorder: Recorder) -> None:
    import torch
    from transformers import VisionEncoderDecoderModel

    from flax_captioner import loading

    device = torch_device(profile)
    torch.set_grad_enabled(False)
    settings = throughput_settings(work)
    image_size = loading.read_config(work / "full").encoder.image_size
    seconds_per_image = {"gpu": 1 / 300, "cpu": 1.0, "smoke": 0.2}[profile.name]  # a guess
    overhead = 10.0 if profile.full_size else 2.0
    for variant in profile.torch_variants:
        dtype = {"float16-sdpa": torch.float16, "bfloat16-sdpa": torch.bfloat16}.get(variant)
        extra = {"attn_implementation": "sdpa"} if variant.endswith("sdpa") else {}
        try:
            model = VisionEncoderDecoderModel.from_pretrained(work / "full", **extra)
        except (ValueError, ImportError) as error:  # SDPA unsupported by this transformers
            recorder.emit("info", torch_sdpa_unavailable=str(error).splitlines()[0])
            model = VisionEncoderDecoderModel.from_pretrained(work / "full")
        model = model.to(device, dtype or torch.float32).eval()
        attention = getattr(model.config.decoder, "_attn_implementation", None)
        # Largest first: PyTorch's best batch (what the targets compare with) was its largest
        # on the H200 (2026-11-27), and a short budget drops the last rows.
        for batch in sorted(profile.batches, reverse=True):
            what = f"pytorch {variant} batch {batch}"
            estimate = overhead + (profile.repeats + 1) * batch * seconds_per_image
            if not recorder.fits(what, estimate):
                continue
            pixels = seeded_pixels(batch, image_size)

            def call() -> np.ndarray:
                sequences = torch_sequences(model, pixels, settings, device, dtype,
                                            autocast=variant == "bfloat16-autocast")
                if device == "cuda":
                    torch.cuda.synchronize()
                return sequences

            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first, repeats = timed_repeats(call, profile.repeats, recorder, what)
            except torch.cuda.OutOfMemoryError as error:
                recorder.emit("throughput", framework="pytorch", variant=variant, batch=batch,
                              error="out of memory: " + str(error).splitlines()[0][:120])
                torch.cuda.empty_cache()
                continue
            # PyTorch compiles nothing: where the timed batches did not fit, its first call
            # is the row's one measurement.
            seconds = repeats or [first]
            median = statistics.median(seconds)
            seconds_per_image = median / batch
            recorder.emit(
                "throughput", framework="pytorch", variant=variant, batch=batch,
                images_per_second=batch / median, batch_seconds=seconds, compile_seconds=None,
                first_call_seconds=first, attention=attention,
                timed=None if repeats else "first call only",
                peak_gib=(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                          else None))
        model = None  # frees its device memory before the next variant loads
        if device == "cuda":
            torch.cuda.empty_cache()


def throughput_settings(work: Path) -> Any:
    from flax_captioner import loading
    from flax_captioner.generator import GenerationSettings

    config = loading.read_config(work / "full")
    return GenerationSettings.resolve(loading.generation_defaults(config, work / "full"),
                                      num_beams=NUM_BEAMS, max_length=MAX_LENGTH)


def device_peak_bytes() -> int | None:
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def throughput_variants(platform: str, gpu: bool) -> dict[str, dict[str, Any]]:
    """Variant name -> ``Generator`` arguments besides the dtype, for ``platform``'s devices.

    "<dtype>" is the library's choice; the others each change one choice, to decide it for
    the platform: the other search loop (``SEARCH_LOOP``), the other cross-attention form
    (``CROSS_CONTEXT``) and, on GPUs, bfloat16's attention forms first (the encoder's
    self-attention through the einsums instead of cuDNN's fused kernel, "bfloat16
    einsum-encoder", ``ENCODER_ATTENTION``; the cross-attention through cuDNN's,
    "bfloat16 cudnn-cross"; the decoder's self-attention as multiply-reduces, "bfloat16
    multiply_reduce-self", ``SELF_ATTENTION``) and the other matmul backend
    (``COMPILER_OPTIONS``): "float32 triton" (XLA's default Triton GEMM fusions) and
    "bfloat16 cublas" (cuBLAS only, as the exact mode compiles). These two come last, so
    "float32 triton" (a 65 s compile) follows float32's other choices in the plan.
    """
    from benchmark import other_cross_context, other_search_loop

    from flax_captioner import backend

    other_loop, other_cross = other_search_loop(platform), other_cross_context(platform)
    variants: dict[str, dict[str, Any]] = {"": {}, " " + other_loop: {"search_loop": other_loop},
                                           " " + other_cross: {"cross_context": other_cross}}
    switched = {dtype + suffix: kwargs for dtype in ("float32", "bfloat16")
                for suffix, kwargs in variants.items()}
    if gpu:  # the attention kernels first: the largest choices the traces point at
        # The unmeasured choice first.
        switched = {"bfloat16 multiply_reduce-self": {"self_attention": "multiply_reduce"},
                    "bfloat16 einsum-encoder": {"encoder_attention": "einsum"},
                    "bfloat16 cudnn-cross": {"cross_context": "cudnn"}} | switched
        switched["float32 triton"] = {"compiler_options": {}}
        switched["bfloat16 cublas"] = {
            "compiler_options": backend.compiler_options("gpu", "float32")}
    return switched


def throughput_plan(variants: dict[str, dict[str, Any]], batches: tuple[int, ...],
                    hf_flax_batch: int) -> list[tuple[str, str, int]]:
    """(framework, variant, batch) rows in the order they are needed, since a short budget
    drops the last ones.

    First what the targets read: the library's bfloat16 and float32 at the middle batch and
    the larger ones; then a profiled batch of bfloat16 at the middle batch and at the largest,
    and of float32 at the middle one ("profile": after the target rows, so a profiler that
    takes the process down loses none of them); then the other attention kernels (they change
    the program most) at the middle and largest batches, bfloat16's other choices at the
    middle batch, the remaining batches, float32's other choices (on GPUs "float32 triton",
    a long compile, last of them), and HF Flax (a long compile no target needs).
    """
    from flax_captioner import decoder

    middle = batches[len(batches) // 2]
    plan = [("ours", dtype, batch) for dtype in ("bfloat16", "float32") for batch in batches
            if batch >= middle]
    plan += [("profile", "bfloat16", batch) for batch in sorted({middle, batches[-1]})]
    plan += [("profile", "float32", middle)]
    attention = [variant for variant, kwargs in variants.items()
                 if {"encoder_attention", "self_attention"} & set(kwargs)
                 or kwargs.get("cross_context") in decoder.FUSED_FORMS]
    plan += [("ours", variant, batch) for variant in attention
             for batch in sorted({middle, batches[-1]})]
    plan += [("ours", variant, middle) for variant in variants
             if variant.startswith("bfloat16 ") and variant not in attention]
    plan += [("ours", dtype, batch) for dtype in ("bfloat16", "float32") for batch in batches
             if batch < middle]
    plan += [("ours", variant, middle) for variant in variants if variant.startswith("float32 ")]
    return plan + [("hf-flax", "float32", hf_flax_batch)]


def run_jax_throughput(work: Path, profile: Profile, recorder: Recorder) -> None:
    import jax
    import jax.numpy as jnp

    from flax_captioner import backend, loading, sharding
    from flax_captioner.errors import CaptionerError
    from flax_captioner.generator import Generator, enable_compilation_cache

    check_backend(profile, recorder)
    # Shared with the end-to-end worker, which then loads the batch-256 program from disk.
    enable_compilation_cache(work / "jax-cache")
    checkpoint = loading.load_checkpoint(work / "full")
    settings = throughput_settings(work)
    image_size = checkpoint.model.config.encoder.image_size
    variants = throughput_variants(jax.devices()[0].platform, profile.name == "gpu")
    generators: dict[str, Generator] = {}

    def generator_for(variant: str) -> Generator:
        if variant not in generators:
            dtype = variant.split()[0]
            generators[variant] = Generator(
                checkpoint.model.params, checkpoint.model.config, dtype=getattr(jnp, dtype),
                data_parallel=sharding.data_parallel("mesh"), **variants[variant])
        return generators[variant]

    plan = throughput_plan(variants, profile.batches, profile.hf_flax_batch)
    # Guesses until measured (then the last measurement of that kind): compile seconds, and
    # seconds per image. GPU: one H200, 2026-12-04, batch 256 (docs/benchmarks.md).
    compile_estimate, per_image = {
        "gpu": ({("ours", "float32"): 18.0, ("ours", "bfloat16"): 22.0,
                 ("ours", "float32 triton"): 75.0, ("hf-flax", "float32"): 50.0},
                {("ours", "float32"): 1 / 560, ("ours", "bfloat16"): 1 / 1900,
                 ("hf-flax", "float32"): 1 / 110}),
        "cpu": ({("ours", "float32"): 15.0, ("ours", "bfloat16"): 15.0,
                 ("hf-flax", "float32"): 20.0},
                {("ours", "float32"): 1.0, ("ours", "bfloat16"): 0.6,
                 ("hf-flax", "float32"): 2.0}),
        "smoke": ({("ours", "float32"): 8.0, ("ours", "bfloat16"): 8.0,
                   ("hf-flax", "float32"): 8.0},
                  {("ours", "float32"): 0.05, ("ours", "bfloat16"): 0.05,
                   ("hf-flax", "float32"): 0.05}),
    }[profile.name]
    # JAX's peak memory only grows: a row's peak is its own where it exceeds every earlier one.
    previous_peak = 0
    measured = set()  # the (framework, variant, batch) rows run so far
    for framework, dtype, batch in plan:
        what = f"{framework} {dtype} batch {batch}"
        if framework == "profile":  # a batch whose program an earlier row compiled
            if ("ours", dtype, batch) not in measured:
                recorder.emit("skipped", what=what, why=f"ours {dtype} batch {batch} not run")
            elif recorder.fits(what, 15 + 3 * batch * per_image["ours", dtype]):
                pixels = seeded_pixels(batch, image_size)
                generator = generator_for(dtype)
                recorder.emit("profile", variant=dtype, batch=batch,
                              steps=settings.max_length - 1, **profiled_call(
                                  lambda: generator.generate(pixels, settings).sequences,
                                  work / "traces" / f"{dtype}-{batch}"))
            continue
        kind = (framework, dtype.split()[0])
        # A variant that changes XLA's options has its own compile estimate.
        compiled_as = (framework, dtype) if (framework, dtype) in compile_estimate else kind
        # Ours runs its batches twice: one at a time, then streamed (dispatched one ahead,
        # after two untimed).
        streamed_batches = profile.repeats + 3
        batches_run = profile.repeats + 1 + (streamed_batches + 2 if framework == "ours" else 0)
        estimate = (compile_estimate[compiled_as] + batches_run * batch
                    * per_image.get((framework, dtype), per_image[kind]))
        if not recorder.fits(what, estimate):
            continue
        pixels = seeded_pixels(batch, image_size)
        try:
            if framework == "ours":
                generator = generator_for(dtype)
                call = lambda: generator.generate(pixels, settings).sequences  # noqa: E731
                compiled_before = generator.compile_seconds
                _, first = timed(call)  # compiles ahead of running, timed apart
                compile_seconds = generator.compile_seconds - compiled_before
            else:
                call, compile_seconds = hf_flax_generate(checkpoint, settings, pixels)
                _, first = timed(call)
            seconds = [timed(call)[1] for _ in range(profile.repeats)]
            streamed, steady = (streamed_run(generator, pixels, settings, streamed_batches)
                                if framework == "ours" else (None, None))
        except Exception as error:  # noqa: BLE001 - out of memory, or a variant's failure
            switched = bool(variants.get(dtype))  # one of backend.py's choices switched
            if (not isinstance(error, CaptionerError) and not backend.is_out_of_memory(error)
                    and not switched):
                raise  # a switched row records what failed (XLA options, cuDNN's limits)
            recorder.emit("throughput", framework=framework, variant=dtype, batch=batch,
                          error=str(error).splitlines()[0][:200])
            continue
        median = statistics.median(seconds)
        compile_estimate[compiled_as] = 1.2 * compile_seconds + 2
        per_image[framework, dtype] = median / batch
        peak = device_peak_bytes()
        recorder.emit(
            "throughput", framework=framework, variant=dtype, batch=batch,
            images_per_second=batch / median, batch_seconds=seconds,
            streamed_images_per_second=streamed, steady_images_per_second=steady,
            compile_seconds=compile_seconds, first_call_seconds=first,
            peak_gib=None if peak is None else peak / 2**30,
            peak_attributable=None if peak is None else peak > previous_peak)
        previous_peak = max(previous_peak, peak or 0)
        measured.add((framework, dtype, batch))


def streamed_run(generator: Any, pixels: np.ndarray, settings: Any,
                 batches: int) -> tuple[float, float]:
    """``batches`` batches of ``pixels`` dispatched one ahead (``device_loop.one_ahead``), as
    ``caption`` and the Ray path run theirs: a batch's pixels are copied and its program
    launched while the batch before runs on the device. Returns (images/s over the whole run,
    images/s between the first result and the last): the first includes the first batch's
    input copy and program setup, which nothing overlaps; the second leaves them out, as a
    long job pays them once (on one H200, run 6, bfloat16 at batch 1,024: 357 ms a batch one
    at a time against ~279 ms of kernels in the trace, so a run of 4 batches spends ~7% of
    its time before the device starts).

    Two untimed batches go first: two batches in flight need more device memory than one,
    and the first run that holds them pays for growing the allocator's pool, presumably what
    happened on one H200 in run 5: bfloat16 at batch 1,024, the first row to hold two such
    batches, streamed at 2,044 images/s against 2,700 one at a time, while the row after it
    (cuDNN attention, same batch) streamed at 3,251 against 2,784."""
    from flax_captioner.device_loop import one_ahead

    def run(count: int) -> list[float]:
        """Seconds from the start to each batch's result, in order."""
        started = time.perf_counter()
        arrived = []
        for _, dispatched in one_ahead(range(count),
                                       lambda _: generator.dispatch(pixels, settings)):
            dispatched.result()
            arrived.append(time.perf_counter() - started)
        return arrived

    run(2)
    arrived = run(batches)
    images = len(pixels)
    return batches * images / arrived[-1], (batches - 1) * images / (arrived[-1] - arrived[0])


def profiled_call(call: Callable[[], Any], trace: Path) -> dict[str, Any]:
    """Runs ``call`` once under ``jax.profiler.trace`` into ``trace``: its seconds and
    ``device_activity``; a profiler that fails gives its error instead."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # device and XLA host events only: a small file
    try:
        with jax.profiler.trace(str(trace), profiler_options=options):
            _, seconds = timed(call)
        return {"call_seconds": seconds, **device_activity(trace)}
    except Exception as error:  # noqa: BLE001 - a profiler failure loses no rows
        return {"call_seconds": None, "devices": [], "error": str(error).splitlines()[0]}


# Host-side phases of a call in XLA:GPU's traces (jax 0.11.2), by event name on the host
# plane: the longest event whose name starts with each. On one H200 (2026-12-04) they were
# where a batch's host time went before the device started (docs/benchmarks.md).
HOST_PHASES = {"jitted_call_ms": "PjitFunction(",  # how long the call held the caller
               "input_copy_ms": "H2D Dispatch",  # host arrays into staging buffers
               "program_setup_ms": "Thunks::Initialize"}  # CUDA graphs recorded


def device_activity(trace: Path) -> dict[str, Any]:
    """What the devices did during a traced call, from the XSpace ``jax.profiler.trace`` wrote
    under ``trace``.

    Per device plane (``/device:GPU:N``), over the kernels and copies on its "Stream" lines:
    their count, the span from the first start to the last end, the time any of them ran
    (``busy_ms``, overlaps counted once), ``busy_share`` = busy / span, when the first kernel
    that is not a copy started (``compute_start_ms``, from the span's start: the inputs'
    copies and the program's setup come before it), and the kernels with the most time. A
    busy share well below 1 means the device waited for the host (input copies, launches,
    synchronisation); near 1, the kernels themselves bound it. ``host`` holds the longest
    host events of ``HOST_PHASES`` (None where absent). Devices whose kernels the trace does
    not show (XLA:CPU) give an empty list.
    """
    from jax.profiler import ProfileData

    paths = sorted(trace.glob("**/*.xplane.pb"))
    if not paths:
        return {"devices": [], "error": f"no .xplane.pb under {trace}"}
    devices, host = [], dict.fromkeys(HOST_PHASES)
    for plane in ProfileData.from_file(str(paths[-1])).planes:
        if plane.name == "/host:CPU":
            for line in plane.lines:
                for event in line.events:
                    for phase, prefix in HOST_PHASES.items():
                        if event.name.startswith(prefix):
                            host[phase] = max(host[phase] or 0.0, event.duration_ns / 1e6)
        if not plane.name.startswith("/device:"):
            continue
        events = sorted((event.start_ns, event.start_ns + event.duration_ns, event.name)
                        for line in plane.lines if line.name.startswith("Stream")
                        for event in line.events)
        if not events:
            continue
        busy, covered_until = 0.0, events[0][0]
        per_kernel: dict[str, list[float]] = {}
        for start, end, name in events:
            busy += max(0.0, end - max(start, covered_until))
            covered_until = max(covered_until, end)
            per_kernel.setdefault(name, []).append(end - start)
        span = covered_until - events[0][0]
        compute_start = next((start for start, _, name in events
                              if not name.startswith(("Memcpy", "Memset"))), None)
        top = sorted(per_kernel.items(), key=lambda item: -sum(item[1]))[:10]
        devices.append({"device": plane.name, "kernels": len(events), "span_ms": span / 1e6,
                        "busy_ms": busy / 1e6, "busy_share": busy / span if span else None,
                        "compute_start_ms": None if compute_start is None
                        else (compute_start - events[0][0]) / 1e6,
                        "top_kernels": [{"name": name, "count": len(times),
                                         "total_ms": sum(times) / 1e6} for name, times in top]})
    return {"devices": devices, "host": host}


def hf_flax_generate(checkpoint: Any, settings: Any,
                     pixels: np.ndarray) -> tuple[Callable[[], np.ndarray], float]:
    """transformers' Flax ``generate`` under ``jax.jit``, float32 at "highest" precision (as
    ours in the exact mode); returns (call, compile seconds)."""
    import jax

    model = checkpoint.model
    params = jax.device_put(model.params)

    def search(params: Any, pixels: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return model.generate(pixels, params=params, max_length=settings.max_length,
                                  num_beams=settings.num_beams,
                                  decoder_start_token_id=settings.decoder_start_token_id,
                                  pad_token_id=settings.pad_token_id,
                                  eos_token_id=settings.eos_token_id).sequences

    compiled, compile_seconds = timed(lambda: jax.jit(search).lower(params, pixels).compile())
    return lambda: np.asarray(compiled(params, pixels)), compile_seconds


def run_end_to_end(work: Path, profile: Profile, recorder: Recorder) -> None:
    import jax.numpy as jnp
    from benchmark_preprocess import process_cpu_seconds

    from flax_captioner import CaptionOptions, loading
    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import enable_compilation_cache
    from flax_captioner.pipeline import run_pipeline

    cores = host_cores()
    recorder.emit("info", host_cores=cores)
    paths, seconds = timed(lambda: write_jpegs(work / "jpegs", profile.e2e_images,
                                               profile.jpeg_size))
    recorder.emit("info", jpegs=len(paths), jpeg_size=list(profile.jpeg_size),
                  jpeg_write_seconds=seconds)
    check_backend(profile, recorder)
    enable_compilation_cache(work / "jax-cache")
    estimate = {"gpu": 40 + len(paths) / 1000, "cpu": 60 + len(paths), "smoke": 10}[profile.name]
    if recorder.fits("end-to-end pipeline", estimate):
        captioner = Captioner(loading.load_checkpoint(work / "full"), dtype=jnp.bfloat16)
        common = CaptionOptions(batch_size=profile.e2e_batch, decode_threads=cores,
                                decode_processes=False, resume=False, progress=False,
                                num_beams=NUM_BEAMS, max_length=MAX_LENGTH)
        # The first batch compiles (or loads the throughput worker's program from the cache).
        _, warmup = timed(lambda: run_pipeline(paths[:profile.e2e_batch],
                                               str(work / "warmup.jsonl"), common, captioner))
        wall = None
        for decode, workers in (("exact", "threads"), ("exact", "processes"),
                                ("fast", "processes")):
            if wall is not None and not recorder.fits(
                    f"end-to-end pipeline, {decode} decode on {workers}", 1.2 * wall + 5):
                break
            # This process's CPU, every thread (the feed's, the device loop's, the JAX
            # runtime's), not the decode processes': at 1,000 / (ms per image) images/s on
            # one core's worth, the host process itself bounds the pipeline.
            cpu = process_cpu_seconds()
            stats = run_pipeline(paths, str(work / f"captions-{decode}-{workers}.jsonl"),
                                 common.replace(fast_decode=decode == "fast",
                                                decode_processes=workers == "processes"),
                                 captioner)
            wall = stats.wall_seconds
            recorder.emit("pipeline", decode=decode, workers=workers, dtype="bfloat16",
                          batch=profile.e2e_batch, images=len(paths), warmup_seconds=warmup,
                          caller_cpu_ms_per_image=1e3 * (process_cpu_seconds() - cpu) / len(paths),
                          **pipeline_rates(stats, len(paths)))
    from flax_captioner.preprocess import PreprocessConfig

    decode_scaling(paths, PreprocessConfig.from_pretrained(work / "full"), profile, recorder)


def pipeline_rates(stats: Any, images: int) -> dict[str, Any]:
    """The pipeline's summary plus the two rates that bound it: decoding (images per second
    of all decode threads together) and the device (images per second of device time); the
    smaller one is the bound."""
    row = {name: getattr(stats, name, None) for name in (
        "images_per_second", "wall_seconds", "decode_seconds", "device_seconds",
        "input_wait_seconds", "decode_threads", "captioned", "errors")}
    decode_rate = (images * stats.decode_threads / stats.decode_seconds
                   if stats.decode_seconds else None)
    device_rate = images / stats.device_seconds if stats.device_seconds else None
    # The loop's own time: detokenizing, building and writing rows, while the next batch runs
    # on the device (device_loop.one_ahead); above that batch's device time, the device idles.
    row["rows_seconds"] = max(0.0, stats.wall_seconds - stats.device_seconds
                              - stats.input_wait_seconds - stats.compile_seconds)
    row.update(decode_capacity_images_per_second=decode_rate,
               device_images_per_second=device_rate,
               bound=None if not (decode_rate and device_rate) else
               "decode" if decode_rate < device_rate else "device")
    return row


def write_jpegs(directory: Path, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` photo-like JPEGs: ``min(count, 256)`` distinct ones, copied round-robin (the
    decode work per file is the same; writing 4,096 distinct ones would take the budget)."""
    from benchmark_pipeline import write_photo_jpegs

    directory.mkdir(parents=True, exist_ok=True)
    distinct = min(count, 256)
    sources = write_photo_jpegs(directory / "distinct", distinct, size)
    paths = []
    for index in range(count):
        path = directory / f"photo_{index:05d}.jpg"
        shutil.copyfile(sources[index % distinct], path)
        paths.append(str(path))
    return paths


def _decode_paths(paths: list[str], config: Any, fast: bool) -> int:
    """Decodes + preprocesses ``paths`` in a worker; returns the bytes produced (the pixels
    stay in the worker: shipping them back would measure pickling, not decoding)."""
    from flax_captioner.preprocess import ImageDecoding, load_and_preprocess_one

    decoding = ImageDecoding(fast=fast)
    return sum(load_and_preprocess_one(path, config, decoding=decoding).nbytes
               for path in paths)


def decode_scaling(paths: list[str], config: Any, profile: Profile,
                   recorder: Recorder) -> None:
    """Decode (PIL decode + resize + normalise) images/s against workers: the exact path on
    threads and on processes (forkserver, as ``decode_processes`` starts them), the fast path
    (``--fast-decode``) on threads; every row runs the same function over the same chunks (four
    per worker)."""
    forkserver = multiprocessing.get_context("forkserver")
    for mode, decode in (("threads", "exact"), ("processes", "exact"), ("threads", "fast")):
        for workers in profile.decode_workers:
            images = paths[:min(len(paths), 160 * workers)]
            if not recorder.fits(f"decode {decode} {mode} {workers}",
                                 len(images) / (100 * workers) + 2):
                continue
            chunks = [images[start::4 * workers] for start in range(4 * workers)]
            pool = (concurrent.futures.ThreadPoolExecutor(workers) if mode == "threads" else
                    concurrent.futures.ProcessPoolExecutor(workers, mp_context=forkserver))
            configs, fast = [config] * len(chunks), [decode == "fast"] * len(chunks)
            with pool:
                list(pool.map(_decode_paths, [[path] for path in images[:workers]], configs,
                              fast))
                _, seconds = timed(lambda: list(pool.map(_decode_paths, chunks, configs,
                                                         fast)))
            recorder.emit("decode", mode=mode, decode=decode, workers=workers,
                          images=len(images), seconds=seconds,
                          images_per_second=len(images) / seconds)


WORKER_FUNCTIONS = {"parity": run_parity, "torch_throughput": run_torch_throughput,
                    "jax_throughput": run_jax_throughput, "end_to_end": run_end_to_end}


# ---------------------------------------------------------------------------------------------
# Orchestrator side.


def build_checkpoints(work: Path, profile: Profile, parts: set[str]) -> float:
    """The chaotic tiny checkpoints (parity) and the 'full' model (nlpconnect architecture
    with random weights, or a tiny one for --smoke); returns seconds taken."""
    from checkpoints import make_checkpoint, make_full_size_checkpoint

    started = time.perf_counter()
    if "parity" in parts:
        for seed in CHAOTIC_SEEDS:
            make_checkpoint(work / f"chaotic-{seed}", seed=seed, vocab_size=CHAOTIC_VOCAB,
                            initializer_range=0.5)
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
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
               "--work", str(work), "--profile", profile.name, "--deadline", str(deadline)]
    started = time.perf_counter()
    with log.open("a") as log_file:
        log_file.write(f"\n===== {name} (budget {budget:.0f} s) =====\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
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
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["no output"])[-1][:300]


def environment(profile: Profile) -> dict[str, Any]:
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


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name, family and model, and its bfloat16 units (``backend.BFLOAT16_CPU_FLAGS``,
    what decides whether bfloat16 is fast on it); e.g. "AMD EPYC (family 25 model 1; bfloat16
    units: none)". The same name covers CPUs that differ in both. ``cpuinfo``: the text of
    /proc/cpuinfo, read when None."""
    from flax_captioner import backend

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(re.findall(r"^(model name|cpu family|model)\s*:\s*(.*)$", cpuinfo, re.MULTILINE))
    flags = backend.cpu_flags(cpuinfo)
    units = "unknown" if flags is None else (
        ", ".join(flag for flag in backend.BFLOAT16_CPU_FLAGS if flag in flags) or "none")
    return (f"{fields.get('model name', platform.processor() or 'unknown')} (family "
            f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}; bfloat16 "
            f"units: {units})")


def host_memory_gib() -> float | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"MemTotal:\s*(\d+) kB", meminfo)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def gpu_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return probe.returncode == 0 and "GPU" in probe.stdout


def assemble(profile: Profile, env: dict[str, Any], setup_seconds: float,
             workers: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    """The JSON report: one entry per part, then the targets of issue 10."""
    def lines(worker: str, kind: str) -> list[dict[str, Any]]:
        record = workers.get(worker, {"lines": []})
        return [{k: v for k, v in line.items() if k != "kind"}
                for line in record["lines"] if line["kind"] == kind]

    def part(names: tuple[str, ...]) -> dict[str, Any]:
        ran = [workers[name] for name in names if name in workers]
        if not ran:
            return {"status": "not run (--parts)"}
        return {"status": "; ".join(f"{name}: {workers[name]['status']}" for name in names
                                    if name in workers),
                "seconds": sum(record["seconds"] for record in ran),
                "skipped": sum((lines(name, "skipped") for name in names), []),
                "errors": sum((lines(name, "error") for name in names), [])}

    for worker in workers:
        for info in lines(worker, "info"):
            env.update({k: v for k, v in info.items() if k not in env})
    report = {
        "profile": profile.name,
        "settings": {"num_beams": NUM_BEAMS, "max_length": MAX_LENGTH,
                     "model": "nlpconnect architecture, random weights" if profile.full_size
                     else "tiny random model"},
        "wall_seconds": wall,
        "setup_seconds": setup_seconds,
        "parts": {
            "environment": {"status": "ok", **env},
            "parity": part(WORKERS["parity"]) | {"rows": lines("parity", "parity")},
            "throughput": part(WORKERS["throughput"]) | {
                "rows": lines("torch_throughput", "throughput")
                + lines("jax_throughput", "throughput"),
                "profiles": lines("jax_throughput", "profile")},
            "end_to_end": part(WORKERS["end_to_end"]) | {
                "pipelines": lines("end_to_end", "pipeline"),
                "decode_scaling": lines("end_to_end", "decode")},
        },
    }
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets against what this run measured (None where it was not measured)."""
    rows = [row for row in report["parts"]["throughput"]["rows"] if "images_per_second" in row]

    def rate(row: dict[str, Any]) -> float:
        """A row's images/s as a long batch job gets it: ours between the first and the last
        result of batches dispatched one ahead (``streamed_run``) where measured; PyTorch's
        ``generate`` blocks, one batch at a time, so its batches never overlap."""
        return row.get("steady_images_per_second") or row["images_per_second"]

    def best(framework: str, variants: tuple[str, ...] | None = None) -> dict[str, Any] | None:
        """The fastest row of ``framework`` among ``variants`` (None: any variant)."""
        found = [row for row in rows if row["framework"] == framework
                 and (variants is None or row["variant"] in variants)]
        return max(found, key=rate, default=None)

    ours_bf16 = best("ours", ("bfloat16",))
    ours_f32 = best("ours", ("float32",))
    # Any PyTorch configuration: on a CPU without bfloat16 units its float32 is the fastest
    # (AMD EPYC Zen 3, 2026-12-04: 0.85 images/s, bfloat16 autocast 0.026).
    torch_fast = best("pytorch")
    torch_f32 = best("pytorch", ("float32",))
    parity_rows = [row for row in report["parts"]["parity"]["rows"]  # the library's own forms
                   if not row["setting"].endswith("attention")]
    skipped = [skip["what"] for name in ("parity", "throughput")
               for skip in report["parts"][name].get("skipped", [])]

    def decided(met: bool | None, prefix: str) -> bool | str | None:
        """``met``, unless the budget skipped rows whose name starts with ``prefix``: a ratio
        to the fastest PyTorch, or a mismatch count, holds only over all of them (run 6 skipped
        PyTorch bfloat16 at batch 1,024, its fastest row in run 5, and read 6.77x as met)."""
        cut = [what for what in skipped if what.startswith(prefix)]
        return f"undecided: {len(cut)} {prefix} rows skipped" if cut and met else met
    pipelines = {(row["decode"], row["workers"]): row
                 for row in report["parts"]["end_to_end"]["pipelines"]}
    compiles = [row["compile_seconds"] for row in rows  # the library's own choices only
                if row["framework"] == "ours" and row["variant"] in ("float32", "bfloat16")
                and row.get("compile_seconds") is not None]

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return rate(a) / rate(b) if a and b else None

    def ips(row: dict | None) -> float | None:
        return row["images_per_second"] if row else None

    fast_ratio, exact_ratio = ratio(ours_bf16, torch_fast), ratio(ours_f32, torch_f32)
    checks = [
        ("bfloat16 images/s, best batch", ">= 4000", None if ours_bf16 is None
         else rate(ours_bf16), None if ours_bf16 is None else rate(ours_bf16) >= 4000),
        ("bfloat16 vs fastest PyTorch", ">= 5x", fast_ratio,
         decided(None if fast_ratio is None else fast_ratio >= 5, "pytorch")),
        ("exact float32 caption mismatches vs PyTorch", "0",
         sum(row["mismatched"] for row in parity_rows) if parity_rows else None,
         decided(None if not parity_rows
                 else sum(row["mismatched"] for row in parity_rows) == 0, "parity")),
        ("exact float32 vs PyTorch float32 eager, best batches", ">= 3x", exact_ratio,
         decided(None if exact_ratio is None else exact_ratio >= 3, "pytorch float32")),
        *[(f"end to end images/s from JPEG files, {decode} decode on {workers}", ">= 2000",
           ips(pipelines.get((decode, workers))),
           None if (decode, workers) not in pipelines
           else ips(pipelines[decode, workers]) >= 2000)
          for decode, workers in (("exact", "threads"), ("exact", "processes"),
                                  ("fast", "processes"))],
        ("compile seconds per batch bucket, worst", "< 30", max(compiles, default=None),
         None if not compiles else max(compiles) < 30),
    ]
    return [{"target": name, "wanted": wanted, "measured": measured, "met": met}
            for name, wanted, measured, met in checks]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
        return str(value).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = report["parts"]
    env = parts["environment"]
    out = [f"# Accelerator benchmark ({report['profile']}, {env['date_utc']} UTC)", "",
           f"{report['settings']['model']}; {NUM_BEAMS} beams, max_length {MAX_LENGTH}; "
           f"wall {report['wall_seconds']:.0f} s (setup {report['setup_seconds']:.0f} s).", "",
           "## Targets (issue 10)", "",
           markdown_table(["target", "wanted", "measured", "met"],
                          [[t["target"], t["wanted"], t["measured"], t["met"]]
                           for t in report["targets"]]), "",
           "## 1. Environment", ""]
    keys = ["gpus", "cuda_driver_api", "jax_backend", "jax_devices", "torch_device", "cpu",
            "host_cores", "host_memory_gib", "python"]
    env_rows = [[key, ", ".join(map(str, env[key])) if isinstance(env[key], list) else env[key]]
                for key in keys if key in env]
    env_rows += [[name, version] for name, version in env.get("packages", {}).items()]
    out += [markdown_table(["what", "value"], env_rows), ""]

    out += [f"## 2. Parity: exact mode vs PyTorch float32, TF32 off ({parts['parity']['status']})",
            ""]
    out += [markdown_table(["model", "setting", "captions", "mismatched", "seconds"],
                           [[r["model"], r["setting"], r["captions"], r["mismatched"],
                             r["seconds"]] for r in parts["parity"].get("rows", [])]), ""]

    out += [f"## 3. Generator throughput ({parts['throughput']['status']})", "",
            "images/s from host pixel values to host tokens, one batch at a time (median of "
            "timed batches); streamed: ours over consecutive batches dispatched one ahead, as "
            "`caption` runs them, from the first dispatch; steady: the same run from its first "
            "result to its last, a long job's rate (the targets read it where measured); "
            "compile s: ahead-of-time "
            "lowering + compilation, apart from the first call; peak: device memory high-water "
            "(JAX: process-wide, its own only where 'own peak' is yes).", ""]
    out += [markdown_table(
        ["framework", "variant", "batch", "images/s", "streamed images/s", "steady images/s",
         "compile s", "first call s", "peak GiB", "own peak", "note"],
        [[r["framework"], r["variant"], r["batch"], r.get("images_per_second"),
          r.get("streamed_images_per_second"), r.get("steady_images_per_second"),
          r.get("compile_seconds"), r.get("first_call_seconds"), r.get("peak_gib"),
          r.get("peak_attributable"),
          r.get("error") or ", ".join(filter(None, (r.get("attention"), r.get("timed"))))]
         for r in parts["throughput"].get("rows", [])]), ""]

    profiles = parts["throughput"].get("profiles", [])
    if profiles:
        out += ["### Device profile of one batch (jax.profiler)", "",
                "Kernels and copies on the device's streams during one call: busy = time any "
                "of them ran; busy share = busy / span from the first to the last; well below "
                "1, the device waited for the host. Compute starts: the first kernel, from the "
                "span's start. Host: how long the jitted call held the caller, the longest "
                "input copy into staging memory and the program's setup (CUDA graphs).", "",
                markdown_table(["variant", "batch", "call s", "device", "kernels",
                                "kernels per step", "span ms", "busy ms", "busy share",
                                "compute starts ms", "call held host ms", "input copy ms",
                                "setup ms", "top kernels (ms)"],
                               [[r["variant"], r["batch"], r["call_seconds"], d["device"],
                                 d["kernels"], d["kernels"] / r["steps"], d["span_ms"],
                                 d["busy_ms"], d["busy_share"], d.get("compute_start_ms"),
                                 *[r.get("host", {}).get(phase) for phase in HOST_PHASES],
                                 ", ".join(f"{k['name'][:40]} {k['total_ms']:.1f}"
                                           for k in d["top_kernels"][:5])]
                                for r in profiles for d in r["devices"]]
                               + [[r["variant"], r["batch"], r["call_seconds"],
                                   r.get("error", "no device kernels in the trace"),
                                   *[None] * 10]
                                  for r in profiles if not r["devices"]]), ""]

    e2e = parts["end_to_end"]
    out += [f"## 4. End to end from JPEG files ({e2e['status']})", ""]
    if e2e.get("pipelines"):
        out += ["Decode capacity: images/s all decode threads together could give (images x "
                "threads / decode seconds); device rate: images / seconds the loop spent "
                "dispatching to and waiting on the device (time the device overlaps other work "
                "is not counted, so this is an upper bound); the smaller bounds the run. Rows "
                "s: the loop's own time (detokenize, build and write rows), while the next "
                "batch runs on the device. Caller CPU: this process's CPU per image, all its "
                "threads (not the decode processes').", "",
                markdown_table(
                    ["decode", "on", "images", "batch", "dtype", "images/s", "wall s",
                     "device waited for input s", "rows s", "decode threads",
                     "decode capacity img/s", "device img/s", "bound",
                     "caller CPU ms/image"],
                    [[r["decode"], r["workers"], r["images"], r["batch"], r["dtype"],
                      r["images_per_second"],
                      r["wall_seconds"], r["input_wait_seconds"], r.get("rows_seconds"),
                      r["decode_threads"], r["decode_capacity_images_per_second"],
                      r["device_images_per_second"], r["bound"],
                      r.get("caller_cpu_ms_per_image")] for r in e2e["pipelines"]]),
                ""]
    scaling = e2e.get("decode_scaling", [])
    if scaling:
        single = {(row["mode"], row["decode"]): row["images_per_second"] for row in scaling
                  if row["workers"] == 1}
        out += ["### Host decode scaling (PIL decode + resize + normalise)", "",
                markdown_table(["decode", "mode", "workers", "images", "images/s",
                                "x one worker"],
                               [[r["decode"], r["mode"], r["workers"], r["images"],
                                 r["images_per_second"],
                                 r["images_per_second"] / single[r["mode"], r["decode"]]
                                 if single.get((r["mode"], r["decode"])) else None]
                                for r in scaling]), ""]

    notes = []
    for name in ("parity", "throughput", "end_to_end"):
        for skip in parts[name].get("skipped", []):
            notes.append(f"- skipped {skip['what']}: {skip['why']}")
        for error in parts[name].get("errors", []):
            notes.append(f"- error in {name}: {error['message']}")
    if notes:
        out += ["## Skipped and errors", ""] + notes + [""]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def keep_traces(traces: Path, out: Path, limit_bytes: int = 15 * 2**20) -> None:
    """Copies the workers' profiler traces (.xplane.pb, for XProf/TensorBoard) into ``out``,
    each up to ``limit_bytes`` (the device tool brings back files of up to 16 MiB)."""
    for path in sorted(traces.glob("*/**/*.xplane.pb")):
        if path.stat().st_size <= limit_bytes:
            target = out / f"{path.relative_to(traces).parts[0]}.xplane.pb"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def write_report(out: Path, report: dict[str, Any]) -> str:
    """Writes the JSON and Markdown reports into ``out``; returns the Markdown."""
    markdown = render_markdown(report)
    (out / f"{RESULT_NAME}.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    (out / f"{RESULT_NAME}.md").write_text(markdown + "\n")
    return markdown


if __name__ == "__main__":
    main()
