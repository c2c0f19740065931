"""Search semantics on a synthetic decoder, checked against PyTorch ``generate`` itself.

The synthetic decoder's logits are a seeded float32 table row chosen by a rolling hash of the
image seed and every token so far, so they depend on the whole prefix (like a real decoder)
and are bit-identical in JAX and PyTorch. Any difference is a search difference, never a
numerical one. PyTorch runs transformers' real ``generate`` on a stub ``PreTrainedModel``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationMixin, GPT2Config, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from flax_captioner import search
from flax_captioner.generator import GenerationOutput
from flax_captioner.parity import from_pytorch_output, pytorch_generate_kwargs
from flax_captioner.settings import GenerationSettings

HASH_MODULUS = 1_000_003
VOCAB = 16
EOS = VOCAB - 1


def make_table(seed: int, rows: int = 211, eos_bias: float = 0.0) -> np.ndarray:
    table = np.random.default_rng(seed).standard_normal((rows, VOCAB)).astype(np.float32) * 3
    table[:, EOS] += eos_bias
    return table


class TableLM(PreTrainedModel, GenerationMixin):
    """PyTorch stub: logits = table[hash(image_seed, prefix) % rows] for the last position."""

    config_class = GPT2Config

    def __init__(self, config: GPT2Config, table: np.ndarray):
        super().__init__(config)
        self.table = torch.from_numpy(table)
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, image_seeds=None, **kwargs):
        hashes = image_seeds.long().clone()
        for position in range(input_ids.shape[1]):
            hashes = (hashes * 31 + input_ids[:, position] + 7) % HASH_MODULUS
        logits = self.table[hashes % self.table.shape[0]][:, None, :]
        return CausalLMOutputWithPast(logits=logits.clone())


@functools.lru_cache(maxsize=None)
def compiled_search(settings: GenerationSettings, loop: str = "until_done"):
    """The search over the same decoder in JAX, compiled once per settings and loop form; the
    table is an argument. The decoder state is the hash per beam, [B, K] int32."""

    def run(table, seeds, row_keys):
        def step_fn(tokens, position, hashes):
            hashes = (hashes * 31 + tokens + 7) % HASH_MODULUS
            return table[hashes % table.shape[0]], hashes

        def reorder_fn(hashes, beam_indices):
            return jnp.take_along_axis(hashes, beam_indices, axis=1)

        return search.search(step_fn, reorder_fn, seeds[:, None], seeds.shape[0], settings,
                             row_keys, loop)

    return jax.jit(run)


def settings_for(**overrides) -> GenerationSettings:
    defaults = dict(decoder_start_token_id=EOS, pad_token_id=EOS, eos_token_id=EOS)
    return GenerationSettings.resolve(type("Defaults", (), defaults), **overrides)


def search_output(table, image_seeds, settings, row_keys=None,
                  loop: str = "until_done") -> search.SearchOutput:
    """The whole ``SearchOutput`` as host arrays."""
    output = compiled_search(settings, loop)(jnp.asarray(table),
                                             jnp.asarray(image_seeds, jnp.int32), row_keys)
    return search.SearchOutput(*(None if x is None else np.asarray(x) for x in output))


def run_jax(table, image_seeds, settings, row_keys=None):
    output = search_output(table, image_seeds, settings, row_keys)
    return output.sequences, output.scores


def torch_output(table, image_seeds, settings) -> GenerationOutput:
    """PyTorch ``generate`` on the stub, in our output layout."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=4, n_layer=1, n_head=1, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=EOS)
    model = TableLM(config, table).eval()
    kwargs = pytorch_generate_kwargs(settings)
    del kwargs["decoder_start_token_id"]  # a decoder-only stub: the prompt is the start token
    kwargs.update(use_cache=False, bos_token_id=EOS)
    batch = len(image_seeds)
    prompt = torch.full((batch, 1), EOS)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             image_seeds=torch.tensor(image_seeds), **kwargs)
    return from_pytorch_output(model, out, settings)


def run_torch(table, image_seeds, settings):
    output = torch_output(table, image_seeds, settings)
    return output.sequences, output.scores


def assert_same_as_torch(table, image_seeds, settings):
    sequences, scores = run_jax(table, image_seeds, settings)
    torch_sequences, torch_scores = run_torch(table, image_seeds, settings)
    np.testing.assert_array_equal(sequences, torch_sequences, err_msg=str(settings))
    np.testing.assert_allclose(scores, torch_scores, rtol=0, atol=1e-5, err_msg=str(settings))
    return sequences


IMAGE_SEEDS = [3, 17, 29, 101, 257, 999]

BEAM_GRID = [
    dict(num_beams=beams, length_penalty=penalty, early_stopping=early,
         max_length=(7, 12)[index % 2], num_return_sequences=1 + index % beams)
    for index, (beams, penalty, early) in enumerate(itertools.product(
        (2, 3, 5), (0.5, 1.0, 2.0), (True, False, "never")))
]


