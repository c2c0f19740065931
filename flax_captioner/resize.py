"""PIL's resize and the ViT normalisation as one jittable JAX function, bit-identical to
``preprocess.preprocess``.

The host pads each decoded uint8 RGB image into a fixed square canvas and computes, per image
and axis, PIL's fixed-point filter coefficients in compact banded form (``batch_coefficients``);
``pixel_values`` then runs PIL's two 8-bit passes (Pillow's ``Resample.c``: integer weights of
22 fractional bits, uint8 rounding between the passes, Pillow's pass order) and the
per-channel lookup table of ``preprocess``, in one compiled program per canvas side and batch
size. ``supported`` says which configs it reproduces; callers fall back to the host path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL
from PIL import Image

from flax_captioner.preprocess import CANVAS_SIDES, PreprocessConfig

# (major, minor) of the installed Pillow: its release decides the pass order (``height_first``).
PILLOW_RELEASE = tuple(int(part) for part in PIL.__version__.split(".")[:2])
_PRECISION_BITS = 22  # Resample.c's PRECISION_BITS: 32 - 8 bits of result - 2 of headroom
# Float32 sums of uint8 pixel * byte products stay exact integers while below 2**24.
_MAX_TAPS = 2**24 // (255 * 255)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    # Resample.c's constants are C floats (0.54f, 0.46f), widened to double.
    return math.sin(x) / x * (float(np.float32(0.54)) + float(np.float32(0.46)) * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# Resample.c's filters (double arithmetic, as Python floats): resample value -> (filter, support).
# NEAREST and Pillow's MKS filters take other code paths, so they stay on the host.
_FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    int(Image.Resampling.BOX): (_box, 0.5),
    int(Image.Resampling.BILINEAR): (_triangle, 1.0),
    int(Image.Resampling.HAMMING): (_hamming, 1.0),
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.LANCZOS): (_lanczos, 3.0),
}


class Coefficients(NamedTuple):
    """One batch's banded fixed-point filter coefficients (a JAX pytree); T taps per canvas.

    Attributes:
      height_start: int32[B, H]: the first canvas row each output row reads.
      height_kk: int32[B, H, T]: that row's weights, zero past the image's taps.
      width_start: int32[B, W]: the first canvas column each output column reads.
      width_kk: int32[B, W, T]: that column's weights.
      height_first: bool[B]: Pillow resizes the height first (else the width first).
    """

    height_start: np.ndarray | jax.Array
    height_kk: np.ndarray | jax.Array
    width_start: np.ndarray | jax.Array
    width_kk: np.ndarray | jax.Array
    height_first: np.ndarray | jax.Array


@dataclasses.dataclass(frozen=True)
class Canvases:
    """A batch for a program that resizes on the device (``Generator.dispatch`` takes it in
    place of float32 pixel values).

    Attributes:
      pixels: uint8[B, C, C, 3]: each image at the top left of its canvas; what lies past an
        image is never read (its weights are zero), so a reused buffer needs no clearing.
      coefficients: ``batch_coefficients`` of the images for side C.
      config: the preprocessing they reproduce (its lookup table is part of the program).
    """

    pixels: np.ndarray
    coefficients: Coefficients
    config: PreprocessConfig

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """Every per-image array, batch axis 0: the program's batch arguments."""
        return (self.pixels, *self.coefficients)


def _taps(in_size: int, out_size: int, resample: int) -> int:
    """Resample.c's ksize: the most taps an output of this axis can have."""
    return math.ceil(_FILTERS[resample][1] * max(in_size / out_size, 1.0)) * 2 + 1


def supported(config: PreprocessConfig) -> bool:
    """Whether ``pixel_values`` reproduces ``config``: a resize with one of PIL's convolution
    filters (not NEAREST or the MKS filters) whose taps keep the float32 sums exact."""
    return (config.do_resize and config.resample in _FILTERS
            and _taps(CANVAS_SIDES[-1], min(config.size), config.resample) <= _MAX_TAPS)


def unsupported_reason(config: PreprocessConfig) -> str:
    """Why ``supported(config)`` is false, in one line."""
    if not config.do_resize:
        return "do_resize is false: images keep their own size, which no canvas program takes"
    if config.resample not in _FILTERS:
        return (f"resample {config.resample} ({Image.Resampling(config.resample).name}) takes "
                "another code path in PIL than the convolution filters the device reproduces")
    return (f"an output size of {config.size} from a {CANVAS_SIDES[-1]}-pixel canvas needs more "
            f"filter taps than float32 sums keep exact ({_MAX_TAPS})")


