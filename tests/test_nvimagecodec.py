"""nvImageCodec's CPU JPEG decoder against Pillow: equal pixels or None, never an exception."""

from __future__ import annotations

import concurrent.futures
import functools
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageCms

nvimgcodec = pytest.importorskip("nvidia.nvimgcodec",
                                 reason="nvImageCodec is not installed (nvidia-nvimgcodec-cu13)")

from flax_captioner.nvimagecodec import available, decode_jpeg  # noqa: E402


def _photo(width: int, height: int) -> Image.Image:
    """Smooth colour fields plus noise: every chroma sample differs from its neighbours."""
    side = max(width, height, 2)
    y, x = np.arange(height, dtype=np.float32)[:, None] / side, np.arange(width, dtype=np.float32) / side
    fields = np.stack(np.broadcast_arrays(255 * x, 255 * y, 128 + 100 * np.sin(9 * x + 5 * y)), -1)
    noise = np.random.default_rng(0).standard_normal(fields.shape, np.float32)
    return Image.fromarray(np.clip(fields + 20 * noise, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _photo_jpeg(width: int, height: int, mode: str = "RGB", **options) -> bytes:
    return _jpeg(_photo(width, height).convert(mode), **options)


def _pillow(data: bytes) -> np.ndarray:
    """What the model card's code decodes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _with_exif_orientation(orientation: int, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _photo_jpeg(64, 40, exif=exif.tobytes(), **options)


def _mpo() -> bytes:
    image, buffer = _photo(96, 64), io.BytesIO()
    image.save(buffer, "MPO", save_all=True, append_images=[image.rotate(90, expand=True)])
    return buffer.getvalue()


SIZES = [(640, 480), (333, 500), (1, 1), (17, 9), (1000, 750)]
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
_LAB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
CORPUS: dict[str, Callable[[], bytes]] = {
    **{f"{w}x{h} {name} q{quality}": functools.partial(_photo_jpeg, w, h, quality=quality,
                                                        subsampling=subsampling)
       for w, h in SIZES for name, subsampling in SUBSAMPLING.items() for quality in (75, 95)},
    **{f"{w}x{h} {name} progressive": functools.partial(_photo_jpeg, w, h, subsampling=subsampling,
                                                         progressive=True)
       for w, h in [(640, 480), (17, 9)] for name, subsampling in SUBSAMPLING.items()},
    "4000x3000 4:2:0 q90": functools.partial(_photo_jpeg, 4000, 3000, quality=90),
    "gray 640x480": functools.partial(_photo_jpeg, 640, 480, "L"),
    "gray 17x9 progressive": functools.partial(_photo_jpeg, 17, 9, "L", progressive=True),
    "exif orientation 6": functools.partial(_with_exif_orientation, 6),
    "exif orientation 8, 4:2:2": functools.partial(_with_exif_orientation, 8, subsampling=1),
    "rgb without ycbcr (adobe)": functools.partial(_photo_jpeg, 96, 64, keep_rgb=True),
    "restart markers": functools.partial(_photo_jpeg, 200, 120, restart_marker_blocks=3),
    "optimized huffman tables": functools.partial(_photo_jpeg, 200, 120, optimize=True),
    "quality 100": functools.partial(_photo_jpeg, 123, 77, quality=100),
    "quality 1": functools.partial(_photo_jpeg, 123, 77, quality=1),
    "icc profile (lab)": functools.partial(_photo_jpeg, 96, 64, icc_profile=_LAB_PROFILE),
    "comment": functools.partial(_photo_jpeg, 96, 64, comment="a comment"),
    "mpo (first frame)": _mpo,
    "bytes after eoi": lambda: _photo_jpeg(96, 64) + b"\x00trailer\xff\xd9",
}


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    return {name: make() for name, make in CORPUS.items()}


def _nvimgcodec_alone(data: bytes, fancy_upsampling: int = 1) -> np.ndarray | None:
    """nvImageCodec's own decode, without decode_jpeg's checks of the header."""
    decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                 backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
                                 options=f":fancy_upsampling={fancy_upsampling}")
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.SRGB,
                                     sample_format=nvimgcodec.I_RGB)
    image = decoder.decode(nvimgcodec.CodeStream(data), params=params)
    return None if image is None else np.asarray(image)


def test_available():
    assert available()


@pytest.mark.parametrize("name", CORPUS)
def test_equal_to_pillow(corpus, name):
    data = corpus[name]
    pixels = decode_jpeg(data)
    assert pixels is not None
    expected = _pillow(data)
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    assert np.array_equal(pixels, expected)


def test_exif_orientation_not_applied(corpus):
    assert decode_jpeg(corpus["exif orientation 6"]).shape == (40, 64, 3)


@pytest.mark.parametrize("fancy_upsampling, equal", [(0, False), (1, True)])
def test_fancy_upsampling_is_what_makes_420_equal(corpus, fancy_upsampling, equal):
    data = corpus["640x480 4:2:0 q95"]
    assert np.array_equal(_nvimgcodec_alone(data, fancy_upsampling), _pillow(data)) is equal


def _cmyk(black: int) -> bytes:
    cmyk = np.asarray(_photo(64, 48).convert("RGBA")).copy()
    cmyk[..., 3] = black  # PIL's RGB -> CMYK leaves K at 0, which both convert alike
    return _jpeg(Image.frombytes("CMYK", (64, 48), cmyk.tobytes()), quality=90)


def test_cmyk_is_not_equal():
    """Why CMYK goes to Pillow: nvImageCodec's CMYK -> RGB rounds differently."""
    data = _cmyk(90)
    assert not np.array_equal(_nvimgcodec_alone(data), _pillow(data))


def _with_sof_byte(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with the byte ``offset`` bytes into its SOF0 segment's body replaced."""
    body = data.index(b"\xff\xc0") + 4
    return data[:body + offset] + bytes([value]) + data[body + offset + 1:]


JPEG_444 = _photo_jpeg(32, 32, subsampling=0)


@pytest.mark.parametrize("data", [
    pytest.param(_cmyk(0), id="cmyk"),
    pytest.param(_cmyk(90), id="cmyk with black"),
    pytest.param(_with_sof_byte(JPEG_444, 7, 0x12), id="4:4:0 sampling"),
    pytest.param(_with_sof_byte(JPEG_444, 7, 0x41), id="4:1:1 sampling"),
    pytest.param(_with_sof_byte(JPEG_444, 0, 12), id="12-bit"),
    pytest.param(JPEG_444.replace(b"\xff\xc0", b"\xff\xc9", 1), id="arithmetic coding"),
])
def test_kinds_left_to_pillow(data):
    assert decode_jpeg(data) is None


def _png() -> bytes:
    buffer = io.BytesIO()
    _photo(8, 8).save(buffer, "PNG")
    return buffer.getvalue()


JPEG = _photo_jpeg(96, 64, quality=90)
GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8))


@pytest.mark.parametrize("data", [
    pytest.param(_png(), id="png"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xd8", id="soi only"),
    pytest.param(b"\xff\xd8\xff", id="soi and a marker byte"),
    pytest.param(JPEG[:len(JPEG) // 2], id="truncated in the scan"),
    pytest.param(JPEG[:200], id="truncated in the header"),
    pytest.param(JPEG[:-2], id="no eoi"),
    pytest.param(b"\xff\xd8\xff" + GARBAGE, id="garbage after soi"),
])
def test_not_decodable_is_none(data):
    assert decode_jpeg(data) is None


def test_corrupt_marker_after_the_rows_is_none():
    """A stuffed 0xFF near the end of the scan turned into a DQT marker: nvImageCodec decodes
    the file (it stops after the last row), Pillow rejects it (it reads on to EOI)."""
    stuffing = JPEG.rindex(b"\xff\x00")
    data = JPEG[:stuffing + 1] + b"\xdb" + JPEG[stuffing + 2:]
    assert _nvimgcodec_alone(data) is not None
    with pytest.raises(OSError):
        _pillow(data)
    assert decode_jpeg(data) is None


def test_corrupt_files_are_equal_or_none():
    """Truncated and byte-flipped files: whatever is decoded equals what Pillow decodes."""
    rng = np.random.default_rng(0)
    decoded = 0
    for original in [JPEG, _photo_jpeg(96, 64, progressive=True), _photo_jpeg(96, 64, "L"),
                     _photo_jpeg(96, 64, subsampling=1, restart_marker_blocks=2)]:
        for trial in range(150):
            if trial % 5 == 0:
                data = bytearray(original[:rng.integers(2, len(original))])
            else:
                data = bytearray(original)
                for position in rng.integers(2, len(data), trial % 3 + 1):
                    data[position] = rng.integers(0, 256)
            pixels = decode_jpeg(bytes(data))
            if pixels is not None:
                decoded += 1
                assert np.array_equal(pixels, _pillow(bytes(data))), trial
    assert decoded > 200  # most flips land in the scan, where both decoders carry on


def test_decompression_bomb_limit_goes_to_pillow(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 64 - 1)
    assert decode_jpeg(JPEG) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 64)
    assert decode_jpeg(JPEG) is not None


def test_concurrent_decoding(corpus):
    names = [name for name in corpus if not name.startswith("4000x3000")] * 2
    expected = {name: _pillow(corpus[name]) for name in names}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: decode_jpeg(corpus[name]), names))
    for name, pixels in zip(names, results):
        assert np.array_equal(pixels, expected[name]), name


# The decoder in the input layer: the feed's pixels and error rows are Pillow's, whatever the
# decoder, on threads and worker processes, resized on the host or the device.

def _files(directory) -> list:
    """JPEGs it takes (4:2:0, progressive, gray, EXIF-rotated), a CMYK one and a PNG it leaves
    to Pillow, an empty and a truncated JPEG (error rows)."""
    from flax_captioner.sources import InputItem

    data = [_photo_jpeg(640, 480), _photo_jpeg(333, 500, progressive=True),
            _photo_jpeg(1100, 60, "L"), _photo_jpeg(90, 70, "CMYK"), b"",
            _photo_jpeg(300, 200)[:2000], _exif_rotated_jpeg()]
    png = io.BytesIO()
    _photo(50, 40).save(png, "PNG")
    data.append(png.getvalue())
    items = []
    for index, content in enumerate(data):
        path = directory / f"{index}.jpg"
        path.write_bytes(content)
        items.append(InputItem(index, str(path)))
    return items


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return _jpeg(_photo(120, 80), exif=exif)


def _feed(items, decoder: str, **options) -> tuple[list, list]:
    from flax_captioner import feed, resize
    from flax_captioner.preprocess import ImageDecoding, PreprocessConfig, pixel_lut

    processes = options.pop("processes", False)
    with feed.batches(items, PreprocessConfig(), 8, num_threads=2, decode_processes=processes,
                      decoding=ImageDecoding(jpeg_decoder=decoder, **options)) as batches:
        [batch] = list(batches)
    pixels = batch.pixel_values
    if isinstance(pixels, resize.Canvases):  # what lies past each image is not compared
        pixels = resize.pixel_values(pixels.pixels, pixels.coefficients,
                                     pixel_lut(pixels.config))
    return np.asarray(pixels), [error and error.reason for error in batch.errors]


@pytest.mark.parametrize("options", [{}, {"processes": True}, {"device_resize": True},
                                     {"exif_transpose": True}, {"fast": True}], ids=str)
def test_the_feed_gives_pillows_pixels_and_errors(tmp_path, options):
    items = _files(tmp_path)
    ours, our_errors = _feed(items, "nvimagecodec", **dict(options))
    pillow, pillow_errors = _feed(items, "pillow", **dict(options))
    assert our_errors == pillow_errors
    assert [reason is None for reason in our_errors] == [True] * 4 + [False] * 2 + [True] * 2
    assert np.array_equal(ours, pillow)


def test_the_feed_decodes_the_jpegs_it_takes_with_nvimagecodec(tmp_path, monkeypatch):
    """On threads: the five JPEGs it takes go through ``decode_jpeg`` and come back as
    pixels; not with EXIF rotation or fast decoding asked for."""
    from flax_captioner import nvimagecodec

    decoded = []

    def counted(data: bytes):
        pixels = decode_jpeg(data)
        decoded.append(pixels is not None)
        return pixels

    monkeypatch.setattr(nvimagecodec, "decode_jpeg", counted)
    items = _files(tmp_path)
    _feed(items, "nvimagecodec")
    assert sorted(decoded) == [False] * 2 + [True] * 4  # CMYK and truncated: Pillow's
    decoded.clear()
    _feed(items, "nvimagecodec", exif_transpose=True)
    _feed(items, "nvimagecodec", fast=True)
    _feed(items, "pillow")
    assert decoded == []


def test_the_captioner_uses_it_when_installed_and_refuses_it_when_not(monkeypatch):
    """Unset, the option means nvImageCodec when installed (the same captions as Pillow's),
    else Pillow, silently; asked for without the package, one OptionError naming it."""
    from flax_captioner import nvimagecodec
    from flax_captioner.captioner import Captioner
    from flax_captioner.errors import OptionError
    from flax_captioner.options import CaptionOptions

    captioner = Captioner.from_pretrained("examples/shapes-captioner")
    jpegs = [_photo_jpeg(64, 48), _photo_jpeg(200, 100, progressive=True)]
    used = []
    monkeypatch.setattr(nvimagecodec, "decode_jpeg",
                        lambda data: used.append(1) or decode_jpeg(data))
    assert captioner.caption(jpegs) == captioner.caption(jpegs, jpeg_decoder="pillow")
    assert len(used) == 2
    monkeypatch.setattr(nvimagecodec, "available", lambda: False)
    assert captioner.caption(jpegs) == captioner.caption(jpegs, jpeg_decoder="pillow")
    assert len(used) == 2
    with pytest.raises(OptionError, match=r"^jpeg_decoder nvimagecodec: NVIDIA nvImageCodec "
                                          r"is not installed \(pip install"):
        captioner.caption(jpegs, CaptionOptions(jpeg_decoder="nvimagecodec"))