@pytest.mark.parametrize("overrides", BEAM_GRID, ids=lambda o: "-".join(map(str, o.values())))
def test_beam_search_equals_torch_generate(overrides):
    lengths = set()
    for table_seed in (0, 1):
        sequences = assert_same_as_torch(make_table(table_seed, eos_bias=1.0), IMAGE_SEEDS,
                                         settings_for(**overrides))
        lengths |= {int(np.argmax(row[1:] == EOS)) if (row[1:] == EOS).any() else -1
                    for row in sequences}
    # The grid is only a test if captions end at varied steps.
    assert len(lengths) >= 3, lengths


PROCESSOR_CASES = [
    dict(num_beams=3, min_length=6, max_length=10),
    dict(num_beams=4, no_repeat_ngram_size=2, max_length=12, num_return_sequences=3),
    dict(num_beams=2, no_repeat_ngram_size=1, max_length=9),
    dict(num_beams=3, no_repeat_ngram_size=3, max_length=14, early_stopping=True),
    dict(num_beams=4, repetition_penalty=1.7, max_length=10, num_return_sequences=4),
    dict(num_beams=3, repetition_penalty=0.6, max_length=10, length_penalty=2.0),
    dict(num_beams=3, bad_words_ids=((2,), (4, 5), (EOS,), (1, 2, 3)), max_length=10),
    dict(num_beams=5, num_return_sequences=5, early_stopping="never", max_length=11,
         min_length=3, no_repeat_ngram_size=2, repetition_penalty=1.3, bad_words_ids=((7,),)),
    dict(num_beams=2, max_length=2),
    dict(num_beams=3, max_new_tokens=4, length_penalty=0.0),
    dict(num_beams=3, max_length=9, length_penalty=-1.0, early_stopping="never"),
]


@pytest.mark.parametrize("overrides", PROCESSOR_CASES, ids=str)
def test_processors_in_beam_search_equal_torch(overrides):
    for table_seed in (2, 3):
        assert_same_as_torch(make_table(table_seed, eos_bias=1.0), IMAGE_SEEDS,
                             settings_for(**overrides))


GREEDY_CASES = [
    dict(max_length=12),
    dict(max_length=12, min_length=5),
    dict(max_length=14, no_repeat_ngram_size=2, repetition_penalty=1.4),
    dict(max_length=10, repetition_penalty=0.7, bad_words_ids=((3,), (5, 6))),
    dict(max_length=2),
]


@pytest.mark.parametrize("overrides", GREEDY_CASES, ids=str)
def test_greedy_equals_torch_generate_and_scores_are_transition_sums(overrides):
    assert_same_as_torch(make_table(4, eos_bias=1.5), IMAGE_SEEDS, settings_for(**overrides))


def test_an_image_result_does_not_depend_on_the_batch():
    table = make_table(5, eos_bias=1.0)
    settings = settings_for(num_beams=4, num_return_sequences=2, max_length=14,
                            early_stopping=False)
    together, together_scores = run_jax(table, IMAGE_SEEDS, settings)
    for index, seed in enumerate(IMAGE_SEEDS):
        alone, alone_scores = run_jax(table, [seed], settings)
        np.testing.assert_array_equal(alone, together[2 * index:2 * index + 2])
        np.testing.assert_array_equal(alone_scores, together_scores[2 * index:2 * index + 2])
    reversed_sequences, _ = run_jax(table, IMAGE_SEEDS[::-1], settings)
    np.testing.assert_array_equal(reversed_sequences.reshape(6, 2, -1)[::-1],
                                  together.reshape(6, 2, -1))


def test_finished_beam_pool_rank_gate_and_max_length_beams():
    """Short captions at max_length are scored as finished (HF Flax returns running beams)."""
    table = make_table(6, eos_bias=-50.0)  # EOS never wins: every caption ends at max_length
    settings = settings_for(num_beams=3, max_length=6)
    sequences = assert_same_as_torch(table, IMAGE_SEEDS, settings)
    assert (sequences[:, 1:] != EOS).all()


# ----------------------------------------------------------------------------------------
# Sampling: checked by distribution.
# ----------------------------------------------------------------------------------------


LOOP_CASES = [
    dict(num_beams=3, num_return_sequences=2),
    dict(num_beams=3, do_sample=True, early_stopping=True),
    dict(num_beams=1),
    dict(num_beams=1, do_sample=True, num_return_sequences=2),
]


@pytest.mark.parametrize("overrides", LOOP_CASES, ids=str)
def test_fixed_steps_loop_returns_what_the_until_done_loop_returns(overrides):
    # EOS-heavy tables end every caption well before max_length, so the fixed loop runs steps
    # after the whole batch is done: they must change nothing, per-step records included.
    settings = settings_for(max_length=12, output_scores=True, output_logits=True, **overrides)
    keys = row_keys(len(IMAGE_SEEDS))
    for table_seed in (0, 1):
        table = make_table(table_seed, eos_bias=6.0)
        until_done = search_output(table, IMAGE_SEEDS, settings, keys, "until_done")
        fixed = search_output(table, IMAGE_SEEDS, settings, keys, "fixed_steps")
        assert np.isnan(until_done.step_scores[:, -1]).all()  # the batch ended early
        for name, expected in until_done._asdict().items():
            actual = getattr(fixed, name)
            if expected is None:
                assert actual is None, name
            else:
                np.testing.assert_array_equal(actual, expected, err_msg=f"{name} {overrides}")


