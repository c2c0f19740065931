"""The device resize (flax_captioner.resize) against the host path, bit for bit: JPEGs of many
sizes and kinds, both of Pillow's pass orders, every convolution filter, one program per canvas."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from flax_captioner import resize
from flax_captioner.preprocess import (
    PreprocessConfig,
    pixel_lut,
    load_image,
    preprocess,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT = PreprocessConfig()
IMAGENET = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}
# (width, height, encoder options): photo sizes (both orientations, an exact 2x, the model's
# size, an upscale, slivers, each canvas filled), chroma subsamplings, progressive, L and CMYK.
JPEGS = [
    (640, 480, {"subsampling": 2}), (480, 640, {"subsampling": 1}),
    (333, 500, {"subsampling": 0}), (500, 333, {"progressive": True}),
    (1000, 750, {"subsampling": 2}), (448, 448, {"mode": "L"}), (224, 224, {}),
    (100, 80, {"mode": "CMYK"}), (300, 200, {"progressive": True, "subsampling": 0}),
    (1, 1, {}), (7, 900, {}), (1024, 1024, {"subsampling": 1}), (224, 600, {}),
    (256, 256, {"mode": "L"}), (40, 250, {"subsampling": 1}), (512, 40, {}),
    *((int(w), int(h), {}) for w, h in np.random.default_rng(7).integers(1, 1025, (4, 2))),
]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus grain, so that both resize passes round differently."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.integers(-40, 41, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def decoded_jpeg(width: int, height: int, seed: int, mode: str = "RGB", **options) -> Image.Image:
    """The RGB image ``load_image`` makes of a JPEG of ``photo(width, height)``."""
    encoded = io.BytesIO()
    photo(width, height, seed).convert(mode).save(encoded, "JPEG", quality=90, **options)
    return load_image(encoded.getvalue())


@pytest.fixture(scope="module")
def corpus() -> list[Image.Image]:
    return [decoded_jpeg(width, height, seed, **options)
            for seed, (width, height, options) in enumerate(JPEGS)]


PIXEL_VALUES = jax.jit(resize.pixel_values)


def device(images: list[Image.Image], side: int, config: PreprocessConfig = DEFAULT,
           pillow: tuple[int, int] = resize.PILLOW_RELEASE, run=PIXEL_VALUES,
           **replace) -> np.ndarray:
    """``resize.pixel_values`` of ``images`` in ``side`` canvases (``replace``: coefficient
    fields to override)."""
    sizes = [(image.height, image.width) for image in images]
    coefficients = resize.batch_coefficients(sizes, side, config, pillow)._replace(**replace)
    canvases = np.stack([resize.pad_to_canvas(np.asarray(image), side) for image in images])
    return np.asarray(run(canvases, coefficients, pixel_lut(config)))


def assert_bit_identical(ours: np.ndarray, host: np.ndarray, images: list[Image.Image]) -> None:
    assert ours.dtype == host.dtype == np.float32 and ours.shape == host.shape
    differing = [f"{image.width}x{image.height}" for image, a, b in zip(images, ours, host)
                 if not np.array_equal(a, b)]
    assert not differing, f"differ from the host path: {differing}"


@pytest.mark.parametrize("side", resize.CANVAS_SIDES)
def test_every_jpeg_that_fits_a_canvas_matches_the_host_path_bit_for_bit(corpus, side):
    # Each canvas holds every image that fits it, so a batch mixes fill levels and pass orders.
    images = [image for image in corpus if max(image.size) <= side]
    orders = {resize.height_first((image.height, image.width), DEFAULT.size) for image in images}
    assert orders == {True, False} or resize.PILLOW_RELEASE < (13, 0)
    assert_bit_identical(device(images, side), preprocess(images, DEFAULT), images)


def test_pass_order_rules_of_pillow_12_and_13():
    out = (224, 224)
    # Pillow 13: height first when the height shrinks by more than twice the width's shrink.
    assert resize.height_first((376, 300), out, (13, 0)) is False  # 152 == 2 * 76
    assert resize.height_first((377, 300), out, (13, 0)) is True
    assert resize.height_first((230, 100), out, (13, 0)) is True  # the width grows
    assert resize.height_first((224, 100), out, (13, 0)) is False  # the height stays
    assert resize.height_first((100, 300), out, (13, 0)) is False  # the height grows
    # Pillow 12.2 and 12.3: only images over 100 times taller than wide whose height shrinks.
    assert resize.height_first((900, 7), out, (12, 3)) is True
    assert resize.height_first((700, 7), out, (12, 2)) is False  # exactly 100 times
    assert resize.height_first((900, 7), (1000, 224), (12, 3)) is False  # the height grows
    assert not any(resize.height_first(size, out, (12, 3)) for size in [(377, 300), (500, 6)])
    # Earlier releases: the width first, always.
    assert not any(resize.height_first(size, out, (12, 1)) for size in [(377, 300), (900, 7)])


def test_the_installed_pillow_uses_its_pass_order_and_the_order_matters():
    # Sizes on both sides of Pillow 13's and 12.3's rules; each image runs in both orders in
    # one batch (CI runs this file under Pillow 13 and 12: .ci/transformers5.sh).
    images = [decoded_jpeg(width, height, seed) for seed, (width, height) in enumerate(
        [(300, 376), (300, 377), (100, 230), (333, 500), (7, 500), (500, 333), (4, 500)])]
    sizes = [(image.height, image.width) for image in images]
    assert [resize.height_first(size, DEFAULT.size, (13, 0)) for size in sizes] == [
        False, True, True, True, True, False, True]
    assert [resize.height_first(size, DEFAULT.size, (12, 3)) for size in sizes] == [
        False] * 6 + [True]
    both = device(images * 2, 512, height_first=np.repeat([True, False], len(images)))
    by_height, by_width = both[:len(images)], both[len(images):]
    host = preprocess(images, DEFAULT)
    for size, height_first, by_height_one, by_width_one, host_one in zip(
            sizes, resize.batch_coefficients(sizes, 512, DEFAULT).height_first,
            by_height, by_width, host):
        assert not np.array_equal(by_height_one, by_width_one), size  # the order shows
        expected, other = (by_height_one, by_width_one) if height_first else (by_width_one,
                                                                               by_height_one)
        assert np.array_equal(host_one, expected), size
        assert not np.array_equal(host_one, other), size


@pytest.mark.parametrize("resample", [Image.Resampling.BOX, Image.Resampling.BILINEAR,
                                      Image.Resampling.HAMMING, Image.Resampling.BICUBIC,
                                      Image.Resampling.LANCZOS], ids=lambda value: value.name)
def test_every_convolution_filter_and_another_config_match_pil(resample):
    # 32x48 output from shrunk, grown and exact-size images; bicubic and Lanczos have
    # negative weights, so their passes clip.
    config = PreprocessConfig(size=(32, 48), resample=int(resample), **IMAGENET)
    images = [decoded_jpeg(width, height, seed) for seed, (width, height) in
              enumerate([(640, 480), (333, 500), (48, 32), (20, 30), (1, 1), (500, 7)])]
    images.append(Image.fromarray(np.tile(np.uint8([[[0, 255, 0], [255, 0, 255]]]), (32, 8, 1))))
    assert_bit_identical(device(images, 640, config), preprocess(images, config), images)


def double_hamming(x: float) -> float:
    """Resample.c's Hamming window with double constants instead of its 0.54f and 0.46f."""
    x = abs(x)
    if x == 0.0 or x >= 1.0:
        return float(x == 0.0)
    x = x * math.pi
    return math.sin(x) / x * (0.54 + 0.46 * math.cos(x))


