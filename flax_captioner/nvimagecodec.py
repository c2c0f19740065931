"""An optional, faster exact JPEG decoder for the host: NVIDIA nvImageCodec's CPU decoder
(libjpeg-turbo, package ``nvidia-nvimgcodec-cu13``, no GPU needed). On the JPEG kinds it takes,
its pixels equal Pillow's ``Image.open(...).convert("RGB")`` bit for bit; ``decode_jpeg``
returns None for everything else, and Pillow decodes that as usual.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

# Baseline, extended sequential and progressive Huffman JPEGs; lossless, hierarchical and
# arithmetic-coded ones go to Pillow (not verified equal).
_DECODED_SOF = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_SOF = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}  # less DHT, JPG, DAC
_PROGRESSIVE, _SOS, _EOI = 0xC2, 0xDA, 0xD9
JPEG_START = b"\xff\xd8\xff"  # SOI and the next marker's 0xFF: every JPEG file starts so
# Luma sampling (h, v) of the colour JPEGs Pillow writes, 4:4:4, 4:2:2 and 4:2:0, with chroma
# at (1, 1): what the tests compare. Others (4:4:0, 4:1:1 ...) go to Pillow.
_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (2, 2)})
# Bytes that may follow 0xFF inside entropy-coded data: stuffing, restart markers, fill.
_IN_SCAN = np.isin(np.arange(256), [0x00, *range(0xD0, 0xD8), 0xFF])
_local = threading.local()  # a Decoder per thread: a shared one is not documented thread-safe


@functools.cache
def _codec() -> tuple[Any, Any] | None:
    """The ``nvidia.nvimgcodec`` module and the decode parameters, or None without them."""
    try:
        with _quiet_stderr():  # on a machine without CUDA its import prints 8 lines of it
            from nvidia import nvimgcodec
        params = nvimgcodec.DecodeParams(apply_exif_orientation=False,  # as convert() does
                                         color_spec=nvimgcodec.SRGB, sample_format=nvimgcodec.I_RGB)
        _decoder(nvimgcodec)
    except Exception:  # not installed, a shared library missing, an incompatible release
        return None
    return nvimgcodec, params


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the library's C++ side writes there, not to
    ``sys.stderr``. Process-wide, so ``available`` is called once before decode threads start
    (``feed.batches``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _decoder(nvimgcodec: Any) -> Any:
    """This thread's CPU decoder, one worker thread. Fancy chroma upsampling is Pillow's; some
    releases default to it off, and 4:2:0 and 4:2:2 pixels then differ."""
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = nvimgcodec.Decoder(
            device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
            options=":fancy_upsampling=1")
    return decoder


def available() -> bool:
    """Whether nvImageCodec imports and makes a CPU decoder here (checked once)."""
    return _codec() is not None


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """``np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))`` for a JPEG file's bytes, no
    EXIF rotation: uint8 [h, w, 3]. None where Pillow must decode them: not a JPEG, a kind not
    verified equal (CMYK/YCCK, 12-bit, lossless, arithmetic, sampling other than 4:4:4/4:2:2/
    4:2:0, multi-scan sequential), corrupt or truncated, over ``Image.MAX_IMAGE_PIXELS`` (Pillow
    reports those), or nvImageCodec missing. Thread-safe; never raises for bad data."""
    codec = _codec()
    size = None if codec is None else _trusted_size(data)
    if size is None:
        return None
    nvimgcodec, params = codec
    try:
        image = _decoder(nvimgcodec).decode(nvimgcodec.CodeStream(data), params=params)
    except Exception:  # RuntimeError for data it cannot parse
        return None
    pixels = None if image is None else np.asarray(image)
    return pixels if pixels is not None and pixels.shape == (*size, 3) else None


def _trusted_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header of a JPEG that ``decode_jpeg`` may decode, else None."""
    if data[:3] != JPEG_START:
        return None
    size, sof, pos = None, None, 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == _SOS:
            ends = sof == _PROGRESSIVE or _first_marker_is_eoi(data, pos + 2 + length)
            return size if ends else None
        if (length < 2 or marker < 0xC0 or 0xD0 <= marker <= 0xD9 or marker == 0xFF  # fill, odd
                or marker in _OTHER_SOF or (size and marker in _DECODED_SOF)):
            return None
        if marker in _DECODED_SOF:
            size, sof = _frame_size(data[pos + 4:pos + 2 + length]), marker
            if size is None:
                return None
        pos += 2 + length
    return None


def _frame_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from an SOF body: 8-bit gray or colour sampled as Pillow writes it."""
    if len(frame) < 6 or frame[0] != 8 or frame[5] not in (1, 3) or len(frame) < 6 + 3 * frame[5]:
        return None
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    limit = Image.MAX_IMAGE_PIXELS  # read per call, as preprocess.load_image does
    if not height or not width or (limit is not None and height * width > limit):
        return None
    sampling = [(frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 15) for i in range(frame[5])]
    if frame[5] == 3 and (sampling[0] not in _LUMA_SAMPLING or sampling[1:] != [(1, 1)] * 2):
        return None
    return height, width


def _first_marker_is_eoi(data: bytes, scan: int) -> bool:
    """Whether the first marker after the scan data at ``scan`` is EOI: nvImageCodec stops after
    the last row, Pillow reads on and fails on a corrupt marker (a second scan fails this too)."""
    body = np.frombuffer(data, np.uint8, offset=min(scan, len(data)))
    ff = np.flatnonzero(body[:-1] == 0xFF)
    markers = ff[~_IN_SCAN[body[ff + 1]]]
    return bool(markers.size) and body[markers[0] + 1] == _EOI
