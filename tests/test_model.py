"""Parity of the model's encoder, decoder step and training modules with PyTorch (and HF Flax).

Teacher forcing: tokens fed one step at a time through ``decode_step`` must give, at every
step, the logits of PyTorch's full-sequence forward pass on the same prefix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_captioner import hf_flax, loading, modules
from flax_captioner.backend import FORMS
from flax_captioner.errors import ModelLoadError
from flax_captioner.model import (ModelSpec, cast_params, cross_kv, decode_step, encode,
                                  init_cache, reorder_cache)
from flax_captioner.testing import make_checkpoint, make_full_size_checkpoint

TOLERANCE = 1e-4


def load_models(directory):
    """(PyTorch model, the loaded checkpoint, ModelSpec) for one checkpoint directory."""
    from transformers import VisionEncoderDecoderModel

    torch_model = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    checkpoint = loading.load_checkpoint(directory)
    return torch_model, checkpoint, ModelSpec.from_config(checkpoint.config)


needs_hf_flax = pytest.mark.skipif(not hf_flax.available(),
                                   reason="transformers >= 5 has no FlaxVisionEncoderDecoderModel")


@pytest.fixture(scope="module", params=[
    {"seed": 0},
    {"seed": 3, "initializer_range": 0.5},
    {"seed": 5, "initializer_range": 0.5, "vocab_size": 97, "num_heads": 2},
], ids=["seed0", "seed3-chaotic", "seed5-chaotic-vocab97"])
def tiny_models(request, tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("decoder") / "model", **request.param)
    return load_models(directory)


def random_pixels(spec: ModelSpec, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (batch, spec.num_channels, spec.image_size, spec.image_size)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def torch_logits(torch_model, pixels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Full-sequence PyTorch logits: pixels [N, C, H, W], tokens [N, T] -> [N, T, V]."""
    with torch.no_grad():
        output = torch_model(pixel_values=torch.from_numpy(pixels),
                             decoder_input_ids=torch.from_numpy(tokens.astype(np.int64)))
    return output.logits.numpy()


@functools.partial(jax.jit, static_argnames=("spec", "dtype", "cross_context",
                                             "self_attention"))
def jit_decode_step(params, tokens, position, cache, cross, spec, dtype=jnp.float32,
                    cross_context="multiply_reduce", self_attention="einsum"):
    return decode_step(params, tokens, position, cache, cross, spec, dtype, cross_context,
                       self_attention)


