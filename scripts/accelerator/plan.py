"""What the accelerator benchmark runs, in which order, and with which time budgets.

A profile (``PROFILES``: a GPU, a CPU, or ``--smoke``) sizes every part; the parity part
compares ``parity_settings`` on ``parity_models``; the throughput part runs the rows of
``throughput_plan`` over the variants of ``throughput_variants``, the rows the targets read
first, since a short budget drops the last ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flax_captioner.testing import CHAOTIC_SEEDS, chaotic_pixels
from scripts.common import (SAMPLE_IMAGES, SHAPES_MODEL, host_cores, is_fused_cross_context,
                            other_form, seeded_pixels)

PARTS = ("environment", "parity", "throughput", "end_to_end")
# part -> the workers (subprocesses) that measure it
WORKERS = {"parity": ("parity",), "throughput": ("torch_throughput", "jax_throughput"),
           "end_to_end": ("end_to_end",)}
NUM_BEAMS, MAX_LENGTH = 4, 16
# The end-to-end pipelines, (decode, decode workers), in the order they run: "exact" decodes
# and preprocesses on the host (Pillow), "device-resize" only decodes there
# (--resize-on-device), "-nvimagecodec" with NVIDIA nvImageCodec's CPU decoder
# (--jpeg-decoder), "fast" decodes JPEGs at reduced scale (--fast-decode).
PIPELINES = (("exact", "threads"), ("exact", "processes"), ("device-resize", "processes"),
             ("device-resize-nvimagecodec", "processes"), ("fast", "processes"))
# The host's decode scaling rows, (workers' kind, decode), in the order they run (a short
# budget drops the last): "feed" is the captioning feed on decode processes without the
# device, what the host side of a pipeline gives by itself, beside the processes decoding
# alone; "decode-only" is what the host does for the device-resize pipelines.
DECODE_SCALING = (("processes", "exact"), ("feed", "exact"), ("feed", "decode-only"),
                  ("threads", "exact"), ("processes", "decode-only"),
                  ("processes", "decode-only-nvimagecodec"), ("threads", "fast"))


def decode_options(decode: str) -> dict[str, Any]:
    """The ``CaptionOptions`` fields of a ``PIPELINES`` or ``DECODE_SCALING`` decode name."""
    return {"fast_decode": decode == "fast",
            "resize_on_device": decode.startswith(("device-resize", "decode-only")),
            "jpeg_decoder": "nvimagecodec" if decode.endswith("nvimagecodec") else "pillow"}


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


def worker_counts(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the host's cores, the core count itself last."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < cores]
    return tuple(counts + [cores])


PROFILES = {
    # Budgets sum to 440 s: with the setup and the wheel install, under 8 minutes. The
    # throughput worker's fits about ten XLA:GPU compiles; PyTorch's fits its bfloat16 rows
    # (its fastest) at every batch, float16 last (the compile and row times behind these
    # budgets: docs/results/history.md, "GPU runs: one NVIDIA H200").
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
        yield (f"chaotic-{seed}", work / f"chaotic-{seed}",
               lambda config, seed=seed: chaotic_pixels(seed, count, config.size[0]), 20)


def parity_other_forms(platform: str) -> dict[str, dict[str, Any]]:
    """Row name -> kernel choices: the cross- and self-attention forms ``platform``'s devices
    do not use (``backend.KERNELS``), so a platform can switch to either knowing its
    captions."""
    other_cross = other_form(platform, "cross_context")
    other_self = other_form(platform, "self_attention")
    return {f"{other_cross} cross-attention": {"cross_context": other_cross},
            f"{other_self} self-attention": {"self_attention": other_self}}


def throughput_variants(platform: str, gpu: bool) -> dict[str, dict[str, Any]]:
    """Variant name -> its kernel choices (``common.make_generator``), for ``platform``'s
    devices; the variant's first word is its dtype.

    "<dtype>" is the library's choice; the others each change one choice, to decide it for
    the platform (``backend.KERNELS``): the other search loop, the other cross-attention form
    and, on GPUs, bfloat16's attention forms first (the encoder's
    self-attention through the einsums instead of cuDNN's fused kernel, "bfloat16
    einsum-encoder", ``ENCODER_ATTENTION``; the cross-attention through cuDNN's,
    "bfloat16 cudnn-cross"; the decoder's self-attention as multiply-reduces, "bfloat16
    multiply_reduce-self", ``SELF_ATTENTION``) and the other matmul backend
    (``COMPILER_OPTIONS``): "float32 triton" (XLA's default Triton GEMM fusions) and
    "bfloat16 cublas" (cuBLAS only, as the exact mode compiles). These two come last, so
    "float32 triton" (XLA:GPU's longest compile) follows float32's other choices in the plan.
    """
    from flax_captioner import backend

    other_loop = other_form(platform, "search_loop")
    other_cross = other_form(platform, "cross_context")
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
            "compiler_options": backend.kernels("gpu", "float32").compiler_options}
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
    middle = batches[len(batches) // 2]
    plan = [("ours", dtype, batch) for dtype in ("bfloat16", "float32") for batch in batches
            if batch >= middle]
    plan += [("profile", "bfloat16", batch) for batch in sorted({middle, batches[-1]})]
    plan += [("profile", "float32", middle)]
    attention = [variant for variant, kwargs in variants.items()
                 if {"encoder_attention", "self_attention"} & set(kwargs)
                 or is_fused_cross_context(kwargs)]
    plan += [("ours", variant, batch) for variant in attention
             for batch in sorted({middle, batches[-1]})]
    plan += [("ours", variant, middle) for variant in variants
             if variant.startswith("bfloat16 ") and variant not in attention]
    plan += [("ours", dtype, batch) for dtype in ("bfloat16", "float32") for batch in batches
             if batch < middle]
    plan += [("ours", variant, middle) for variant in variants if variant.startswith("float32 ")]
    return plan + [("hf-flax", "float32", hf_flax_batch)]


def throughput_estimates(profile: str) -> tuple[dict[tuple[str, str], float],
                                               dict[tuple[str, str], float]]:
    """Guesses, for the budget, of (compile seconds, seconds per image) by (framework,
    variant or dtype), before a row of that kind is measured: fresh dicts the worker updates.
    A variant that changes XLA's options (GPU "float32 triton") has its own compile guess."""
    return {
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
    }[profile]