def one_pass(row: np.ndarray, start: np.ndarray, kk: np.ndarray) -> np.ndarray:
    """PIL's 8-bit pass over one row of pixels."""
    padded = np.pad(row.astype(np.int64), (0, kk.shape[1]))
    sums = [padded[first:first + kk.shape[1]] @ weights for first, weights in zip(start, kk)]
    return np.clip((np.array(sums) + (1 << 21)) >> 22, 0, 255)


def test_hamming_weights_use_pils_float_constants(monkeypatch):
    # Resample.c computes 0.54f + 0.46f * cos(x); with double constants some integer weights
    # move by one (55 -> 48 here). A row is drawn whose sums round differently with those.
    config = PreprocessConfig(size=(32, 48), resample=int(Image.Resampling.HAMMING))
    start, ours = resize.axis_coefficients(55, 48, config.resample)
    monkeypatch.setitem(resize._FILTERS, config.resample, (double_hamming, 1.0))
    _, doubles = resize._banded(55, 48, config.resample)
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    row = rng.integers(0, 256, 55)
    for column in np.flatnonzero((ours != doubles).any(axis=1)):
        draws = rng.integers(0, 256, (100_000, ours.shape[1]))
        flips = np.flatnonzero(((draws @ ours[column]) + (1 << 21)) >> 22
                               != ((draws @ doubles[column]) + (1 << 21)) >> 22)
        taps = min(ours.shape[1], 55 - start[column])
        if flips.size:
            row[start[column]:start[column] + taps] = draws[flips[0], :taps]
    assert not np.array_equal(one_pass(row, start, ours), one_pass(row, start, doubles))
    image = Image.fromarray(np.tile(row.astype(np.uint8)[None, :, None], (32, 1, 3)))
    assert_bit_identical(device([image], 256, config), preprocess([image], config), [image])