def test_encoder_matches_pytorch(tiny_models):
    torch_model, checkpoint, spec = tiny_models
    pixels = random_pixels(spec, batch=3)
    ours = np.asarray(jax.jit(encode, static_argnames="spec")(checkpoint.params, pixels,
                                                              spec=spec))
    with torch.no_grad():
        expected = torch_model.encoder(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == (3, spec.encoder_length, spec.encoder_hidden_size)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


def single_beam_step_logits(params, spec, pixels, tokens) -> np.ndarray:
    """decode_step run position by position with one beam: float32[B, T, V]."""
    batch, length = tokens.shape
    cross = cross_kv(params, encode(params, pixels, spec), spec)
    cache = init_cache(batch, 1, length, spec)
    steps = []
    for position in range(length):
        logits, cache = jit_decode_step(params, jnp.asarray(tokens[:, position:position + 1]),
                                        jnp.int32(position), cache, cross, spec)
        steps.append(np.asarray(logits[:, 0]))
    return np.stack(steps, axis=1)


def start_tokens(spec, batch: int, length: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, spec.vocab_size, (batch, length))
    tokens[:, 0] = spec.vocab_size - 1  # decoder start = EOS, as in the checkpoints
    return tokens.astype(np.int32)


def test_single_beam_steps_and_the_training_modules_match_full_forward(tiny_models):
    """The cached step (generation) and the teacher-forced modules (training) are two uses
    of one arithmetic: both equal PyTorch's full forward pass, and each other."""
    torch_model, checkpoint, spec = tiny_models
    batch, length = 2, 9
    pixels = random_pixels(spec, batch, seed=1)
    tokens = start_tokens(spec, batch, length, seed=1)
    ours = single_beam_step_logits(checkpoint.params, spec, pixels, tokens)
    modules_logits = np.asarray(modules.teacher_forced_logits(
        checkpoint.params, checkpoint.config, pixels, tokens))

    expected = torch_logits(torch_model, pixels, tokens)
    assert ours.dtype == np.float32 and ours.shape == (batch, length, spec.vocab_size)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(modules_logits, expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(modules_logits, ours, atol=5e-5, rtol=0)  # summation order


@needs_hf_flax
def test_encoder_steps_and_modules_match_hf_flax(tiny_models):
    """The interop lineage: transformers' own Flax model, built from the PyTorch weights by
    transformers itself, has the same parameter tree and the same numbers."""
    from transformers import FlaxVisionEncoderDecoderModel

    torch_model, checkpoint, spec = tiny_models
    hf_model = FlaxVisionEncoderDecoderModel.from_pretrained(checkpoint.directory, from_pt=True)
    assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), hf_model.params) == jax.tree.map(
        lambda leaf: (leaf.shape, leaf.dtype), modules.param_shapes(checkpoint.config))
    pixels = random_pixels(spec, batch=2, seed=1)
    tokens = start_tokens(spec, 2, 9, seed=1)
    mask = np.ones_like(tokens)
    mask[1, 6:] = 0  # padding, as training batches have
    np.testing.assert_allclose(
        np.asarray(encode(checkpoint.params, pixels, spec)),
        hf_model.encode(pixels).last_hidden_state, atol=TOLERANCE, rtol=0)
    expected = hf_model(pixels, decoder_input_ids=tokens, decoder_attention_mask=mask).logits
    ours = modules.teacher_forced_logits(checkpoint.params, checkpoint.config, pixels, tokens,
                                         mask)
    np.testing.assert_allclose(np.asarray(ours)[0], expected[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(np.asarray(ours)[1, :6], expected[1, :6], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(single_beam_step_logits(checkpoint.params, spec, pixels, tokens),
                               hf_model(pixels, decoder_input_ids=tokens).logits,
                               atol=TOLERANCE, rtol=0)


# cuDNN's fused kernel needs a GPU.
CPU_CROSS_CONTEXT_FORMS = [form for form in FORMS["cross_context"] if form != "cudnn"]
# (cross_context, self_attention): every cross-attention form a CPU runs, and each other
# self-attention form.
CPU_ATTENTION_FORMS = ([(form, "einsum") for form in CPU_CROSS_CONTEXT_FORMS]
                       + [("multiply_reduce", form) for form in FORMS["self_attention"]
                          if form != "einsum"])


@pytest.mark.parametrize(("cross_context", "self_attention"), CPU_ATTENTION_FORMS)
def test_beams_with_expansion_and_reorder_match_full_forward(tiny_models, cross_context,
                                                             self_attention):
    """Step 0 with one beam, expand to K, different tokens per beam, reorder mid-way; every
    form of the cross- and self-attention a CPU runs."""
    torch_model, checkpoint, spec = tiny_models
    batch, beams, length, reorder_at = 2, 3, 8, 4
    pixels = random_pixels(spec, batch, seed=2)
    rng = np.random.default_rng(2)
    fed = rng.integers(0, spec.vocab_size, (batch, beams, length)).astype(np.int32)
    fed[:, :, 0] = spec.vocab_size - 1
    # Beam j after the reorder continues the history of beam parents[b, j] (with repeats).
    parents = rng.integers(0, beams, (batch, beams)).astype(np.int32)
    parents[0] = [2, 2, 0]

    params = checkpoint.params
    cross = cross_kv(params, encode(params, pixels, spec), spec, cross_context=cross_context)
    cache = init_cache(batch, 1, length, spec)
    logits, cache = jit_decode_step(params, jnp.asarray(fed[:, :1, 0]), jnp.int32(0), cache,
                                    cross, spec, cross_context=cross_context,
                                    self_attention=self_attention)
    steps = [np.repeat(np.asarray(logits), beams, axis=1)]
    cache = reorder_cache(cache, jnp.zeros((batch, beams), jnp.int32))
    assert len(cache.key) == spec.num_layers
    assert cache.key[0].shape == (batch, beams, spec.num_heads, length, spec.head_dim)
    for position in range(1, length):
        if position == reorder_at:
            reordered = reorder_cache(cache, jnp.asarray(parents))
            # K beams to K: only the rows each beam reads move, no keys or values.
            assert reordered.key is cache.key and reordered.value is cache.value
            np.testing.assert_array_equal(
                reordered.rows, np.take_along_axis(np.asarray(cache.rows), parents[:, :, None],
                                                   axis=1))
            cache = reordered
        logits, cache = jit_decode_step(params, jnp.asarray(fed[:, :, position]),
                                        jnp.int32(position), cache, cross, spec,
                                        cross_context=cross_context,
                                        self_attention=self_attention)
        steps.append(np.asarray(logits))
    ours = np.stack(steps, axis=2)  # [B, K, T, V]

    # The sequences each beam actually holds: parents' prefix, then its own tokens.
    history = np.take_along_axis(fed[:, :, :reorder_at], parents[:, :, None], axis=1)
    before = torch_logits(torch_model, np.repeat(pixels, beams, axis=0),
                          fed.reshape(batch * beams, length))
    after = torch_logits(torch_model, np.repeat(pixels, beams, axis=0),
                         np.concatenate([history, fed[:, :, reorder_at:]], axis=2)
                         .reshape(batch * beams, length))
    before = before.reshape(batch, beams, length, -1)
    after = after.reshape(batch, beams, length, -1)
    np.testing.assert_allclose(ours[:, :, :reorder_at], before[:, :, :reorder_at],
                               atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours[:, :, reorder_at:], after[:, :, reorder_at:],
                               atol=TOLERANCE, rtol=0)


def bfloat16_and_float32_logits(checkpoint, spec, pixels, tokens,
                                cross_context="multiply_reduce", self_attention="einsum"):
    """Teacher-forced logits [B, K, T, V] for tokens [B, K, T] in both compute dtypes."""
    batch, beams, length = tokens.shape
    results = []
    for dtype in (jnp.bfloat16, jnp.float32):
        params = cast_params(checkpoint.params, dtype)
        cross = cross_kv(params, encode(params, pixels, spec, dtype), spec, dtype,
                         cross_context)
        assert all(key.dtype == dtype for key in cross.key)
        cache = init_cache(batch, beams, length, spec, dtype)
        steps = []
        for position in range(length):
            logits, cache = jit_decode_step(params, jnp.asarray(tokens[:, :, position]),
                                            jnp.int32(position), cache, cross, spec, dtype,
                                            cross_context, self_attention)
            steps.append(np.asarray(logits))
        results.append(np.stack(steps, axis=2))
    return results


@pytest.mark.parametrize(("cross_context", "self_attention"), CPU_ATTENTION_FORMS)
def test_bfloat16_logits_close_to_float32(tiny_models, cross_context, self_attention):
    _, checkpoint, spec = tiny_models
    pixels = random_pixels(spec, batch=2, seed=3)
    tokens = np.random.default_rng(3).integers(0, spec.vocab_size, (2, 2, 8)).astype(np.int32)
    half, full = bfloat16_and_float32_logits(checkpoint, spec, pixels, tokens, cross_context,
                                             self_attention)
    assert half.dtype == np.float32
    spread = full.max() - full.min()
    assert np.abs(half - full).max() < 0.05 * spread
    agreement = (half.argmax(-1) == full.argmax(-1)).mean()
    assert agreement >= 0.8, agreement


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_fused_attention_in_its_layouts_matches_the_einsums(tiny_models, dtype):
    """The encoder's self-attention and the beams' cross-attention through
    ``jax.nn.dot_product_attention`` ("xla" here; "cudnn" takes the same [B, T, H, Dh]
    layouts on GPUs): the einsums' encoder states, cross K/V and step logits."""
    _, checkpoint, spec = tiny_models
    batch, beams, length = 2, 3, 6
    params = cast_params(checkpoint.params, dtype)
    pixels = random_pixels(spec, batch, seed=4)
    tokens = np.random.default_rng(4).integers(0, spec.vocab_size, (batch, beams, length))
    outputs = {}
    for encoder_attention, cross_context in (("einsum", "einsum"), ("xla", "xla")):
        hidden = encode(params, pixels, spec, dtype, encoder_attention)
        cross = cross_kv(params, hidden, spec, dtype, cross_context)
        cache = init_cache(batch, beams, length, spec, dtype)
        steps = []
        for position in range(length):
            logits, cache = jit_decode_step(
                params, jnp.asarray(tokens[:, :, position], jnp.int32), jnp.int32(position),
                cache, cross, spec, dtype, cross_context)
            steps.append(np.asarray(logits))
        outputs[cross_context] = (np.asarray(hidden), np.stack(steps, axis=2))
    (hidden, logits), (fused_hidden, fused_logits) = outputs.values()
    # Cross K/V of the same encoder states: the same values, sequence-major for fused.
    keys, fused_keys = (np.asarray(cross_kv(params, hidden, spec, dtype, form).key[0],
                                   np.float32) for form in ("einsum", "xla"))
    assert fused_keys.shape == (batch, spec.encoder_length, spec.num_heads, spec.head_dim)
    np.testing.assert_array_equal(fused_keys, keys.transpose(0, 2, 1, 3))
    # float32: the same arithmetic up to summation order; bfloat16: up to its rounding.
    tolerance = 1e-5 if dtype == jnp.float32 else 0.02
    for ours, einsums in ((fused_hidden, hidden), (fused_logits, logits)):
        spread = einsums.max() - einsums.min()
        assert np.abs(ours - einsums).max() <= tolerance * spread


def test_spec_rejects_unsupported_config(tiny_models):
    _, checkpoint, _ = tiny_models
    config = checkpoint.config.__class__.from_dict(checkpoint.config.to_dict())
    config.decoder.add_cross_attention = False
    with pytest.raises(ModelLoadError, match="cross-attention"):
        ModelSpec.from_config(config)


def test_init_cache_rejects_length_beyond_positions(tiny_models):
    _, _, spec = tiny_models
    with pytest.raises(ValueError, match="n_positions"):
        init_cache(1, 1, spec.n_positions + 1, spec)


@pytest.fixture(scope="module")
def full_size_models(tmp_path_factory):
    return load_models(make_full_size_checkpoint(tmp_path_factory.mktemp("full") / "model"))


@pytest.mark.slow
def test_full_size_model_matches_pytorch(full_size_models):
    """The nlpconnect architecture (random weights): encoder states, 4 cached steps, bf16."""
    torch_model, checkpoint, spec = full_size_models
    batch, length = 2, 4
    pixels = random_pixels(spec, batch, seed=4)
    tokens = np.random.default_rng(4).integers(0, spec.vocab_size, (batch, length))
    tokens[:, 0] = spec.vocab_size - 1

    params = checkpoint.params
    encoder_hidden = jax.jit(encode, static_argnames="spec")(params, pixels, spec=spec)
    with torch.no_grad():
        torch_output = torch_model(pixel_values=torch.from_numpy(pixels),
                                   decoder_input_ids=torch.from_numpy(tokens))
    np.testing.assert_allclose(np.asarray(encoder_hidden),
                               torch_output.encoder_last_hidden_state.numpy(),
                               atol=TOLERANCE, rtol=0)

    cross = cross_kv(params, encoder_hidden, spec)
    cache = init_cache(batch, 1, length, spec)
    steps = []
    for position in range(length):
        logits, cache = jit_decode_step(params, jnp.asarray(tokens[:, position:position + 1],
                                                            jnp.int32),
                                        jnp.int32(position), cache, cross, spec)
        steps.append(np.asarray(logits[:, 0]))
    np.testing.assert_allclose(np.stack(steps, axis=1), torch_output.logits.numpy(),
                               atol=TOLERANCE, rtol=0)

    # bfloat16 with K > 1 takes XLA:CPU dot paths the tiny models do not reach.
    beam_tokens = np.stack([tokens, tokens[:, ::-1]], axis=1).astype(np.int32)  # [B, 2, T]
    half, full = bfloat16_and_float32_logits(checkpoint, spec, pixels, beam_tokens)
    assert np.abs(half - full).max() < 0.05 * (full.max() - full.min())
    assert (half.argmax(-1) == full.argmax(-1)).mean() >= 0.8
