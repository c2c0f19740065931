"""Preprocessing parity with transformers' ViTImageProcessor, config round trips, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import ViTImageProcessor

from flax_captioner.errors import ImageReadError, ModelLoadError
from flax_captioner.preprocess import (
    ImageDecoding,
    PreprocessConfig,
    load_and_preprocess_one,
    load_image,
    preprocess,
)
from flax_captioner.testing import NLPCONNECT_PREPROCESSOR

TOLERANCE = 1e-5

IMAGENET_BICUBIC_CONFIG = {
    "size": {"height": 160, "width": 200},
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "ViTImageProcessor",
}
OTHER_CONFIGS = [
    {"size": [96, 128], "resample": 1, "do_rescale": False},
    {"size": 64, "resample": 0, "do_normalize": False},
    {"size": 100, "resample": 4, "image_mean": 0.3, "image_std": 0.2, "rescale_factor": 0.0025},
    {"size": 32, "resample": 5, "do_rescale": False, "do_normalize": False},
]


def reference(images: list[Image.Image], config: dict) -> np.ndarray:
    """ViTImageProcessor's pixel values, told that the images are channels-last (they are)."""
    processor = ViTImageProcessor.from_dict(config)
    return processor(images, return_tensors="np", input_data_format="channels_last").pixel_values


def max_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs.astype(np.float32)).max())


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """RGB noise over a colour gradient, so that resizing filters see both edges and slopes."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 180, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 76, (height, width, 3), dtype=np.uint8)
    return Image.fromarray((rows + cols + noise).astype(np.uint8), "RGB")


def mode_image(mode: str, seed: int = 0) -> Image.Image:
    """A 48x64 image in ``mode`` whose values exercise that mode's conversion to RGB."""
    rng = np.random.default_rng(seed)
    shape = (48, 64)
    rgb = noise_image(*shape, seed=seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, shape, dtype=np.uint8) * 255, "L").convert("1")
    if mode in ("L", "RGB", "CMYK"):
        return rgb.convert(mode)
    if mode in ("LA", "RGBA"):
        alpha = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L")
        image = rgb.convert(mode[:-1])
        image.putalpha(alpha)
        return image
    if mode in ("P", "P+transparency"):
        return rgb.quantize(colors=64)
    if mode == "I;16":  # 16-bit values, most above 255
        return Image.fromarray(rng.integers(0, 700, shape, dtype=np.uint16))
    if mode == "I":  # 32-bit signed, with negatives
        return Image.fromarray(rng.integers(-100, 500, shape, dtype=np.int32))
    if mode == "F":  # fractions, negatives and values above 255
        return Image.fromarray(rng.uniform(-20.0, 300.0, shape).astype(np.float32))
    raise AssertionError(mode)


# (mode, file format): each mode saved where PIL reads it back in that same mode.
MODE_FILES = [
    ("1", "PNG"),
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("P+transparency", "PNG"),
    ("P+transparency", "GIF"),
    ("RGB", "PNG"),
    ("RGB", "JPEG"),
    ("RGBA", "PNG"),
    ("CMYK", "JPEG"),
    ("CMYK", "TIFF"),
    ("I;16", "PNG"),
    ("I", "TIFF"),
    ("F", "TIFF"),
]


@pytest.mark.parametrize("config", [NLPCONNECT_PREPROCESSOR, IMAGENET_BICUBIC_CONFIG], ids=["nlpconnect", "imagenet"])
@pytest.mark.parametrize(("mode", "file_format"), MODE_FILES, ids=[f"{m}-{f}" for m, f in MODE_FILES])
def test_every_mode_matches_the_model_card_pipeline(tmp_path, mode, file_format, config):
    path = tmp_path / f"image.{file_format.lower()}"
    image = mode_image(mode.split("+")[0])
    # A palette index the image uses, so that no encoder drops it as unused.
    transparency = {"transparency": image.getpixel((0, 0))} if mode.endswith("+transparency") else {}
    image.save(path, file_format, **transparency)
    with Image.open(path) as opened:
        assert opened.mode == mode.split("+")[0]  # the file really holds this mode
        assert ("transparency" in opened.info) == mode.endswith("+transparency")

    # The model card's code, with the processor left to guess the layout as the card does.
    expected = ViTImageProcessor.from_dict(config)(
        images=[Image.open(path).convert("RGB")], return_tensors="np"
    ).pixel_values[0]
    ours = load_and_preprocess_one(path, PreprocessConfig.from_dict(config))
    assert max_difference(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_load_image_converts_in_memory_images_like_convert_rgb(mode):
    image = mode_image(mode)
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))