def canvas_side(height: int, width: int) -> int | None:
    """The smallest of ``CANVAS_SIDES`` holding a height x width image; None past the largest."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    return next((side for side in CANVAS_SIDES if max(height, width) <= side), None)


def pad_to_canvas(pixels: np.ndarray, side: int) -> np.ndarray:
    """uint8[h, w, 3] -> uint8[side, side, 3]: the image at the top left, zeros elsewhere."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8[h, w, 3], got {pixels.dtype}{list(pixels.shape)}")
    if max(pixels.shape[:2]) > side:
        raise ValueError(f"pixels {pixels.shape[0]}x{pixels.shape[1]} do not fit a {side} canvas")
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
    return canvas


def height_first(in_size: tuple[int, int], out_size: tuple[int, int],
                 pillow: tuple[int, int] = PILLOW_RELEASE) -> bool:
    """Whether Pillow release ``pillow`` (major, minor) resizes (height, width) ``in_size`` to
    ``out_size`` height first. Pillow 13's C code does when the height shrinks by more than
    twice what the width does; Pillow 12.2 and 12.3's ``Image.resize`` when the image is over
    100 times taller than wide and its height shrinks; earlier releases never do.
    """
    (height, width), (out_height, out_width) = in_size, out_size
    if pillow >= (13, 0):
        shrink_height, shrink_width = height - out_height, width - out_width
        return shrink_height > 0 and shrink_height > 2 * shrink_width
    return pillow >= (12, 2) and height > 100 * width and out_height < height


