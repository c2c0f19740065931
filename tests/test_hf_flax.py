"""Interop with transformers' FlaxVisionEncoderDecoderModel (transformers < 5), and the
one-line refusal where it is gone (transformers 5)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

from flax_captioner import hf_flax, loading, modules
from flax_captioner.captioner import Captioner
from flax_captioner.errors import ModelLoadError

needs_hf_flax = pytest.mark.skipif(not hf_flax.available(),
                                   reason="transformers >= 5 has no FlaxVisionEncoderDecoderModel")


@pytest.mark.skipif(hf_flax.available(), reason="runs where transformers >= 5 is installed")
def test_interop_refuses_in_one_line_without_the_flax_class(tiny_checkpoint):
    loaded = loading.load_checkpoint(tiny_checkpoint)
    with pytest.raises(ModelLoadError, match=r"^FlaxVisionEncoderDecoderModel: transformers "
                                             r"5\.\S+ has no Flax classes"):
        hf_flax.to_flax_model(loaded.params, loaded.config)


@needs_hf_flax
def test_a_flax_model_and_a_captioner_hand_each_other_the_same_weights(tiny_checkpoint):
    from transformers import FlaxVisionEncoderDecoderModel

    captioner = Captioner.from_pretrained(tiny_checkpoint)
    model = hf_flax.flax_model_of(captioner)
    assert isinstance(model, FlaxVisionEncoderDecoderModel)
    assert model.params is captioner.params
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    tokens = np.array([[63, 1, 2, 3], [63, 4, 5, 6]], np.int32)
    np.testing.assert_allclose(
        np.asarray(model(pixels, decoder_input_ids=tokens).logits),
        modules.teacher_forced_logits(captioner.params, captioner.config, pixels, tokens),
        atol=1e-5, rtol=0)

    again = hf_flax.captioner_from_flax_model(model, captioner.tokenizer,
                                              captioner.preprocess_config)
    images = [Image.new("RGB", (40, 30), (value, 255 - value, 60)) for value in (0, 90, 200)]
    assert again.caption(images, num_beams=2, max_length=8) == captioner.caption(
        images, num_beams=2, max_length=8)
    zeroed = {key: np.zeros_like(value) for key, value in flatten_dict(model.params).items()}
    other = hf_flax.captioner_from_flax_model(model, captioner.tokenizer,
                                              captioner.preprocess_config,
                                              params=unflatten_dict(zeroed))
    assert other.fingerprint != captioner.fingerprint


@needs_hf_flax
def test_flax_model_files_load_both_ways(tiny_checkpoint, tmp_path):
    """transformers' save_pretrained msgpack loads here unchanged, and this package's loads
    in transformers."""
    from transformers import FlaxVisionEncoderDecoderModel

    reference = FlaxVisionEncoderDecoderModel.from_pretrained(tiny_checkpoint, from_pt=True)
    reference.save_pretrained(tmp_path / "hf")
    loaded = loading.load_checkpoint(tiny_checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / "hf" / name).write_bytes((tiny_checkpoint / name).read_bytes())
    from_hf = flatten_dict(loading.load_checkpoint(tmp_path / "hf").params)
    ours = flatten_dict(loaded.params)
    assert from_hf.keys() == ours.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(from_hf[key], value, err_msg=str(key))

    loading.save_checkpoint(loaded.params, loaded.config, loaded.tokenizer,
                            loaded.preprocess_config, tmp_path / "ours")
    back = flatten_dict(FlaxVisionEncoderDecoderModel.from_pretrained(tmp_path / "ours").params)
    for key, value in ours.items():
        np.testing.assert_array_equal(back[key], value, err_msg=str(key))


@needs_hf_flax
def test_joining_parts_keeps_what_from_encoder_decoder_pretrained_keeps(tmp_path):
    from transformers import (FlaxVisionEncoderDecoderModel, GPT2Config, GPT2LMHeadModel,
                              ViTConfig, ViTModel)

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "vit")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                               n_positions=16)).save_pretrained(tmp_path / "gpt2")
    reference = FlaxVisionEncoderDecoderModel.from_encoder_decoder_pretrained(
        tmp_path / "vit", tmp_path / "gpt2")
    params, config = loading.load_pretrained_parts(tmp_path / "vit", tmp_path / "gpt2")
    theirs, ours = flatten_dict(reference.params), flatten_dict(params)
    assert {key: value.shape for key, value in theirs.items()} == {
        key: value.shape for key, value in ours.items()}
    kept = [key for key in ours if not loading._fresh_in_join(key)]
    assert len(kept) > 40
    for key in kept:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-7, err_msg=str(key))
    assert config.to_dict()["decoder"]["add_cross_attention"] is True


@needs_hf_flax
def test_the_deprecation_notice_is_silenced_only_inside_the_interop(tiny_checkpoint):
    logger = logging.getLogger("transformers.modeling_flax_utils")
    filters = list(logger.filters)
    loaded = loading.load_checkpoint(tiny_checkpoint)
    hf_flax.to_flax_model(loaded.params, loaded.config)
    assert logger.filters == filters


def test_no_module_but_the_interop_imports_a_transformers_flax_class():
    """transformers 5 has no Flax classes: only hf_flax.py may import one (the package and the
    scripts; the tests compare with them under transformers < 5)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in sorted([*root.glob("flax_captioner/*.py"), *root.glob("scripts/**/*.py")]):
        if path.name == "hf_flax.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                names = [alias.name for alias in node.names]
                if "flax" in node.module or any(name.startswith("Flax") for name in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(root)}:{node.lineno}" for alias in node.names
                              if alias.name.startswith("transformers") and "flax" in alias.name]
    assert offenders == []