def test_the_widest_supported_filter_stays_exact():
    # 8x8 from a 1024 canvas: 257 taps per output, the most the float32 sums allow, on
    # saturated and noisy images.
    config = PreprocessConfig(size=(8, 8))
    assert resize.supported(config)
    assert not resize.supported(PreprocessConfig(size=(4, 8)))
    white = Image.new("RGB", (1024, 1000), (255, 255, 255))
    images = [white, photo(1000, 1024), photo(1024, 1024, seed=1)]
    assert_bit_identical(device(images, 1024, config), preprocess(images, config), images)


def test_one_program_serves_every_size_and_both_orders_of_a_canvas():
    traces = []

    def counted(*arguments):
        traces.append(1)
        return resize.pixel_values(*arguments)

    run = jax.jit(counted)
    for sizes in [[(200, 150), (150, 200), (1, 256)], [(256, 256), (90, 250), (256, 3)],
                  [(224, 224), (17, 31), (250, 60)]]:
        images = [photo(width, height, seed=height) for height, width in sizes]
        assert_bit_identical(device(images, 256, run=run), preprocess(images, DEFAULT), images)
    assert len(traces) == 1


def test_canvas_sides_and_what_stays_on_the_host():
    assert resize.canvas_side(1, 1) == resize.CANVAS_SIDES[0]
    assert resize.canvas_side(480, 640) == 640
    assert resize.canvas_side(500, 333) == 512
    assert resize.canvas_side(1024, 1024) == 1024
    assert resize.canvas_side(1025, 10) is None
    assert resize.canvas_side(3000, 4000) is None
    with pytest.raises(ValueError, match="positive"):
        resize.canvas_side(0, 5)
    assert resize.supported(DEFAULT)
    for unsupported in [{"resample": int(Image.Resampling.NEAREST)},
                        {"do_resize": False}, *[{"resample": int(Image.Resampling[name])}
                                                for name in ("MKS2013", "MKS2021")  # Pillow 13
                                                if name in Image.Resampling.__members__]]:
        config = PreprocessConfig(**unsupported)
        assert not resize.supported(config)
        with pytest.raises(ValueError, match="not supported"):
            resize.batch_coefficients([(10, 10)], 256, config)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match="sizes"):
        resize.batch_coefficients([(300, 10)], 256, DEFAULT)
    with pytest.raises(ValueError, match="sizes"):
        resize.batch_coefficients([], 256, DEFAULT)
    with pytest.raises(ValueError, match="side"):
        resize.batch_coefficients([(10, 10)], 300, DEFAULT)
    with pytest.raises(ValueError, match="pixels"):
        resize.pad_to_canvas(np.zeros((10, 300, 3), np.uint8), 256)
    with pytest.raises(ValueError, match="pixels"):
        resize.pad_to_canvas(np.zeros((10, 10), np.uint8), 256)
    with pytest.raises(ValueError, match="in_size"):
        resize.axis_coefficients(0, 224, DEFAULT.resample)


