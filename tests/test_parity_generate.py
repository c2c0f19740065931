"""Captions equal PyTorch ``VisionEncoderDecoderModel.generate``'s, token for token.

Three tiny random checkpoints with a large decoder init (a chaotic next-token distribution,
so EOS lands at varied steps), eight images each, float32 at the highest matmul precision.
One compiled program per settings serves all three checkpoints (same shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from flax_captioner import loading, parity
from flax_captioner.backend import Kernels
from flax_captioner.generator import Generator, build_generate_fn
from flax_captioner.model import ModelSpec
from flax_captioner.settings import GenerationSettings
from flax_captioner.testing import (CHAOTIC_SEEDS, CHAOTIC_VOCAB, chaotic_pixels,
                                    make_chaotic_checkpoint)

VOCAB = CHAOTIC_VOCAB
EOS = VOCAB - 1
IMAGES = 8
SCORE_TOLERANCE = 1e-4
# Per-step scores and logits, every entry of every step: the chaotic checkpoints' activations
# are large (initializer_range 0.5), and the two frameworks' float32 kernels differ there by up
# to 3.1e-4 on isolated entries (2.1e-4 on a logit of -0.5; measured), so the bound is
# |ours - PyTorch's| <= 5e-4 + 1e-4 * |PyTorch's|. On the bit-exact stub decoder
# (test_processors.py) the bound is 1e-4 flat.
STEP_ATOL, STEP_RTOL = 5e-4, 1e-4
# Seeds whose captions end at many different steps (checked by test_eos_lands_at_varied_steps).
CHECKPOINT_SEEDS = CHAOTIC_SEEDS


@dataclasses.dataclass
class TinyModel:
    torch_model: Any
    params: Any
    config: Any
    pixels: np.ndarray


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[TinyModel]:
    from transformers import VisionEncoderDecoderModel

    loaded = []
    for seed in CHECKPOINT_SEEDS:
        directory = make_chaotic_checkpoint(
            tmp_path_factory.mktemp(f"chaotic{seed}") / "model", seed)
        checkpoint = loading.load_checkpoint(directory)
        loaded.append(TinyModel(VisionEncoderDecoderModel.from_pretrained(directory).eval(),
                                checkpoint.params, checkpoint.config,
                                chaotic_pixels(seed, IMAGES)))
    return loaded


def settings_for(**overrides) -> GenerationSettings:
    defaults = dict(decoder_start_token_id=EOS, pad_token_id=EOS, eos_token_id=EOS)
    return GenerationSettings.resolve(type("Defaults", (), defaults), **overrides)


@functools.lru_cache(maxsize=None)
def compiled_search(spec: ModelSpec, settings: GenerationSettings,
                    kernels: Kernels = Kernels()):
    return jax.jit(build_generate_fn(spec, settings, kernels=kernels))


def generate(model: TinyModel, settings: GenerationSettings,
             kernels: Kernels = Kernels()) -> parity.GenerationOutput:
    spec = ModelSpec.from_config(model.config)
    keys = np.zeros((len(model.pixels), 2), np.uint32)
    output = compiled_search(spec, settings, kernels)(model.params, model.pixels, keys)
    return parity.GenerationOutput.from_search(output, len(model.pixels), settings)


def assert_parity(models: list[TinyModel], settings: GenerationSettings,
                  kernels: Kernels = Kernels()) -> list[np.ndarray]:
    """Checks every caption of every checkpoint; returns our sequences per checkpoint."""
    all_sequences = []
    for seed, model in zip(CHECKPOINT_SEEDS, models):
        ours = generate(model, settings, kernels)
        report = parity.compare_outputs(parity.pytorch_generate(model.torch_model, model.pixels,
                                                                settings), ours, settings)
        assert report.all_match, f"checkpoint seed {seed}, {settings}\n" + parity.format_report(
            report)
        assert report.max_score_difference <= SCORE_TOLERANCE, parity.format_report(report)
        all_sequences.append(ours.sequences)
    return all_sequences


def caption_lengths(sequences: np.ndarray) -> list[int]:
    """Generated tokens up to and including EOS (max_length - 1 when there is no EOS)."""
    generated = sequences[:, 1:] == EOS
    return [int(np.argmax(row)) + 1 if row.any() else len(row) for row in generated]


LENGTH_PENALTIES = (0.5, 1.0, 2.0)
EARLY_STOPPING = (True, False, "never")

# Every (num_beams, early_stopping), (num_beams, length_penalty) and
# (early_stopping, length_penalty) pair, with the other settings varied along.
COVERING_GRID = [
    dict(num_beams=beams, early_stopping=early, length_penalty=LENGTH_PENALTIES[(beams + i) % 3],
         max_length=(10, 14, 18)[i], num_return_sequences=1 + (beams + i) % beams,
         min_length=(0, 5)[(beams + i) % 2], no_repeat_ngram_size=(0, 0, 2, 3)[(beams + i) % 4])
    for beams in (2, 3, 4, 5) for i, early in enumerate(EARLY_STOPPING)
] + [
    dict(num_beams=1, max_length=16),
    dict(num_beams=1, max_length=20, min_length=6, no_repeat_ngram_size=2),
    dict(num_beams=1, max_length=12, repetition_penalty=1.3, bad_words_ids=((3,), (5, 6))),
    dict(num_beams=4, max_length=14, repetition_penalty=1.5, num_return_sequences=2),
    dict(num_beams=3, max_length=12, bad_words_ids=((2,), (7, 8), (EOS,)), min_length=3),
]


@pytest.mark.parametrize("overrides", COVERING_GRID, ids=str)
def test_captions_equal_pytorch_generate(models, overrides):
    assert_parity(models, settings_for(**overrides))


@pytest.mark.parametrize("overrides", COVERING_GRID[:12:3] + COVERING_GRID[12:13], ids=str)
def test_multiply_reduce_self_attention_equals_pytorch_generate(models, overrides):
    """The other self-attention form (``backend.Kernels.self_attention``), which a platform may
    switch to, keeps PyTorch's captions: beams reordered at every step read the cache through
    rows."""
    assert_parity(models, settings_for(**overrides), Kernels(self_attention="multiply_reduce"))


def test_eos_lands_at_varied_steps(models):
    """The checkpoints exercise finishing: captions end early, at many different steps."""
    lengths = []
    for sequences in assert_parity(models, settings_for(num_beams=4, max_length=20,
                                                        num_return_sequences=4)):
        lengths += caption_lengths(sequences)
    early = [length for length in lengths if length < 19]
    assert len(set(early)) >= 6, lengths
    assert len(early) >= len(lengths) // 4, lengths


FULL_GRID = [dict(num_beams=1, max_length=20)] + [
    dict(num_beams=beams, length_penalty=penalty, early_stopping=early, max_length=20,
         num_return_sequences=beams)
    for beams, penalty, early in itertools.product((2, 3, 4, 5), LENGTH_PENALTIES,
                                                   EARLY_STOPPING)
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", FULL_GRID, ids=str)
def test_full_grid_equals_pytorch_generate(models, overrides):
    assert_parity(models, settings_for(**overrides))


@pytest.mark.slow  # compiles three batch buckets
def test_image_result_is_independent_of_batch_and_bucket(models):
    model = models[1]
    generator = Generator(model.params, model.config)
    settings = settings_for(num_beams=3, max_length=16, num_return_sequences=2)
    full = generator.generate(model.pixels, settings)
    assert full.sequences.shape == (2 * IMAGES, 16) and full.scores.shape == (2 * IMAGES,)
    for subset in ([5], [2, 7, 0], [6, 1, 3, 4, 5]):  # buckets 1, 4 and 8 with padding
        part = generator.generate(model.pixels[subset], settings)
        rows = np.array([[2 * i, 2 * i + 1] for i in subset]).ravel()
        np.testing.assert_array_equal(part.sequences, full.sequences[rows])
        # Other batch sizes may sum matmuls in another order: scores agree to float noise.
        np.testing.assert_allclose(part.scores, full.scores[rows], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(full.sequences, generate(model, settings).sequences)


def test_generator_rejects_bad_input_with_one_line(models):
    model = models[0]
    generator = Generator(model.params, model.config)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[B, 3, 32, 32\]"):
        generator.generate(np.zeros((2, 3, 16, 16), np.float32), settings_for())
    with pytest.raises(ValueError, match="bad_words_ids \\[40\\] are outside the vocabulary"):
        generator.generate(model.pixels[:1], settings_for(bad_words_ids=[[40]]))
    with pytest.raises(ValueError, match="max_length 80 exceeds the decoder's 64 positions"):
        generator.generate(model.pixels[:1], settings_for(max_length=80))


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_data_parallel_placements_give_the_same_captions(models, mode):
    from flax_captioner import sharding

    model = models[2]
    settings = settings_for(num_beams=2, max_length=12)
    generator = Generator(model.params, model.config, data_parallel=sharding.data_parallel(mode))
    output = generator.generate(model.pixels[:5], settings)
    np.testing.assert_array_equal(output.sequences,
                                  generate(model, settings).sequences[:5])


def test_bfloat16_mode_runs_the_same_search(models):
    import jax.numpy as jnp

    model = models[0]
    settings = settings_for(num_beams=3, max_length=12, num_return_sequences=2)
    output = Generator(model.params, model.config, dtype=jnp.bfloat16).generate(
        model.pixels, settings)
    assert output.sequences.dtype == np.int32 and output.sequences.shape == (2 * IMAGES, 12)
    assert (output.sequences[:, 0] == EOS).all() and (output.sequences < VOCAB).all()
    assert np.isfinite(output.scores).all() and (output.scores < 0).all()
    # Each image's two captions come best first.
    assert (output.scores[0::2] >= output.scores[1::2]).all()


def test_persistent_compilation_cache_stores_programs(models, tmp_path):
    from flax_captioner.generator import enable_compilation_cache

    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    enable_compilation_cache(tmp_path / "jax-cache")
    try:
        Generator(models[0].params, models[0].config).generate(
            models[0].pixels[:1], settings_for(max_length=5))
    finally:
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
        compilation_cache.reset_cache()  # later tests must not write into tmp_path
    assert any((tmp_path / "jax-cache").iterdir())


SHAPES_CHECKPOINT = Path(__file__).resolve().parent.parent / "examples" / "shapes-captioner"
SHAPES_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


@pytest.fixture(scope="module")
def shapes_captioner():
    from transformers import VisionEncoderDecoderModel

    from flax_captioner.captioner import Captioner

    captioner = Captioner.from_pretrained(SHAPES_CHECKPOINT, parallelism="none")
    torch_model = VisionEncoderDecoderModel.from_pretrained(SHAPES_CHECKPOINT).eval()
    pixels = captioner.preprocess(sorted(SHAPES_IMAGES.glob("*.png")))
    return captioner, torch_model, pixels


@pytest.mark.parametrize("overrides,captions_end", [
    (dict(num_beams=1, max_length=24), True),
    (dict(num_beams=4, max_length=24, num_return_sequences=2), True),
    # A strong length penalty with "never" keeps beams running to max_length.
    (dict(num_beams=3, max_length=20, length_penalty=2.0, early_stopping="never",
          no_repeat_ngram_size=3), False),
], ids=str)
def test_trained_shapes_checkpoint_equals_pytorch_generate(shapes_captioner, overrides,
                                                           captions_end):
    captioner, torch_model, pixels = shapes_captioner
    settings = captioner.settings(**overrides)
    report = parity.compare_with_pytorch(captioner, pixels, settings, pytorch_model=torch_model)
    assert report.all_match, parity.format_report(report)
    assert report.max_score_difference <= SCORE_TOLERANCE, parity.format_report(report)
    if captions_end:  # the trained model ends its best captions before max_length
        for image in report.images:
            assert (image.flax_sequences[0, 1:] == settings.eos_token_id).any()


# ----------------------------------------------------------------------------------------
# Issue 12: the new processors with per-token scores, beam indices and per-step scores.
# ----------------------------------------------------------------------------------------


def assert_detailed_parity(ours: parity.GenerationOutput, theirs: parity.GenerationOutput,
                           settings: GenerationSettings, context: str) -> None:
    """Tokens equal, token scores within 1e-4 + 1e-4 x |PyTorch's|, per-step scores / logits
    within STEP_ATOL / STEP_RTOL, beam indices equal; per-step arrays on the steps both loops
    ran (ours may stop earlier: each image has its own done flag)."""
    report = parity.compare_outputs(theirs, ours, settings)
    assert report.all_match, f"{context}\n" + parity.format_report(report)
    assert report.max_score_difference <= SCORE_TOLERANCE, parity.format_report(report)
    # Relative too: exponential_decay_length_penalty multiplies EOS's score (seed 16: 12.98396
    # against 12.98409, a 9.8e-6 relative difference after a x1.5^k boost; measured).
    np.testing.assert_allclose(ours.token_scores, theirs.token_scores, rtol=STEP_RTOL,
                               atol=SCORE_TOLERANCE, err_msg=context)
    if settings.num_beams > 1:
        np.testing.assert_array_equal(ours.beam_indices, theirs.beam_indices, err_msg=context)
    for name in ("step_scores", "step_logits"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        if mine is None:
            assert not getattr(settings, "output_" + name[5:])
            continue
        ran = ~np.isnan(mine).all(axis=(0, 2)) & ~np.isnan(reference).all(axis=(0, 2))
        compared = np.broadcast_to(ran, mine.shape[:2]).copy()
        if settings.num_beams > 1 and settings.forced_bos_token_id is not None:
            # A forced BOS leaves one finite candidate at step 0, so at step 1 only beam 0 of
            # each image is alive; torch.topk orders the exact -inf ties among the others
            # arbitrarily, so those dead beams hold other prefixes (and get other scores).
            compared[np.arange(len(mine)) % settings.num_beams != 0, 1] = False
        assert ran[0], context
        np.testing.assert_allclose(mine[compared], reference[compared], rtol=STEP_RTOL,
                                   atol=STEP_ATOL, err_msg=f"{name} {context}")


def assert_processor_parity(models: list[TinyModel], settings: GenerationSettings) -> None:
    for seed, model in zip(CHECKPOINT_SEEDS, models):
        assert_detailed_parity(generate(model, settings),
                               parity.pytorch_generate(model.torch_model, model.pixels, settings),
                               settings, f"checkpoint seed {seed}, {settings}")


NEW_PROCESSORS = [
    dict(sequence_bias={(3,): 2.0, (4, 5): -2.5, (EOS,): -0.5, (6, 6): 1.0}),
    dict(forced_eos_token_id=EOS, exponential_decay_length_penalty=(3, 1.5)),
    dict(suppress_tokens=[2, 7, 11], begin_suppress_tokens=[EOS, 4]),
    dict(forced_bos_token_id=6, begin_suppress_tokens=[EOS, 9], renormalize_logits=True),
    dict(remove_invalid_values=True, min_length=5, suppress_tokens=[8], renormalize_logits=True),
]
PROCESSOR_MODES = [
    dict(num_beams=1, max_length=14),
    dict(num_beams=2, length_penalty=0.5, early_stopping=True, max_length=12),
    dict(num_beams=3, length_penalty=2.0, early_stopping="never", max_length=14,
         num_return_sequences=2),
    dict(num_beams=4, length_penalty=1.0, early_stopping=False, max_length=12,
         num_return_sequences=4),
    dict(num_beams=5, length_penalty=1.0, early_stopping=True, max_length=10),
]
# Each processor with two modes; together they cover num_beams 1..5.
PROCESSOR_COVERING = [{**PROCESSOR_MODES[(i + shift) % 5], **processor}
                      for i, processor in enumerate(NEW_PROCESSORS) for shift in (0, 3)]


@pytest.mark.parametrize("overrides", PROCESSOR_COVERING, ids=str)
def test_new_processors_equal_pytorch_generate(models, overrides):
    assert_processor_parity(models, settings_for(**overrides, output_scores=True))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {**mode, **processor, "output_logits": True}
    for mode, processor in itertools.product(PROCESSOR_MODES, NEW_PROCESSORS)], ids=str)
def test_new_processor_grid_equals_pytorch_generate(models, overrides):
    assert_processor_parity(models, settings_for(**overrides, output_scores=True))


def test_generator_returns_every_beam_ranked_with_outputs(models):
    """Through ``Generator``: all K beams per image best first, per-step arrays shaped
    [B * K, T - 1, V], equal to PyTorch's."""
    model = models[1]
    settings = settings_for(num_beams=3, num_return_sequences=3, max_length=12,
                            output_scores=True, output_logits=True)
    ours = Generator(model.params, model.config).generate(model.pixels[:3], settings)
    assert ours.step_scores.shape == ours.step_logits.shape == (9, 11, VOCAB)
    assert ours.beam_indices.shape == (9, 11) and ours.token_scores.shape == (9, 12)
    assert (np.diff(ours.scores.reshape(3, 3), axis=1) <= 0).all()
    theirs = parity.pytorch_generate(model.torch_model, model.pixels[:3], settings)
    assert_detailed_parity(ours, theirs, settings, str(settings))


def test_shapes_checkpoint_new_processors_equal_pytorch_generate(shapes_captioner):
    captioner, torch_model, pixels = shapes_captioner
    for overrides in (dict(num_beams=3, max_length=20, num_return_sequences=3,
                           sequence_bias={(5,): 1.5, (7, 8): -1.0}, suppress_tokens=[3],
                           exponential_decay_length_penalty=(6, 1.3)),
                      dict(num_beams=1, max_length=20, begin_suppress_tokens=[4],
                           renormalize_logits=True, forced_eos_token_id=0)):
        settings = captioner.settings(**overrides, output_scores=True)
        ours = captioner.generator.generate(pixels, settings)
        theirs = parity.pytorch_generate(torch_model, pixels, settings)
        assert_detailed_parity(ours, theirs, settings, str(settings))
