"""Choices that depend on the backend: matmul precision, default batch size, bfloat16 on CPUs,
and the one-line error for a batch that does not fit in device memory.

Precision is an explicit choice of the compute dtype, never inherited from the caller's JAX
config:

- **Exact mode** (``float32``): every matmul is traced at ``"highest"`` precision, so a GPU
  does not run it as TF32 and a TPU does not run it as one bfloat16 pass (JAX's default on
  both). This is the mode whose captions are PyTorch's. On CPUs float32 matmuls are exact at
  any precision setting, so the mode costs nothing there.
- **Fast mode** (``bfloat16``): matmul operands (kernels, embeddings, activations entering a
  matmul, cross K/V and the self-attention cache) are bfloat16, traced at ``"default"``
  precision; ``model.py`` asks every projection for float32 results
  (``preferred_element_type``), and keeps the residual stream, softmax, layer norms and logits
  in float32. The one exception is the attention context (probabilities x values), produced in
  bfloat16 because it only feeds the next projection.

No host round trips inside the search: the compiled program has no host callbacks, infeed or
outfeed, and runs under ``jax.transfer_guard("disallow")`` (tests/test_backend.py).

XLA options per backend and compute dtype (``COMPILER_OPTIONS``): exact-mode programs on GPUs
run their matmuls on cuBLAS rather than Triton, which compiles 5x faster at the same speed.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_captioner.errors import CaptionerError

logger = logging.getLogger(__name__)

# compute dtype -> the matmul precision its programs are traced at.
MATMUL_PRECISION = {"float32": "highest", "bfloat16": "default"}

CPU_BATCH_SIZE = 8
# Images per GPU/TPU chip when the user sets no batch size. A decode step reads every weight
# once, so it is bound by weight reads until its rows (images x beams) pass the chip's
# FLOP-per-byte ridge: H100 dense bfloat16 ~990 TFLOP/s over 3.35 TB/s is ~295 rows,
# TPU v5e ~197 TFLOP/s over 819 GB/s is ~240 (datasheet figures, not measured here).
# 256 images x 4 beams = 1,024 rows clears both; greedy search (256 rows) sits near the ridge.
# Memory at 256 (``image_memory_bytes`` for nlpconnect, float32, 4 beams, max_length 16:
# ~36 MB per image) is ~9.3 GB plus ~1 GB of weights, which fits a 16 GB chip. The throughput
# at 64 / 256 / 1,024 is what scripts/accelerator_benchmark.py measures.
ACCELERATOR_BATCH_PER_DEVICE = 256
# Share of a device's memory limit a default batch may plan to use (XLA also needs workspace).
_MEMORY_SHARE = 0.75

# x86 /proc/cpuinfo flags of units that run bfloat16 dot products. Measured with
# scripts/benchmark.py (full-size random model, batch 8, 4 beams, max_length 16; images/s,
# bfloat16 vs float32; docs/benchmarks.md):
# - AMD EPYC family 25 model 17 (Zen 4: avx512_bf16, no AMX), 2 cores, 2026-11-27:
#   1.98 vs 1.14 (1.74x faster).
# - Intel Xeon with AMX (amx_bf16), 2 cores, 2026-11-26: 2.70 vs 1.76 (1.53x faster).
# - AMD EPYC family 25 model 1 (Zen 3: AVX2, neither flag), 2 cores, 2026-12-04: 1.18 vs
#   1.58 (0.75x: slower; issue 10 had reported 0.86 vs 1.09 on such a host).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


# decode_step's cross-attention form (model.CROSS_CONTEXT_FORMS) per platform.
# - CPU: "multiply_reduce". decode_step alone, nlpconnect size, 8 images x 4 beams, 2-core AMD
#   EPYC (Zen 4), 2026-11-27, best of 5 (multiply_reduce vs einsum): float32 96.9 vs 114.6 ms
#   (an earlier run 100.5 vs 137.1), bfloat16 58.0 vs 90.6 ms: XLA:CPU runs the einsum as
#   B x H matmuls of K rows each. On an AVX2-only AMD EPYC (Zen 3), 2026-12-04, whole
#   searches interleaved (scripts/benchmark.py --other-cross-context, batch 8): no gap either
#   way (float32 1.36 vs 1.46 and 1.65 vs 1.52 images/s, bfloat16 1.09 vs 1.03).
# - GPU: "einsum". One H200 (scripts/accelerator_benchmark.py, jax 0.11.2, bfloat16, batch
#   256, 4 beams, max_length 16), two runs on 2026-12-04: 1,960 vs 2,028 and 1,917 vs 2,082
#   images/s (einsum 1.03x and 1.09x), and in run 5 (cuDNN's encoder attention off in both)
#   2,157 vs 2,003 one batch at a time, 2,693 vs 2,527 streamed; with the autotuner off
#   (2026-11-27) 373 vs 380. Against cuDNN's fused kernel ("cudnn-cross"; run 6, cuDNN in the
#   encoder for both, batch 256): 2,293 vs 2,239 one batch at a time, 2,884 vs 2,800 streamed.
#   Its beam captions matched PyTorch's on the chaotic checkpoints (2026-11-27). float32's
#   speed with either form is not measured on a GPU.
# - TPU: not measured.
CROSS_CONTEXT = {"cpu": "multiply_reduce", "gpu": "einsum", "tpu": "multiply_reduce"}
# decode_step's self-attention form (model.SELF_ATTENTION_FORMS) per platform.
# - CPU: "einsum". On a 2-core AMD EPYC (Zen 3, AVX2), einsum vs multiply_reduce:
#   decode_step alone (nlpconnect size, 8 images x 4 beams, cache rows shuffled, best of 7
#   interleaved calls, 2026-12-04) float32 110.3 vs 111.2 ms, bfloat16 128.9 vs 131.6 ms;
#   whole searches (scripts/benchmark.py --other-self-attention, batch 8, 5 interleaved
#   batches, 2026-12-05) float32 2.11 vs 2.02 images/s, bfloat16 1.40 vs 1.39, same captions.
# - GPU: "einsum", the form measured in runs 5 and 6; multiply_reduce is unmeasured there.
#   Run 6's trace (one H200, bfloat16, batch 1,024) put the self-attention's read of the cache
#   through rows at 2.1 ms of a 10.8 ms step, where reading the cache once would take ~0.5 ms
#   at the datasheet's 4.8 TB/s (arithmetic): the einsums read a gathered copy, which the
#   multiply-reduces let XLA fuse away. scripts/accelerator_benchmark.py times it
#   ("bfloat16 multiply_reduce-self").
# - TPU: not measured.
SELF_ATTENTION = {"cpu": "einsum", "gpu": "einsum", "tpu": "einsum"}


# The encoder's self-attention form (model.ENCODER_ATTENTION_FORMS) per (platform, compute
# dtype); "einsum" where none is named.
# - GPU bfloat16: "cudnn" (jax.nn.dot_product_attention's fused kernel). Its einsums at batch
#   1,024 took 3.3 ms of an 11.1 ms encoder layer (scores 0.84, softmax 1.01, context 0.71,
#   head transposes 0.75; one H200, run 5, 2026-12-04). Run 5 measured cuDNN for the encoder
#   and the cross-attention together, against the einsums for both (jax 0.11.2, 4 beams,
#   max_length 16; images/s one batch at a time and streamed): batch 256 2,265 vs 2,157 and
#   2,833 vs 2,693; batch 1,024 2,784 vs 2,700 and 3,251 vs 2,044 (the einsums' first
#   streamed run at 1,024). Run 6 (same day, cuDNN for the encoder alone, the "einsum-encoder"
#   row switching it back): batch 256 2,293 vs 2,141 and 2,884 vs 2,650; batch 1,024 2,864 vs
#   2,662 and 3,361 vs 3,044; its trace shows cuDNN's kernel at 0.68 ms per layer (1,024).
# - GPU float32: cuDNN's kernel takes no float32; "xla" is unmeasured there.
# - CPU, TPU: cuDNN needs a GPU; "xla" is unmeasured on both.
ENCODER_ATTENTION = {("gpu", "bfloat16"): "cudnn"}


# The search's step loop (search.SEARCH_LOOPS) per platform.
# - GPU: "fixed_steps". XLA:GPU's WhileThunk copies an until_done loop's predicate to the host
#   every iteration, so the call that launches the program returns only when the search ends:
#   a batch cannot be dispatched while the one before runs (generator.one_ahead). Traces of
#   one bfloat16 batch of 256 on one H200 (2026-12-04, jax 0.11.2, 4 beams, max_length 16;
#   docs/benchmarks.md, "What the traces show"): the jitted call returned after 150 ms with
#   until_done, after 60 ms with fixed_steps, whose remaining ~83 ms of kernels ran with the
#   host free; each call spends ~29 ms copying the pixels into a staging buffer and ~16 ms
#   setting up CUDA graphs before the device starts, which overlaps the batch before only
#   with fixed_steps. One batch at a time the two ran even (fixed_steps 1,960 and 1,907,
#   until_done 1,975 and 1,917 images/s), which is why until_done was kept until the traces
#   were read; fixed_steps runs every step even after a batch's captions have ended.
# - CPU: XLA:CPU runs the loop on the host: until_done 2.28 vs fixed_steps 2.20 images/s
#   (full-size, batch 8, no caption ending early, 2-core AMD EPYC, 2026-11-27;
#   docs/benchmarks.md, "The search loop form").
# - TPU: the TPU evaluates the predicate on the chip. Not measured.
SEARCH_LOOP = {"cpu": "until_done", "gpu": "fixed_steps", "tpu": "until_done"}


# XLA options per (platform, compute dtype) for the mesh and single-device placements
# (jax.pmap takes none). GPU float32: matmuls on cuBLAS, not Triton GEMM fusions. On one H200
# (scripts/accelerator_benchmark.py, 2026-12-04, jax 0.11.2, batch 256, 4 beams, max_length
# 16) the exact mode compiled in 13.2 s instead of 65.5 s (most of it autotuning Triton
# configurations) and ran at 567 against 576 images/s. Turning the autotuner off instead
# (2026-11-27) compiled in 21 s but ran 4.6x slower.
COMPILER_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("gpu", "float32"): {"xla_gpu_enable_triton_gemm": False},
}


def compiler_options(platform: str, dtype: Any) -> dict[str, Any]:
    """XLA options for programs of compute ``dtype`` on devices of ``platform``."""
    return dict(COMPILER_OPTIONS.get((platform, jnp.dtype(dtype).name), {}))


def search_loop(platform: str) -> str:
    """The search loop form for devices of ``platform`` ("cpu", "gpu", "tpu")."""
    return SEARCH_LOOP.get(platform, "until_done")


def encoder_attention(platform: str, dtype: Any) -> str:
    """The encoder's self-attention form for programs of compute ``dtype`` on devices of
    ``platform``."""
    return ENCODER_ATTENTION.get((platform, jnp.dtype(dtype).name), "einsum")


def self_attention(platform: str) -> str:
    """The decoder's self-attention form for devices of ``platform`` ("cpu", "gpu", "tpu")."""
    return SELF_ATTENTION.get(platform, "einsum")


