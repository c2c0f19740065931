"""The shipped shapes captioner: its files, PyTorch parity, and its accuracy on fresh images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flax_captioner import modules
from flax_captioner.captioner import Captioner
from flax_captioner.metrics import exact_match
from flax_captioner.testing import make_dataset

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "examples" / "shapes-captioner"
SAMPLES = REPO / "examples" / "images"

ACCURACY_THRESHOLD = 0.9


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.from_pretrained(SHIPPED)


@pytest.fixture(scope="module")
def samples() -> list[dict[str, str]]:
    return [json.loads(line) for line in (SAMPLES / "captions.jsonl").open()]


def test_shipped_checkpoint_is_complete_and_small():
    for name in ("config.json", "flax_model.msgpack", "model.safetensors",
                 "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (SHIPPED / name).is_file(), name
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 5_000_000


def test_sample_images_exist_with_their_captions(samples):
    assert 6 <= len(samples) <= 8
    for row in samples:
        assert (SAMPLES / row["image"]).is_file() and row["caption"].startswith("a ")


def test_pytorch_logits_match_flax(captioner, samples):
    import torch
    from transformers import VisionEncoderDecoderModel

    torch_model = VisionEncoderDecoderModel.from_pretrained(SHIPPED).eval()
    pixels = captioner.preprocess([SAMPLES / row["image"] for row in samples])
    ids = captioner.tokenizer([row["caption"] for row in samples], padding=True)["input_ids"]
    start = captioner.generation_defaults.decoder_start_token_id
    decoder_ids = np.array([[start] + row for row in ids], np.int32)
    flax_logits = modules.teacher_forced_logits(captioner.params, captioner.config, pixels,
                                                decoder_ids)
    with torch.no_grad():
        torch_logits = torch_model(pixel_values=torch.from_numpy(pixels),
                                   decoder_input_ids=torch.from_numpy(decoder_ids).long()).logits
    np.testing.assert_allclose(np.asarray(flax_logits), torch_logits.numpy(), atol=1e-4)


def test_pytorch_generate_gives_the_project_captions(captioner, samples):
    import torch
    from transformers import VisionEncoderDecoderModel

    torch_model = VisionEncoderDecoderModel.from_pretrained(SHIPPED).eval()
    paths = [SAMPLES / row["image"] for row in samples]
    with torch.no_grad():
        torch_ids = torch_model.generate(torch.from_numpy(captioner.preprocess(paths)),
                                         num_beams=4, max_length=16)
    torch_captions = [text.strip() for text in
                      captioner.tokenizer.batch_decode(torch_ids, skip_special_tokens=True)]
    assert captioner.caption(paths, num_beams=4, max_length=16) == torch_captions


@pytest.mark.slow
def test_accuracy_holds_on_freshly_generated_images(captioner, tmp_path):
    # A seed the shipped model never saw: its training data used seed 0.
    split = make_dataset(tmp_path, train=0, validation=200, seed=2024)["validation"]
    rows = [json.loads(line) for line in split.open()]
    captions = captioner.caption([tmp_path / row["image"] for row in rows], num_beams=4,
                                 max_length=16, batch_size=64)
    accuracy = exact_match({str(i): caption for i, caption in enumerate(captions)},
                           {str(i): [row["caption"]] for i, row in enumerate(rows)})
    assert accuracy >= ACCURACY_THRESHOLD
