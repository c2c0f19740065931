"""Captioner.caption over what Python users hold: paths, bytes, PIL images, a Hugging Face
``datasets.Dataset`` with an image feature, or any (lazy) iterable of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "examples" / "shapes-captioner"
SAMPLES = sorted((REPO / "examples" / "images").glob("*.png"))
SETTINGS = {"num_beams": 2, "max_length": 10}


@pytest.fixture(scope="module")
def captioner():
    from flax_captioner import Captioner

    return Captioner.from_pretrained(SHAPES, parallelism="none")


@pytest.fixture(scope="module")
def expected(captioner) -> list[str]:
    return captioner.caption(SAMPLES, **SETTINGS)


def test_a_datasets_dataset_with_an_image_feature_is_captioned_directly(captioner, expected):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(
        {"image": [str(path) for path in SAMPLES], "key": [path.stem for path in SAMPLES]}
    ).cast_column("image", datasets.Image())
    assert captioner.caption(dataset, batch_size=3, **SETTINGS) == expected


def test_a_lazy_iterable_of_bytes_and_pil_images_is_captioned_in_order(captioner, expected):
    def mixed():
        for index, path in enumerate(SAMPLES):
            yield path.read_bytes() if index % 2 else Image.open(path)

    assert captioner.caption(mixed(), batch_size=3, **SETTINGS) == expected


def test_an_element_that_is_no_image_is_a_one_line_type_error(captioner):
    with pytest.raises(TypeError, match=r"^images\[1\]: expected a path, bytes, a PIL image"):
        captioner.caption([SAMPLES[0], 42], **SETTINGS)


def test_options_and_overrides_are_one_object(captioner, expected):
    """``caption(images, options, **overrides)``: the overrides change a copy of options."""
    from flax_captioner import CaptionOptions, OptionError

    options = CaptionOptions(batch_size=3, **SETTINGS)
    assert captioner.caption(SAMPLES, options) == expected
    assert captioner.caption(SAMPLES, options, max_length=3) == \
        captioner.caption(SAMPLES, max_length=3, num_beams=2)
    with pytest.raises(OptionError, match="^beam_width is not a caption option"):
        captioner.caption(SAMPLES, beam_width=2)
    with pytest.raises(OptionError, match="^num_beams must be an integer >= 1, got 0") as raised:
        captioner.caption(SAMPLES, options, num_beams=0)
    assert raised.value.field == "num_beams" and isinstance(raised.value, ValueError)


def test_rows_take_the_named_image_column(captioner, expected):
    rows = [{"photo": path.read_bytes(), "image": b"not this one", "name": path.stem}
            for path in SAMPLES]
    assert captioner.caption(rows, image_column="photo", id_column="name", **SETTINGS) == \
        expected


def test_samples_depend_on_the_seed_not_on_the_batching(captioner):
    sampled = dict(num_beams=1, do_sample=True, temperature=3.0, max_length=10)
    first = captioner.caption(SAMPLES, seed=3, batch_size=8, **sampled)
    assert captioner.caption(SAMPLES, seed=3, batch_size=3, **sampled) == first
    assert any(captioner.caption(SAMPLES, seed=seed, **sampled) != first for seed in (4, 5))


def test_fast_decode_changes_pixels_not_captions_of_large_jpegs(captioner, tmp_path):
    """The shipped model's sample images, enlarged 8x as JPEGs: the fast path decodes them at
    1/8 scale, so its pixels differ from the exact path's, and the captions do not."""
    import numpy as np

    from flax_captioner.ray_data import CaptionImages

    side = captioner.preprocess_config.size[0] * 8
    paths = []
    for path in SAMPLES:
        paths.append(tmp_path / f"{path.stem}.jpg")
        Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(
            paths[-1], quality=90)
    exact = captioner.preprocess(paths)
    fast = captioner.preprocess(paths, fast_decode=True)
    assert 0 < np.abs(fast - exact).mean() < 0.02
    captions = captioner.caption(paths, fast_decode=True, **SETTINGS)
    assert captions == captioner.caption(paths, **SETTINGS)

    # Ray Data's callable takes the same option: its scores are those of the fast pixels.
    caption_images = CaptionImages(model=str(SHAPES), parallelism="none", fast_decode=True,
                                   **SETTINGS)
    rows = caption_images({"image": np.array([path.read_bytes() for path in paths],
                                             dtype=object)})
    assert list(rows["caption"]) == captions
    fast_scores = captioner.generate(fast, **SETTINGS).scores
    np.testing.assert_allclose(rows["score"], fast_scores, rtol=1e-6)
    assert not np.allclose(rows["score"], captioner.generate(exact, **SETTINGS).scores,
                           rtol=1e-6)