def cross_context(platform: str) -> str:
    """The cross-attention context form for devices of ``platform`` ("cpu", "gpu", "tpu")."""
    return CROSS_CONTEXT.get(platform, "multiply_reduce")


def matmul_precision(dtype: Any) -> str:
    """The matmul precision programs of compute ``dtype`` are traced at.

    Raises:
      ValueError: ``dtype`` is neither float32 nor bfloat16.
    """
    name = jnp.dtype(dtype).name
    if name not in MATMUL_PRECISION:
        raise ValueError(f"compute dtype must be float32 (exact) or bfloat16 (fast), got {name}")
    return MATMUL_PRECISION[name]


def at_precision(fn: Callable[..., Any], precision: str) -> Callable[..., Any]:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``.

    The precision is read when each matmul is traced and stored in the program, so a jitted
    wrapper compiles to the same program whatever the caller's ``jax_default_matmul_precision``.
    """

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced


def image_memory_bytes(*, encoder_length: int, hidden_size: int, num_layers: int,
                       encoder_heads: int, vocab_size: int, image_size: int,
                       num_beams: int = 4, max_length: int = 16,
                       dtype: Any = jnp.float32) -> int:
    """Device memory one image needs during a search, an upper bound (bytes).

    Sums what is live per image (S encoder positions, D hidden, L decoder layers, K beams,
    T = max_length, V vocabulary): pixels; cross K/V, L x 2 x S x D in the compute dtype;
    the self-attention cache twice (a beam reorder writes a new copy), 2 x K x L x 2 x T x D;
    beam scores over the vocabulary, 4 float32 copies of K x V (logits, log-softmax, scores,
    candidates); and the encoder's largest transients, counted as if they overlapped the
    search: attention probabilities (heads x S x S) and the MLP activation (S x 4D), twice each,
    float32.
    """
    item = jnp.dtype(dtype).itemsize
    pixels = 3 * image_size * image_size * 4
    cross = num_layers * 2 * encoder_length * hidden_size * item
    cache = 2 * num_beams * num_layers * 2 * max_length * hidden_size * item
    beam_scores = 4 * num_beams * vocab_size * 4
    encoder = 2 * 4 * (encoder_heads * encoder_length ** 2 + encoder_length * 4 * hidden_size)
    return pixels + cross + cache + beam_scores + encoder


# nlpconnect/vit-gpt2-image-captioning: ViT-B/16 at 224 (197 positions), GPT-2 12 x 768.
NLPCONNECT_IMAGE_BYTES = image_memory_bytes(
    encoder_length=197, hidden_size=768, num_layers=12, encoder_heads=12, vocab_size=50257,
    image_size=224)
NLPCONNECT_WEIGHT_BYTES = 239_195_904 * 4  # float32 parameters, cross-attention included


def default_batch_size(devices: Sequence[jax.Device], *,
                       image_bytes: int = NLPCONNECT_IMAGE_BYTES,
                       weight_bytes: int = NLPCONNECT_WEIGHT_BYTES) -> int:
    """The batch size to use when the user sets none, for a batch split over ``devices``.

    CPU: ``CPU_BATCH_SIZE`` (8). GPU/TPU: ``ACCELERATOR_BATCH_PER_DEVICE`` (256) images per
    device, lowered to the largest power of two whose images fit in ``_MEMORY_SHARE`` of the
    device's memory limit after the weights (where the device reports one), times the device
    count, so every device gets the same share.
    """
    if not devices:
        raise ValueError("default_batch_size needs at least one device")
    if all(device.platform == "cpu" for device in devices):
        return CPU_BATCH_SIZE
    per_device = ACCELERATOR_BATCH_PER_DEVICE
    limit = _memory_limit(devices[0])
    if limit is not None:
        fits = int((limit * _MEMORY_SHARE - weight_bytes) // image_bytes)
        per_device = min(per_device, 1 << max(fits, 1).bit_length() - 1)
    return per_device * len(devices)


def _memory_limit(device: jax.Device) -> int | None:
    """The device's memory limit in bytes, where its runtime reports one."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The x86 feature flags of this host (``cpuinfo``: text of /proc/cpuinfo, read when None).

    None where they are unknown (no /proc/cpuinfo, or no ``flags`` line: not Linux on x86).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
                cpuinfo = file.read()
        except OSError:
            return None
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else None