def test_high_depth_modes_clip_to_255_as_convert_rgb_does():
    # Documented behaviour: no scaling from 16 bits, clipping instead (what the card feeds the model).
    image = Image.fromarray(np.array([[0, 100, 255, 256, 65535]], dtype=np.uint16))
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 100, 255, 255, 255]


def test_exif_orientation_is_not_applied_as_the_card_does_not(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    noise_image(30, 80).save(path, exif=exif)
    assert load_image(path).size == (80, 30)  # (width, height) as stored


def smooth_photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with mild grain: what a photo is to a JPEG encoder."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-6, 7, field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "decoded"), [((640, 480), (320, 240)), ((2000, 1000), (500, 250)),
                                               ((4000, 3000), (500, 375)), ((400, 300), (400, 300))])
def test_fast_decode_reduces_a_jpeg_in_the_dct_domain_only_while_it_covers_the_target(
        tmp_path, size, decoded):
    path = tmp_path / "photo.jpg"
    smooth_photo(size[1], size[0]).save(path, quality=90)
    assert load_image(path, jpeg_draft_size=(224, 224)).size == decoded
    assert load_image(path).size == size


def test_fast_decode_pixels_are_close_to_the_exact_ones_and_other_formats_are_exact(tmp_path):
    config = PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR)
    fast = ImageDecoding(fast=True)
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "photo.png"
    smooth_photo(1536, 2048).save(jpeg, quality=90)
    smooth_photo(1536, 2048).save(png)
    exact_pixels = load_and_preprocess_one(jpeg, config)
    fast_pixels = load_and_preprocess_one(jpeg, config, decoding=fast)
    difference = np.abs(fast_pixels - exact_pixels)
    # Measured: mean 0.002, max 0.016 on photo-like JPEGs of this size (docs/benchmarks.md).
    assert 0 < difference.mean() < 0.01 and difference.max() < 0.1
    np.testing.assert_array_equal(load_and_preprocess_one(png, config, decoding=fast),
                                  load_and_preprocess_one(png, config))
    # An in-memory image was decoded by its owner already: nothing to reduce.
    image = smooth_photo(480, 640)
    np.testing.assert_array_equal(load_and_preprocess_one(image, config, decoding=fast),
                                  load_and_preprocess_one(image, config))


def test_fast_decode_keeps_the_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displays 480 wide, 640 high
    smooth_photo(480, 640).save(path, exif=exif, quality=90)
    config = PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR)
    upright = load_and_preprocess_one(path, config, decoding=ImageDecoding(exif_transpose=True))
    fast = load_and_preprocess_one(path, config,
                                   decoding=ImageDecoding(exif_transpose=True, fast=True))
    as_stored = load_and_preprocess_one(path, config, decoding=ImageDecoding(fast=True))
    assert np.abs(fast - upright).mean() < 0.01 < np.abs(as_stored - upright).mean()


@pytest.fixture(scope="module")
def odd_sized_images() -> dict[tuple[int, int], Image.Image]:
    """(height, width) -> RGB image: single pixels, slivers both ways, heights 1 and 3, one big."""
    sizes = [(1, 1), (1, 2000), (2000, 1), (3000, 2), (2, 3000), (3, 50), (480, 640), (3000, 4000)]
    return {size: noise_image(*size, seed=index) for index, size in enumerate(sizes)}


@pytest.mark.parametrize("config", [NLPCONNECT_PREPROCESSOR, IMAGENET_BICUBIC_CONFIG], ids=["nlpconnect", "imagenet"])
def test_sizes_and_aspect_ratios_match(odd_sized_images, config):
    images = list(odd_sized_images.values())
    ours = preprocess(images, PreprocessConfig.from_dict(config))
    assert max_difference(ours, reference(images, config)) <= TOLERANCE


