"""Choices that depend on the backend: matmul precision, the kernels a search compiles with,
default batch size, bfloat16 on CPUs, and the one-line error for a batch that does not fit in
device memory.

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

Kernels (``Kernels``): the attention forms, the search's step loop and XLA's options, one
table per (platform, compute dtype) (``KERNELS``), resolved and checked by ``kernels``. The
forms of a field compute the same function; a platform gets the ones measured faster there,
the portable defaults where none was measured (docs/performance.md, "Kernel choices per
backend").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flax_captioner import model
from flax_captioner.errors import CaptionerError

logger = logging.getLogger(__name__)

# compute dtype -> the matmul precision its programs are traced at.
MATMUL_PRECISION = {"float32": "highest", "bfloat16": "default"}


# The forms each ``Kernels`` field takes.
FORMS: dict[str, tuple[str, ...]] = {
    "cross_context": ("multiply_reduce", "einsum") + model.FUSED_FORMS,
    "self_attention": ("einsum", "multiply_reduce"),
    "encoder_attention": ("einsum",) + model.FUSED_FORMS,
    "search_loop": ("until_done", "fixed_steps"),
}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How a compiled search computes: its attention forms, its step loop, XLA's options.

    The forms of a field compute the same function (tests/test_model.py, tests/test_backend.py)
    at different speeds per backend. The defaults run on every platform; ``kernels`` gives a
    platform's own (``KERNELS``). Benchmarks switch one field:
    ``dataclasses.replace(kernels, cross_context="einsum")``.

    Attributes:
      cross_context: the decoder's cross-attention (``model.cross_kv``, ``model.decode_step``):
        its context (probabilities x values) as a float32 ``"multiply_reduce"`` or an
        ``"einsum"`` in the compute dtype, or the whole attention through
        ``jax.nn.dot_product_attention`` (``"xla"``, or ``"cudnn"``: one fused kernel, GPUs in
        bfloat16 only), an image's K beams as its K queries.
      self_attention: the decoder's self-attention over the cache, read through the rows each
        beam reads (``model.decode_step``): ``"einsum"`` over the gathered keys and values,
        or float32 ``"multiply_reduce"``, which XLA can fuse the gather into.
      encoder_attention: the encoder's self-attention (``model.encode``): ``"einsum"``, or
        ``jax.nn.dot_product_attention`` (``"xla"``, ``"cudnn"``).
      search_loop: how the step loop ends (``search.run_steps``): ``"until_done"``, once every
        caption has ended, or ``"fixed_steps"``, after ``max_length - 2`` steps, a trip count
        XLA knows.
      compiler_options: XLA options the searches compile with (``jax.jit``'s), as (name,
        value) pairs sorted by name (a mapping is accepted); the pmap placement takes none.

    Raises:
      ValueError: (one line) a field is not one of its ``FORMS``.
    """

    # XLA:CPU runs the einsum as B x H small matmuls; the multiply-reduce measured faster.
    cross_context: str = "multiply_reduce"
    # Ran even with the multiply-reduce on CPUs; the only form measured on GPUs.
    self_attention: str = "einsum"
    # cuDNN's kernel needs a GPU and bfloat16; "xla", JAX's reference, is unmeasured.
    encoder_attention: str = "einsum"
    # Stops when the captions end; XLA:CPU runs the loop on the host, a TPU on the chip.
    search_loop: str = "until_done"
    compiler_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name, forms in FORMS.items():
            if getattr(self, name) not in forms:
                raise ValueError(f"{name} must be one of {forms}, got {getattr(self, name)!r}")
        try:
            options = dict(self.compiler_options)
        except (TypeError, ValueError):
            raise ValueError("compiler_options must map XLA option names to values, got "
                             f"{self.compiler_options!r}") from None
        object.__setattr__(self, "compiler_options", tuple(sorted(options.items())))

    def check(self, platform: str, dtype: Any) -> None:
        """Raises ValueError (one line) for a form devices of ``platform`` cannot run in
        compute ``dtype``: cuDNN's fused attention runs on GPUs in bfloat16 only."""
        name = jnp.dtype(dtype).name
        for field in ("cross_context", "encoder_attention"):
            if getattr(self, field) == "cudnn" and (platform, name) != ("gpu", "bfloat16"):
                raise ValueError(f"{field} 'cudnn' runs on GPUs in bfloat16, not on {platform} "
                                 f"in {name}")


# The kernels per (platform, compute dtype); any other pair (CPUs; TPUs, not measured) runs
# ``Kernels()``. One reason per choice; the measurements are in docs/performance.md,
# "Kernel choices per backend".
# - cross_context "einsum" on GPUs: faster there than the multiply-reduce and than cuDNN's
#   fused kernel (measured in bfloat16; float32 takes the same form).
# - search_loop "fixed_steps" on GPUs: XLA:GPU copies an until_done loop's predicate to the
#   host every step, so the call that launches a search returns only when it ends, and the
#   next batch cannot be dispatched while it runs.
# - encoder_attention "cudnn" on GPUs in bfloat16: one fused kernel instead of the einsums'
#   scores, softmax, context and head transposes (it takes no float32).
# - compiler_options on GPUs in float32: matmuls on cuBLAS instead of Triton GEMM fusions,
#   the same speed without autotuning Triton's configurations at every compile.
KERNELS: dict[tuple[str, str], Kernels] = {
    ("gpu", "float32"): Kernels(cross_context="einsum", search_loop="fixed_steps",
                                compiler_options={"xla_gpu_enable_triton_gemm": False}),
    ("gpu", "bfloat16"): Kernels(cross_context="einsum", encoder_attention="cudnn",
                                 search_loop="fixed_steps"),
}


def kernels(platform: str, dtype: Any, **overrides: Any) -> Kernels:
    """The kernels of programs of compute ``dtype`` on devices of ``platform`` ("cpu", "gpu",
    "tpu"): ``KERNELS``'s, with ``overrides`` (``Kernels`` fields) in place of its.

    Raises:
      ValueError: (one line) an unknown form, or one ``platform`` cannot run in ``dtype``.
    """
    chosen = dataclasses.replace(KERNELS.get((platform, jnp.dtype(dtype).name), Kernels()),
                                 **overrides)
    chosen.check(platform, dtype)
    return chosen


CPU_BATCH_SIZE = 8
# Images per GPU/TPU chip when the user sets no batch size. A decode step reads every weight
# once, so it is bound by weight reads until its rows (images x beams) pass the chip's
# FLOP-per-byte ridge, a few hundred rows on current GPUs and TPUs: 256 images x 4 beams
# clears it, and their memory (``image_memory_bytes``) fits a 16 GB chip. The arithmetic and
# the throughput per batch size: docs/performance.md, "Default batch size".
ACCELERATOR_BATCH_PER_DEVICE = 256
# Share of a device's memory limit a default batch may plan to use (XLA also needs workspace).
_MEMORY_SHARE = 0.75

# x86 /proc/cpuinfo flags of units that run bfloat16 dot products: with one, bfloat16
# captioned faster than float32; with neither, slower (docs/performance.md, "bfloat16 on
# CPUs").
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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