def slow_bfloat16_message(dtype: Any, devices: Sequence[jax.Device],
                          cpuinfo: str | None = None) -> str | None:
    """A one-line warning when bfloat16 is asked for on a CPU without bfloat16 units, else None.

    Only warns on knowledge: a host whose flags are unknown (not x86 Linux) gets no warning.
    """
    if jnp.dtype(dtype) != jnp.bfloat16 or any(d.platform != "cpu" for d in devices):
        return None
    flags = cpu_flags(cpuinfo)
    if flags is None or flags & set(BFLOAT16_CPU_FLAGS):
        return None
    return ("bfloat16 was asked for, but this CPU has no bfloat16 units "
            f"({' or '.join(BFLOAT16_CPU_FLAGS)}); on such CPUs bfloat16 measured slower than "
            "float32, which is also the exact mode")


def warn_if_slow_bfloat16(dtype: Any, devices: Sequence[jax.Device]) -> None:
    """Logs ``slow_bfloat16_message`` as one warning line, where there is one.

    A log record, not a Python warning: it prints as one line (the command line prefixes it
    with ``flax-captioner:``), never with a source path.
    """
    message = slow_bfloat16_message(dtype, devices)
    if message:
        logger.warning(message)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's RESOURCE_EXHAUSTED (``jax.errors.JaxRuntimeError``, formerly
    ``XlaRuntimeError``; both are RuntimeErrors whose message starts with the status code)."""
    return isinstance(error, RuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def out_of_memory_error(error: BaseException, *, batch: int, bucket: int, num_shards: int,
                        platform: str) -> CaptionerError:
    """The one-line error for a batch of ``batch`` images (compiled for ``bucket``, split over
    ``num_shards`` devices) that did not fit, with a smaller batch to try where one exists."""
    status = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    status = status if len(status) <= 160 else status[:157] + "..."
    compiled = f" (compiled for {bucket})" if bucket != batch else ""
    where = f"{num_shards} {platform} devices" if num_shards > 1 else f"{platform} memory"
    if bucket <= num_shards:
        return CaptionerError(f"a batch of {batch} images{compiled} does not fit in {where}, "
                              f"even at one image per device: {status}")
    smaller = max(bucket // 2, num_shards)
    return CaptionerError(f"a batch of {batch} images{compiled} does not fit in {where} "
                          f"({status}); try a batch of at most {smaller}",
                          fix=("smaller_batch",))