@pytest.mark.parametrize("config", OTHER_CONFIGS, ids=lambda config: json.dumps(config))
def test_other_configs_match(config):
    images = [noise_image(37, 53, seed=1), noise_image(300, 200, seed=2)]
    ours = preprocess(images, PreprocessConfig.from_dict(config))
    assert max_difference(ours, reference(images, config)) <= TOLERANCE


def test_without_resize_the_images_keep_their_size():
    config = {"do_resize": False, "size": {"shortest_edge": 10}}  # size unused: ViTImageProcessor accepts it
    with pytest.raises(ValueError, match="height"):
        PreprocessConfig.from_dict(config)  # documented: we refuse it even when unused
    config = {"do_resize": False}
    images = [noise_image(30, 40, seed=3), noise_image(30, 40, seed=4)]
    ours = preprocess(images, PreprocessConfig.from_dict(config))
    assert ours.shape == (2, 3, 30, 40)
    assert max_difference(ours, reference(images, config)) <= TOLERANCE
    with pytest.raises(ValueError, match="differ in size"):
        preprocess([noise_image(30, 40), noise_image(40, 30)], PreprocessConfig.from_dict(config))


def test_non_rgb_images_handed_to_preprocess_are_converted_like_load_image():
    image = mode_image("RGBA")
    config = PreprocessConfig()
    np.testing.assert_array_equal(preprocess([image], config)[0], load_and_preprocess_one(image, config))


# --- configs --------------------------------------------------------------------------------


def processor_fields(processor: ViTImageProcessor) -> dict:
    """ViTImageProcessor's settings in PreprocessConfig's terms."""
    mean, std = processor.image_mean, processor.image_std
    return {
        "do_resize": processor.do_resize,
        "size": (processor.size["height"], processor.size["width"]),
        "resample": int(processor.resample),
        "do_rescale": processor.do_rescale,
        "rescale_factor": processor.rescale_factor,
        "do_normalize": processor.do_normalize,
        "image_mean": tuple(mean) if isinstance(mean, list) else (mean,) * 3,
        "image_std": tuple(std) if isinstance(std, list) else (std,) * 3,
    }


ALL_CONFIGS = [{}, NLPCONNECT_PREPROCESSOR, IMAGENET_BICUBIC_CONFIG, *OTHER_CONFIGS]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda config: json.dumps(config))
def test_from_dict_reads_what_vit_image_processor_reads(config):
    ours = PreprocessConfig.from_dict(config)
    assert dataclasses.asdict(ours) == processor_fields(ViTImageProcessor.from_dict(config))


def test_nlpconnect_config_reads_as_documented():
    assert PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR) == PreprocessConfig(
        do_resize=True,
        size=(224, 224),
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    assert PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR) == PreprocessConfig()  # the defaults


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda config: json.dumps(config))
def test_saved_config_loads_into_vit_image_processor(tmp_path, config):
    ours = PreprocessConfig.from_dict(config)
    ours.save_pretrained(tmp_path)
    processor = ViTImageProcessor.from_pretrained(tmp_path)
    assert processor_fields(processor) == dataclasses.asdict(ours)
    assert PreprocessConfig.from_pretrained(tmp_path) == ours
    assert PreprocessConfig.from_dict(ours.to_dict()) == ours


@pytest.mark.parametrize(
    "size",
    [{"shortest_edge": 224}, {"shortest_edge": 224, "longest_edge": 500}, {"max_height": 9, "max_width": 9}],
)
def test_sizes_vit_image_processor_cannot_resize_to_are_refused(size):
    processor = ViTImageProcessor.from_dict({"size": size})  # loads ...
    with pytest.raises(ValueError):
        processor(noise_image(20, 20), return_tensors="np")  # ... but fails on the first image
    with pytest.raises(ValueError, match="'height' and 'width'"):
        PreprocessConfig.from_dict({"size": size})


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (None, "not found"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"size": {"shortest_edge": 224}}), "'height' and 'width'"),
        (json.dumps({"image_mean": [0.5, 0.5]}), "image_mean"),
        (json.dumps({"resample": 17}), "resample"),
    ],
)
def test_bad_config_files_raise_model_load_error_naming_the_file(tmp_path, contents, message):
    path = tmp_path / "preprocessor_config.json"
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(ModelLoadError, match=message) as caught:
        PreprocessConfig.from_pretrained(tmp_path)
    assert str(path) in str(caught.value)