def row_keys(count: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed), count)


def test_top_k_one_and_tiny_top_p_are_greedy():
    table = make_table(7, eos_bias=1.0)
    greedy, greedy_scores = run_jax(table, IMAGE_SEEDS, settings_for(max_length=12))
    keys = row_keys(len(IMAGE_SEEDS))
    for overrides in (dict(top_k=1), dict(top_k=0, top_p=1e-6)):
        sampled, sampled_scores = run_jax(
            table, IMAGE_SEEDS, settings_for(max_length=12, do_sample=True, **overrides), keys)
        np.testing.assert_array_equal(sampled, greedy)
        # One token keeps all the mass: its log-probability is 0.
        np.testing.assert_allclose(sampled_scores, 0.0, atol=1e-6)
    assert (greedy_scores < 0).all()


def first_step_frequencies(table, settings, samples: int) -> np.ndarray:
    """Empirical distribution of the first sampled token over ``samples`` images (keys)."""
    seeds = [0] * samples  # same image everywhere, a different key per image
    sequences, _ = run_jax(table, seeds, settings, row_keys(samples, seed=11))
    return np.bincount(sequences[:, 1], minlength=VOCAB) / samples


def torch_first_step_distribution(table, temperature, top_k, top_p) -> np.ndarray:
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.from_numpy(table[(0 * 31 + EOS + 7) % table.shape[0]])[None]
    for warper in (TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
                   TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1.0 else None):
        if warper is not None:
            logits = warper(None, logits)
    return torch.softmax(logits, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.8), (1.3, 6, 0.7)])
def test_sampled_first_tokens_follow_pytorch_warped_distribution(temperature, top_k, top_p):
    table = make_table(8)
    settings = settings_for(max_length=2, do_sample=True, temperature=temperature, top_k=top_k,
                            top_p=top_p)
    samples = 20000
    observed = first_step_frequencies(table, settings, samples)
    expected = torch_first_step_distribution(table, temperature, top_k, top_p)
    # Tokens PyTorch removes are never drawn; the rest match within 5 standard errors.
    assert observed[expected == 0].sum() == 0
    standard_error = np.sqrt(expected * (1 - expected) / samples)
    assert np.all(np.abs(observed - expected) <= 5 * standard_error + 1e-9)


def test_samples_depend_on_the_image_key_not_the_batch():
    table = make_table(9, eos_bias=0.5)
    settings = settings_for(max_length=10, do_sample=True, num_return_sequences=3)
    keys = row_keys(4, seed=3)
    together, together_scores = run_jax(table, IMAGE_SEEDS[:4], settings, keys)
    alone, alone_scores = run_jax(table, IMAGE_SEEDS[2:3], settings, keys[2:3])
    np.testing.assert_array_equal(alone, together[6:9])
    np.testing.assert_array_equal(alone_scores, together_scores[6:9])
    assert len({tuple(row) for row in together}) > 4  # the R rows of an image differ


def test_image_keys_fold_the_global_index_into_any_form_of_key():
    """Typed, raw and default (None) keys give ``fold_in(key, first_index + i)``, made on
    the host (generator.image_keys), whatever device the key was made on."""
    from flax_captioner.generator import image_keys

    indices = np.arange(5, 9, dtype=np.uint32)
    expected = np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.PRNGKey(7), indices))
    for key in (jax.random.PRNGKey(7), jax.random.key(7)):
        np.testing.assert_array_equal(image_keys(key, 5, 4), expected)
    np.testing.assert_array_equal(image_keys(None, 5, 4),
                                  image_keys(jax.random.PRNGKey(0), 5, 4))
    assert image_keys(None, 0, 3).dtype == np.uint32


# ----------------------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences (3) must be <= num_beams"),
    (dict(num_return_sequences=2), "greedy search returns one sequence"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(max_length=1), "max_length must be an integer >= 2"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(top_p=0.0, do_sample=True), "top_p must be in (0, 1]"),
    (dict(temperature=0.0, do_sample=True), "temperature must be a number > 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
    (dict(bad_words_ids=[[1, -2]]), "bad_words_ids must be"),
    (dict(beam_width=3), "unknown generation setting(s): beam_width"),
])
def test_invalid_settings_raise_one_line_value_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        settings_for(**overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_resolve_folds_new_token_counts_and_keeps_defaults():
    settings = settings_for(max_new_tokens=5, min_new_tokens=2, num_beams=3,
                            bad_words_ids=[[1, 2]], length_penalty=None)
    assert (settings.max_length, settings.min_length) == (6, 3)
    assert settings.bad_words_ids == ((1, 2),)
    assert settings.length_penalty == 1.0
    assert hash(settings) == hash(settings_for(max_length=6, min_length=3, num_beams=3,
                                               bad_words_ids=((1, 2),)))
