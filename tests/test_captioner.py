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