# --- bad inputs -----------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height 8-bit grey pixels, with no pixel data to speak of."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_bad_input(tmp_path, kind: str):
    """Creates one kind of unreadable input; returns its path."""
    path = tmp_path / f"{kind}.jpg"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind == "truncated":
        noise_image(200, 300).save(path, "JPEG", quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "bomb_warning":  # over MAX_IMAGE_PIXELS: PIL only warns
        path = path.with_suffix(".png")
        path.write_bytes(png_header(10_000, 10_000))
    elif kind == "bomb_error":  # over 2 * MAX_IMAGE_PIXELS: PIL raises
        path = path.with_suffix(".png")
        path.write_bytes(png_header(20_000, 20_000))
    return path


BAD_INPUTS = [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty file"),
    ("text", "not an image"),
    ("truncated", "truncated"),
    ("bomb_warning", "decompression-bomb"),
    ("bomb_error", "decompression-bomb"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("kind", "reason"), BAD_INPUTS, ids=[kind for kind, _ in BAD_INPUTS])
def test_unreadable_inputs_raise_image_read_error_with_path_and_reason(tmp_path, kind, reason):
    limit = Image.MAX_IMAGE_PIXELS
    path = write_bad_input(tmp_path, kind)
    with pytest.raises(ImageReadError) as caught:
        load_image(path)
    assert caught.value.path == str(path)
    assert reason in caught.value.reason
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    assert "\n" not in str(caught.value)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's settings are left alone


def test_truncated_image_opened_by_the_caller_names_its_file(tmp_path):
    path = write_bad_input(tmp_path, "truncated")
    with pytest.raises(ImageReadError, match="truncated") as caught:
        load_image(Image.open(path))
    assert caught.value.path == str(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_decompression_bomb_limit_is_read_when_loading(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    noise_image(40, 40).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="40x40 pixels is over PIL's decompression-bomb limit of 1000"):
        load_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("num_threads", [1, 3])
def test_batch_goes_on_past_bad_inputs(tmp_path, num_threads):
    good_paths = []
    for index in range(3):
        good_paths.append(tmp_path / f"good{index}.jpg")
        noise_image(120 + index, 90, seed=index).save(good_paths[-1])
    in_memory = mode_image("LA")
    sources = [
        good_paths[0],
        write_bad_input(tmp_path, "missing"),
        str(good_paths[1]),
        write_bad_input(tmp_path, "truncated"),
        in_memory,
        write_bad_input(tmp_path, "bomb_warning"),
        good_paths[2],
    ]
    config = PreprocessConfig.from_dict(IMAGENET_BICUBIC_CONFIG)
    pixel_values, errors = decode_batch(sources, config, num_threads=num_threads)

    assert [error is None for error in errors] == [True, False, True, False, True, False, True]
    assert [error.path for error in errors if error is not None] == [str(sources[1]), str(sources[3]), str(sources[5])]
    expected = np.stack([load_and_preprocess_one(source, config) for source in (*good_paths[:2], in_memory, good_paths[2])])
    assert pixel_values.shape == (4, 3, 160, 200)
    np.testing.assert_array_equal(pixel_values, expected)
    card_pipeline = [Image.open(path).convert("RGB") for path in good_paths]
    assert max_difference(pixel_values[[0, 1, 3]], reference(card_pipeline, IMAGENET_BICUBIC_CONFIG)) <= TOLERANCE


def test_batch_of_only_bad_inputs_is_empty(tmp_path):
    pixel_values, errors = decode_batch([tmp_path / "a.jpg", tmp_path / "b.jpg"], PreprocessConfig())
    assert pixel_values.shape == (0, 3, 224, 224)
    assert [error.reason for error in errors] == ["no such file", "no such file"]


def decode_batch(sources, config, num_threads=None):
    """Every source decoded as one batch through the feed: (pixel values, per-input errors)."""
    from flax_captioner import feed
    from flax_captioner.sources import InputItem

    items = [InputItem(index, str(source)) if not isinstance(source, Image.Image)
             else InputItem(index, "<PIL.Image>", data=source)
             for index, source in enumerate(sources)]
    with feed.batches(items, config, len(items), num_threads=num_threads) as batches:
        (batch,) = list(batches)
    return batch.pixel_values, batch.errors
