"""The project's own Flax modules: the Flax lineage's parameter tree, initialisation, dropout,
and joining a pretrained ViT and GPT-2 (no transformers Flax class involved)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.serialization import msgpack_restore, to_bytes
from flax.traverse_util import flatten_dict

from flax_captioner import loading, modules
from flax_captioner.errors import ModelLoadError

SHIPPED = Path(__file__).parent.parent / "examples" / "shapes-captioner"


def _shapes(tree) -> dict:
    return {key: (tuple(leaf.shape), np.dtype(leaf.dtype))
            for key, leaf in flatten_dict(tree).items()}


def test_parameter_tree_is_the_flax_lineages():
    """The shipped model's flax_model.msgpack was written by transformers'
    FlaxVisionEncoderDecoderModel: the modules declare exactly its names, shapes, dtypes."""
    config = loading.read_config(SHIPPED)
    lineage = msgpack_restore((SHIPPED / "flax_model.msgpack").read_bytes())
    assert _shapes(modules.param_shapes(config)) == _shapes(lineage)
    assert _shapes(modules.init_params(config, seed=0)) == _shapes(lineage)


def test_fresh_parameters_follow_hugging_faces_initializers(tiny_checkpoint):
    config = loading.read_config(tiny_checkpoint)
    params = flatten_dict(modules.init_params(config, seed=1))
    again = flatten_dict(modules.init_params(config, seed=1))
    other = flatten_dict(modules.init_params(config, seed=2))
    wte = params["decoder", "transformer", "wte", "embedding"]
    assert all(np.array_equal(params[key], again[key]) for key in params)
    assert not np.array_equal(wte, other["decoder", "transformer", "wte", "embedding"])
    assert abs(float(np.std(wte)) - config.decoder.initializer_range) < 0.003
    c_attn = params["decoder", "transformer", "h", "0", "attn", "c_attn", "kernel"]
    assert abs(float(np.std(c_attn)) - 0.02) < 0.003  # FlaxConv1D's fixed std
    for key, value in params.items():
        if key[-1] == "bias":
            assert not np.any(value), key
        if key[-1] == "scale":
            assert np.all(value == 1), key


def test_dropout_runs_only_when_training(tiny_checkpoint):
    config = loading.read_config(tiny_checkpoint)
    config.decoder.resid_pdrop = config.decoder.attn_pdrop = 0.3
    config.encoder.hidden_dropout_prob = 0.2
    params = loading.load_checkpoint(tiny_checkpoint).params
    module = modules.VisionEncoderDecoder(modules.ModuleConfig.from_config(config))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    tokens = jnp.array([[63, 1, 2, 3], [63, 4, 5, 6]], jnp.int32)
    mask = jnp.ones_like(tokens)

    def run(key=None):
        return np.asarray(module.apply({"params": params}, pixels, tokens, mask,
                                       deterministic=key is None,
                                       rngs=None if key is None else {"dropout": key}))

    evaluated = run()
    np.testing.assert_array_equal(
        evaluated, modules.teacher_forced_logits(params, config, pixels, tokens))
    first, same, other = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)), run(
        jax.random.PRNGKey(2))
    np.testing.assert_array_equal(first, same)
    assert np.abs(first - evaluated).max() > 1e-3
    assert np.abs(first - other).max() > 1e-3


def _write_parts(directory: Path, weights: str) -> tuple[Path, Path, dict]:
    """A ViT and a GPT-2 checkpoint as transformers' PyTorch classes save them
    (``weights``: "safetensors" or "bin"), and their state dicts."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, image_size=32, patch_size=8)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                      n_positions=16, bos_token_id=63, eos_token_id=63)).eval()
    from safetensors.numpy import load_file

    parts = {}
    for name, model in (("vit", vit), ("gpt2", gpt2)):
        model.save_pretrained(directory / name)
        saved = directory / name / "model.safetensors"
        parts[name] = load_file(saved)  # the file's names (5.x renames the ViT's in memory)
        if weights == "bin":  # as older releases wrote them (5.x writes safetensors only)
            torch.save({key: torch.from_numpy(value) for key, value in parts[name].items()},
                       directory / name / "pytorch_model.bin")
            saved.unlink()
    return directory / "vit", directory / "gpt2", parts


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_joining_a_pretrained_vit_and_gpt2(tmp_path, weights):
    """As transformers' from_encoder_decoder_pretrained: every weight of the two parts is
    kept, cross-attention is added fresh, the decoder becomes a cross-attending one."""
    encoder_dir, decoder_dir, parts = _write_parts(tmp_path, weights)
    params, config = loading.load_pretrained_parts(encoder_dir, decoder_dir, seed=0)
    flat = flatten_dict(params)
    assert config.decoder.add_cross_attention and config.decoder.is_decoder
    assert _shapes(params) == _shapes(modules.param_shapes(config))
    np.testing.assert_array_equal(flat["encoder", "embeddings", "cls_token"],
                                  parts["vit"]["embeddings.cls_token"])
    np.testing.assert_array_equal(  # Linear [out, in] -> Dense [in, out]
        flat["encoder", "encoder", "layer", "1", "attention", "attention", "query", "kernel"],
        parts["vit"]["encoder.layer.1.attention.attention.query.weight"].T)
    np.testing.assert_array_equal(  # Conv1D [in, out] -> FlaxConv1D [out, in]
        flat["decoder", "transformer", "h", "1", "mlp", "c_fc", "kernel"],
        parts["gpt2"]["transformer.h.1.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(flat["decoder", "transformer", "wte", "embedding"],
                                  parts["gpt2"]["transformer.wte.weight"])
    fresh = flat["decoder", "transformer", "h", "0", "crossattention", "c_attn", "kernel"]
    assert fresh.shape == (64, 32) and np.std(fresh) > 0.01


def test_joining_reads_flax_parts_and_refuses_wrong_ones(tmp_path):
    """Parts in the Flax lineage's own msgpack layout (FlaxViTModel's and
    FlaxGPT2LMHeadModel's trees) join to the same model; a part of another kind, or one
    lacking weights, is refused in one line naming the file."""
    encoder_dir, decoder_dir, _ = _write_parts(tmp_path, "safetensors")
    params, config = loading.load_pretrained_parts(encoder_dir, decoder_dir, seed=0)
    flax_encoder, flax_decoder = tmp_path / "flax_vit", tmp_path / "flax_gpt2"
    config.encoder.save_pretrained(flax_encoder)
    (flax_encoder / "flax_model.msgpack").write_bytes(to_bytes(params["encoder"]))
    gpt2 = {"transformer": jax.tree.map(np.asarray, params["decoder"]["transformer"])}
    for block in gpt2["transformer"]["h"].values():
        del block["crossattention"], block["ln_cross_attn"]
    decoder_config = json.loads((decoder_dir / "config.json").read_text())
    flax_decoder.mkdir()
    (flax_decoder / "config.json").write_text(json.dumps(decoder_config))
    (flax_decoder / "flax_model.msgpack").write_bytes(to_bytes(gpt2))
    again, _ = loading.load_pretrained_parts(flax_encoder, flax_decoder, seed=0)
    for key, value in flatten_dict(params).items():
        np.testing.assert_array_equal(flatten_dict(again)[key], value, err_msg=str(key))

    with pytest.raises(ModelLoadError, match=r"config.json: model_type 'gpt2'; the encoder "
                                             r"must be a vit checkpoint$"):
        loading.load_pretrained_parts(decoder_dir, decoder_dir)
    del gpt2["transformer"]["ln_f"]
    (flax_decoder / "flax_model.msgpack").write_bytes(to_bytes(gpt2))
    with pytest.raises(ModelLoadError, match=r"flax_model.msgpack: lacks 2 weights its config "
                                             r"implies \(decoder/transformer/ln_f/bias, "):
        loading.load_pretrained_parts(encoder_dir, flax_decoder)