def test_an_unchanged_axis_is_the_identity_as_pil_skips_it():
    for resample in (1, 2, 3, 4, 5):
        start, kk = resize.axis_coefficients(224, 224, resample)
        assert start.tolist() == list(range(224)) and (kk[:, 0] == 1 << 22).all()


def test_benchmark_smoke_run():
    completed = subprocess.run([sys.executable, "-m", "scripts.benchmark_resize", "--smoke",
                                "--json"], check=False, capture_output=True, text=True, timeout=120,
                               cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert report["bit_identical"] is True
    assert report["device_ms_per_image"] > 0 and report["host_ms_per_image"] > 0


# The device resize in the captioning path: the feed's canvases, the generator's program,
# the pipeline's rows.

def feed_batches(items, config, **decoding):
    from flax_captioner import feed
    from flax_captioner.preprocess import ImageDecoding

    workers = decoding.pop("workers", 2)
    with feed.batches(items, config, 4, num_threads=workers,
                      decode_processes=decoding.pop("processes", False),
                      decoding=ImageDecoding(**decoding)) as batches:
        return list(batches)


def encoded_items(tmp_path):
    """Image files of every canvas size and larger than the largest, in the modes the host
    converts (CMYK JPEG, palette and RGBA PNG, a 16-bit PNG that clips), and a corrupt one."""
    from flax_captioner.sources import InputItem

    files = [(640, 480, "RGB", "jpg"), (333, 500, "RGB", "jpg"), (1300, 900, "RGB", "jpg"),
             (100, 80, "CMYK", "jpg"), (2100, 40, "RGB", "jpg"), (1024, 1000, "RGB", "jpg"),
             (300, 200, "P", "png"), (120, 260, "RGBA", "png"), (64, 48, "I;16", "png")]
    paths = []
    for index, (width, height, mode, suffix) in enumerate(files):
        path = tmp_path / f"{index}.{suffix}"
        image = photo(width, height, seed=index)
        if mode == "I;16":  # values past 255: convert("RGB") clips them
            image = Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 200))
        image.convert(mode).save(path)
        paths.append(path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths.insert(2, tmp_path / "corrupt.jpg")
    return [InputItem(index, str(path)) for index, path in enumerate(paths)]


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_feed_canvases_give_the_host_pixels_bit_for_bit(tmp_path, processes, caplog):
    """The feed's canvas batches (decoded on threads or worker processes; a photo over the
    largest canvas resized on the host first; a padded last batch; an error row) resize on the
    device to exactly the host feed's pixel values."""
    items = encoded_items(tmp_path)
    host = feed_batches(items, DEFAULT, processes=processes)
    ours = feed_batches(items, DEFAULT, processes=processes, device_resize=True)
    assert [b.num_decoded for b in ours] == [b.num_decoded for b in host] == [4, 4, 1]
    assert [e is None for b in ours for e in b.errors] == [e is None for b in host
                                                           for e in b.errors]
    for host_batch, canvas_batch in zip(host, ours):
        canvases = canvas_batch.pixel_values
        assert isinstance(canvases, resize.Canvases) and canvases.pixels.dtype == np.uint8
        values = np.asarray(PIXEL_VALUES(canvases.pixels, canvases.coefficients,
                                         pixel_lut(DEFAULT)))
        assert values.shape == host_batch.pixel_values.shape
        assert np.array_equal(values, host_batch.pixel_values)
    # The smallest canvas that holds each batch's largest image; photos over 1024 came resized.
    assert [batch.pixel_values.pixels.shape[1] for batch in ours] == [640, 1024, 256]
    # The 16-bit PNG's clipping is named once per run, on either path.
    clipped = [record for record in caplog.records if "I;16 image" in record.getMessage()]
    assert len(clipped) == 2


def test_generator_runs_canvases_through_the_same_search(tmp_path):
    """One program resizes then searches: sequences and scores equal the pixel path's
    exactly, under the mesh placement (batch padded to the bucket)."""
    from flax_captioner import loading, sharding
    from flax_captioner.generator import Generator
    from flax_captioner.settings import GenerationSettings
    from flax_captioner.testing import CHAOTIC_SEEDS, make_chaotic_checkpoint

    checkpoint = loading.load_checkpoint(make_chaotic_checkpoint(tmp_path / "model",
                                                                 CHAOTIC_SEEDS[0]))
    config = PreprocessConfig(size=(32, 32))
    generator = Generator(checkpoint.params, checkpoint.config,
                          data_parallel=sharding.data_parallel("mesh"))
    settings = GenerationSettings.resolve(checkpoint.generation_defaults, num_beams=3,
                                          max_length=12)
    images = [photo(width, height, seed=width) for width, height in
              [(640, 480), (90, 250), (32, 32), (500, 333), (47, 300)]]
    canvases = resize.Canvases(
        np.stack([resize.pad_to_canvas(np.asarray(image), 640) for image in images]),
        resize.batch_coefficients([(i.height, i.width) for i in images], 640, config), config)
    ours = generator.generate(canvases, settings)
    host = generator.generate(preprocess(images, config), settings)
    assert np.array_equal(ours.sequences, host.sequences)
    assert np.array_equal(ours.scores, host.scores)
    with pytest.raises(ValueError, match=r"canvases resize to \(224, 224\)"):
        generator.generate(resize.Canvases(canvases.pixels, canvases.coefficients, DEFAULT),
                           settings)


def test_captioning_with_resize_on_device_writes_the_same_rows(tmp_path):
    """``CaptionOptions(resize_on_device=True)``: the shapes captioner's rows (captions and
    scores) equal the host path's, error rows included; a preprocessing the device cannot
    reproduce is one OptionError naming the option."""
    from flax_captioner.captioner import Captioner
    from flax_captioner.errors import OptionError
    from flax_captioner.options import CaptionOptions
    from flax_captioner.pipeline import run_pipeline
    from flax_captioner.writers import read_rows

    captioner = Captioner.from_pretrained(str(REPO / "examples" / "shapes-captioner"))
    inputs = [str(REPO / "examples" / "images"), *(item.name for item in
                                                   encoded_items(tmp_path))]
    rows = {}
    for on_device in (False, True):
        output = tmp_path / f"rows-{on_device}.jsonl"
        run_pipeline(inputs, str(output), CaptionOptions(resize_on_device=on_device,
                                                         batch_size=4, num_beams=2),
                     captioner=captioner)
        rows[on_device] = list(read_rows(str(output), "jsonl"))
    assert rows[True] == rows[False] and len(rows[True]) > 8
    nearest = Captioner(dataclasses.replace(
        captioner.checkpoint, preprocess_config=PreprocessConfig(
            resample=int(Image.Resampling.NEAREST))))
    with pytest.raises(OptionError, match=r"^resize_on_device cannot reproduce this checkpoint's "
                                         r"preprocessing: resample 0 \(NEAREST\) takes"):
        nearest.caption([photo(40, 30)], resize_on_device=True)