@functools.lru_cache(maxsize=4096)
def axis_coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample.c's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` for one axis.

    Returns:
      (start int32[out], kk int32[out, taps]), read-only: output i is
      ``(2**21 + sum_t pixel[start[i] + t] * kk[i, t]) >> 22``, clipped to 0..255. An axis whose
      size does not change is the identity, as PIL skips that pass.
    """
    if in_size < 1 or out_size < 1 or resample not in _FILTERS:
        raise ValueError(f"axis_coefficients: bad in_size {in_size}, out_size {out_size} "
                         f"or resample {resample}")
    if in_size == out_size:
        start = np.arange(out_size, dtype=np.int32)
        kk = np.full((out_size, 1), 1 << _PRECISION_BITS, np.int32)
    else:
        start, kk = _banded(in_size, out_size, resample)
    start.flags.writeable = kk.flags.writeable = False  # shared by every caller of the cache
    return start, kk


def _banded(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """``axis_coefficients`` of a resized axis, in Resample.c's order of double operations."""
    filter_, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ss = 1.0 / filterscale
    start = np.empty(out_size, np.int32)
    kk = np.zeros((out_size, _taps(in_size, out_size, resample)), np.int32)
    for out in range(out_size):
        center = (out + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [filter_((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for weight in weights:  # in order: the double sum depends on it
            total += weight
        for x, weight in enumerate(weights):
            weight = weight / total if total != 0.0 else weight
            kk[out, x] = int((-0.5 if weight < 0 else 0.5) + weight * (1 << _PRECISION_BITS))
        start[out] = xmin
    return start, kk


def batch_coefficients(sizes: Sequence[tuple[int, int]], side: int, config: PreprocessConfig,
                       pillow: tuple[int, int] = PILLOW_RELEASE) -> Coefficients:
    """The coefficients of B images of (height, width) ``sizes`` in ``side`` canvases, padded
    to the taps of the canvas's largest image, so one program serves every batch of a side."""
    if not supported(config):
        raise ValueError(f"config is not supported on the device: {unsupported_reason(config)}")
    if side not in CANVAS_SIDES:
        raise ValueError(f"side must be one of CANVAS_SIDES {CANVAS_SIDES}, got {side}")
    if not sizes:
        raise ValueError("sizes is empty: a batch needs at least one image")
    bad = next((size for size in sizes if not all(1 <= length <= side for length in size)), None)
    if bad is not None:
        raise ValueError(f"sizes: (height, width) {bad} does not fit a {side} canvas")
    out_height, out_width = config.size
    taps = max(_taps(side, out, config.resample) for out in config.size)

    def padded(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
        start, kk = axis_coefficients(in_size, out_size, config.resample)
        return start, np.pad(kk, ((0, 0), (0, taps - kk.shape[1])))

    height = [padded(size[0], out_height) for size in sizes]
    width = [padded(size[1], out_width) for size in sizes]
    return Coefficients(
        np.stack([start for start, _ in height]), np.stack([kk for _, kk in height]),
        np.stack([start for start, _ in width]), np.stack([kk for _, kk in width]),
        np.array([height_first(size, config.size, pillow) for size in sizes]))


def _dense(start: jax.Array, kk: jax.Array, side: int) -> jax.Array:
    """int32[B, M] starts and int32[B, M, T] weights -> int32[B, M, side] matrices, by a
    one-hot comparison of each tap's canvas position (rows past an image get zero weight)."""
    taps = jnp.arange(kk.shape[2])
    positions = start[:, :, None, None] + taps[:, None]  # [B, M, T, 1]
    hits = positions == jnp.arange(side)
    return jnp.where(hits, kk[:, :, :, None], 0).sum(axis=2)


def _resample(planes: jax.Array, weights: jax.Array, subscripts: str) -> jax.Array:
    """One of PIL's 8-bit passes: ``einsum(subscripts, planes, weights)`` in fixed point.

    Exact on any backend: each int32 weight is split into bytes (b0 + 256 b1 + 65536 b2, b2
    signed); uint8 pixels and byte parts are exact in bfloat16, and each partial sum is an
    integer below 2**24 (``_MAX_TAPS``), so float32 accumulates it exactly in any order; the
    parts are recombined in int32 as PIL sums.
    """
    parts = jnp.stack([weights & 255, (weights >> 8) & 255, weights >> 16], axis=1)
    sums = jnp.einsum(subscripts, planes.astype(jnp.bfloat16), parts.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32).astype(jnp.int32)
    total = sums[:, 0] + (sums[:, 1] << 8) + (sums[:, 2] << 16)
    return jnp.clip((total + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS, 0, 255
                    ).astype(jnp.uint8)


def pixel_values(canvases: jax.Array, coefficients: Coefficients, lut: jax.Array) -> jax.Array:
    """PIL's resize then ``lut``: ``preprocess.preprocess``'s output, computed on the device.
    Pure and jittable: one program per canvas side, batch size and config serves every image
    size and both pass orders.

    Args:
      canvases: uint8[B, C, C, 3]: images at the top left of their canvases (``pad_to_canvas``).
      coefficients: ``batch_coefficients`` of those images for side C.
      lut: float32[3, 256]: each channel's value per uint8 level (``preprocess.pixel_lut``).

    Returns:
      float32[B, 3, H, W], (H, W) being the config's size.
    """
    height_start, height_kk, width_start, width_kk, first_height = coefficients
    side, out_height, out_width = canvases.shape[1], height_start.shape[1], width_start.shape[1]
    out = max(out_height, out_width)  # both orders in one program: pad the outputs square

    def square(start: jax.Array, kk: jax.Array) -> jax.Array:
        return _dense(jnp.pad(start, ((0, 0), (0, out - start.shape[1]))),
                      jnp.pad(kk, ((0, 0), (0, out - kk.shape[1]), (0, 0))), side)

    by_height, by_width = square(height_start, height_kk), square(width_start, width_kk)
    flip = first_height[:, None, None]
    first, second = jnp.where(flip, by_height, by_width), jnp.where(flip, by_width, by_height)
    # Planes [B, 3, rows, columns]; a height-first image is transposed so that the first pass
    # always contracts the columns.
    planes = jnp.transpose(canvases, (0, 3, 1, 2))
    planes = jnp.where(first_height[:, None, None, None], jnp.swapaxes(planes, 2, 3), planes)
    once = _resample(planes, first, "bxrc,bpmc->bpxrm")  # [B, 3, C, out]
    twice = _resample(once, second, "bxrm,bpnr->bpxnm")  # [B, 3, out, out]
    levels = jnp.where(first_height[:, None, None, None], jnp.swapaxes(twice, 2, 3), twice)
    levels = levels[:, :, :out_height, :out_width].astype(jnp.int32)
    return jnp.take(lut.reshape(-1), levels + 256 * jnp.arange(3)[:, None, None])
