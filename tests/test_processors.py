"""Issue 12's processors, warpers, beam sampling and outputs against transformers 4.57.

Deterministic settings run on the bit-exact stub decoder of ``test_search`` (a seeded logits
table indexed by a hash of the prefix), so any difference is a search difference: tokens
must be equal, scores within 1e-5, per-token scores, per-step scores and logits within 1e-4,
beam indices equal. The same settings on real (tiny, chaotic) checkpoints run in
``test_parity_generate.py``. Sampling is checked unit by unit (each warper's output equals
PyTorch's warper on the same inputs) and by distribution (statistical tests with stated
false-alarm rates).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from flax_captioner import processors, search
from flax_captioner.settings import GenerationSettings
from test_search import (EOS, IMAGE_SEEDS, VOCAB, make_table, row_keys, search_output,
                         settings_for, torch_output)

STEP_TOLERANCE = 1e-4

# Each new processor, with values that bite on the stub's 16-token vocabulary.
PROCESSORS = {
    "sequence_bias": dict(sequence_bias={(3,): 2.5, (4, 5): -3.0, (EOS,): -1.0, (1, 2, 3): 4.0,
                                         (6, 6): 1.5}),
    "forced_bos": dict(forced_bos_token_id=5),
    "forced_eos": dict(forced_eos_token_id=EOS),
    "exponential_decay": dict(exponential_decay_length_penalty=(2, 1.6)),
    "suppress_tokens": dict(suppress_tokens=[2, 7, 9]),
    "begin_suppress": dict(begin_suppress_tokens=[EOS, 3]),
    "forced_bos_begin_suppress": dict(forced_bos_token_id=4, begin_suppress_tokens=[EOS, 1]),
    "renormalize": dict(renormalize_logits=True, repetition_penalty=1.4),
    "remove_invalid": dict(remove_invalid_values=True, min_length=4, suppress_tokens=[6]),
}

# Greedy and beam search over num_beams 1..5, every length penalty and early_stopping value.
MODES = [
    dict(num_beams=1, max_length=11),
    dict(num_beams=2, length_penalty=0.5, early_stopping=True, max_length=9),
    dict(num_beams=3, length_penalty=1.0, early_stopping=False, max_length=12,
         num_return_sequences=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", max_length=10),
    dict(num_beams=5, length_penalty=1.0, early_stopping=True, max_length=11,
         num_return_sequences=5),
]


def assert_outputs_equal_torch(table, settings: GenerationSettings) -> search.SearchOutput:
    """Tokens, scores, per-token scores, beam indices and per-step scores/logits."""
    ours = search_output(table, IMAGE_SEEDS, settings)
    theirs = torch_output(table, IMAGE_SEEDS, settings)
    message = str(settings)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences, err_msg=message)
    np.testing.assert_allclose(ours.scores, theirs.scores, rtol=0, atol=1e-5, err_msg=message)
    np.testing.assert_allclose(ours.token_scores, theirs.token_scores, rtol=0,
                               atol=STEP_TOLERANCE, err_msg=message)
    if settings.num_beams > 1:
        np.testing.assert_array_equal(ours.beam_indices, theirs.beam_indices, err_msg=message)
    for name in ("step_scores", "step_logits"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert (mine is None) == (not getattr(settings, "output_" + name[5:]))
        if mine is None:
            continue
        # Our loop may stop earlier than PyTorch's batch-wide loop (each image has its own
        # done flag): compare the steps both ran.
        ran = ~np.isnan(mine).all(axis=(0, 2)) & ~np.isnan(reference).all(axis=(0, 2))
        assert ran[0] and ran.sum() >= 2, message
        compared = np.broadcast_to(ran, mine.shape[:2]).copy()
        if settings.num_beams > 1 and settings.forced_bos_token_id is not None:
            # A forced BOS leaves one finite candidate at step 0, so at step 1 only beam 0 of
            # each image is alive; torch.topk orders the exact -inf ties among the others
            # arbitrarily, so those dead beams hold other prefixes (and get other scores).
            compared[np.arange(len(mine)) % settings.num_beams != 0, 1] = False
        np.testing.assert_allclose(mine[compared], reference[compared], rtol=0,
                                   atol=STEP_TOLERANCE, err_msg=f"{name} {message}")
    return ours


def covering_cases():
    """Every processor with two modes (rotating through MODES), plus every processor at
    once with output_logits."""
    for index, (name, processor) in enumerate(PROCESSORS.items()):
        for mode in (MODES[index % len(MODES)], MODES[(index + 2) % len(MODES)]):
            yield f"{name}-beams{mode['num_beams']}", {**mode, **processor}


COVERING = dict(covering_cases())


@pytest.mark.parametrize("overrides", COVERING.values(), ids=COVERING.keys())
def test_processor_outputs_equal_torch(overrides):
    settings = settings_for(**overrides, output_scores=True)
    for table_seed in (2, 3):
        assert_outputs_equal_torch(make_table(table_seed, eos_bias=1.0), settings)


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: f"beams{mode['num_beams']}")
def test_all_processors_together_with_logits(mode):
    combined = {**PROCESSORS["sequence_bias"], **PROCESSORS["exponential_decay"],
                **PROCESSORS["suppress_tokens"], **PROCESSORS["begin_suppress"],
                "renormalize_logits": True, "remove_invalid_values": True,
                "forced_eos_token_id": EOS, "no_repeat_ngram_size": 2, "min_length": 3}
    settings = settings_for(**mode, **combined, output_scores=True, output_logits=True)
    assert_outputs_equal_torch(make_table(4, eos_bias=1.0), settings)


FULL = {f"{name}-{index}": {**mode, **processor}
        for (name, processor), (index, mode) in itertools.product(
            PROCESSORS.items(), enumerate(MODES + [
                dict(num_beams=2, length_penalty=2.0, early_stopping=False, max_length=12),
                dict(num_beams=3, length_penalty=0.5, early_stopping="never", max_length=10),
                dict(num_beams=4, length_penalty=1.0, early_stopping=True, max_length=12,
                     num_return_sequences=4),
                dict(num_beams=5, length_penalty=2.0, early_stopping=False, max_length=9)]))}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", FULL.values(), ids=FULL.keys())
def test_full_processor_grid_equals_torch(overrides):
    settings = settings_for(**overrides, output_scores=True)
    for table_seed in (5, 6):
        assert_outputs_equal_torch(make_table(table_seed, eos_bias=1.0), settings)


def test_every_beam_is_returned_ranked_with_token_scores_that_add_up():
    """num_return_sequences == num_beams: all K beams per image, best first; each beam's
    score is its summed per-token log-probs over generated_length ** length_penalty."""
    settings = settings_for(num_beams=4, num_return_sequences=4, max_length=12,
                            length_penalty=1.5)
    ours = assert_outputs_equal_torch(make_table(7, eos_bias=1.0), settings)
    scores = ours.scores.reshape(len(IMAGE_SEEDS), 4)
    assert (np.diff(scores, axis=1) <= 0).all() and (scores > search.MASK_SCORE / 2).all()
    generated = (ours.beam_indices >= 0).sum(axis=1)
    np.testing.assert_allclose(ours.token_scores.sum(axis=1) / generated ** 1.5, ours.scores,
                               rtol=0, atol=1e-5)
    assert len({tuple(row) for row in ours.sequences}) == len(ours.sequences)


def test_outputs_not_asked_for_are_not_computed():
    output = search_output(make_table(7), IMAGE_SEEDS, settings_for(num_beams=2, max_length=6))
    assert output.step_scores is None and output.step_logits is None
    greedy = search_output(make_table(7), IMAGE_SEEDS, settings_for(max_length=6))
    assert greedy.beam_indices is None
    np.testing.assert_allclose(greedy.token_scores.sum(axis=1), greedy.scores, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Warpers: processed logits equal PyTorch's warper on the same inputs.
# ----------------------------------------------------------------------------------------


def torch_warper(name: str, value: float, keep: int):
    from transformers.generation import logits_process as lp

    return {
        "temperature": lambda: lp.TemperatureLogitsWarper(value),
        "top_k": lambda: lp.TopKLogitsWarper(int(value), min_tokens_to_keep=keep),
        "top_p": lambda: lp.TopPLogitsWarper(value, min_tokens_to_keep=keep),
        "min_p": lambda: lp.MinPLogitsWarper(value, min_tokens_to_keep=keep),
        "typical_p": lambda: lp.TypicalLogitsWarper(value, min_tokens_to_keep=keep),
        "epsilon_cutoff": lambda: lp.EpsilonLogitsWarper(value, min_tokens_to_keep=keep),
        "eta_cutoff": lambda: lp.EtaLogitsWarper(value, min_tokens_to_keep=keep),
    }[name]()


WARPER_CASES = [("temperature", 0.6), ("top_k", 3), ("top_k", 1), ("top_p", 0.7),
                ("top_p", 0.05), ("min_p", 0.1), ("min_p", 0.9), ("typical_p", 0.5),
                ("typical_p", 0.95), ("epsilon_cutoff", 0.03), ("epsilon_cutoff", 0.5),
                ("eta_cutoff", 0.02), ("eta_cutoff", 0.5)]


@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize("name,value", WARPER_CASES)
def test_each_warper_equals_pytorch_warper(name, value, keep):
    rng = np.random.default_rng(len(name) + keep)
    logits = (rng.standard_normal((6, 40)) * 3).astype(np.float32)
    logits[1, :30] = -np.inf  # masked by an earlier processor
    # Nearly flat (exact ties are excluded: torch.sort orders them arbitrarily).
    logits[2] = rng.permutation(np.linspace(-0.2, 0.2, 40)).astype(np.float32)
    logits[3, 5] = 30.0  # one token holds all the mass
    neutral = dict(top_k=0)  # PyTorch's default top_k=50 would act on its own
    settings = settings_for(**{**neutral, name: value})
    ours = np.asarray(processors.warp_scores(jnp.asarray(logits)[None], settings, keep))[0]
    theirs = torch_warper(name, value, keep)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Sampling distributions.
# ----------------------------------------------------------------------------------------


def first_token_distribution_torch(table: np.ndarray, warpers: dict) -> np.ndarray:
    logits = torch.from_numpy(table[(0 * 31 + EOS + 7) % table.shape[0]])[None]
    for name, value in warpers.items():
        logits = torch_warper(name, value, 1)(None, logits)
    return torch.softmax(logits, dim=-1)[0].numpy()


@pytest.mark.parametrize("warpers", [dict(min_p=0.15), dict(typical_p=0.6),
                                     dict(epsilon_cutoff=0.04), dict(eta_cutoff=0.1),
                                     dict(temperature=0.8, min_p=0.05, typical_p=0.9)],
                         ids=str)
def test_sampled_first_tokens_follow_each_new_warper(warpers):
    """20,000 first-step draws against PyTorch's warped distribution: removed tokens never
    drawn, the rest within 5 standard errors (false alarm < 16 x 5.7e-7 per case)."""
    table = make_table(8)
    settings = settings_for(max_length=2, do_sample=True, top_k=0, **warpers)
    samples = 20000
    sequences, _ = search_output(table, [0] * samples, settings,
                                 row_keys(samples, seed=12))[:2]
    observed = np.bincount(sequences[:, 1], minlength=VOCAB) / samples
    expected = first_token_distribution_torch(table, warpers)
    assert observed[expected == 0].sum() == 0
    assert (expected == 0).any() or "temperature" in warpers
    standard_error = np.sqrt(expected * (1 - expected) / samples)
    assert np.all(np.abs(observed - expected) <= 5 * standard_error + 1e-9)


def caption_counts(sequences: np.ndarray, categories: list[tuple[int, ...]]) -> np.ndarray:
    index = {caption: i for i, caption in enumerate(categories)}
    counts = np.zeros(len(categories) + 1)
    for row in map(tuple, sequences):
        counts[index.get(row, len(categories))] += 1
    return counts


@pytest.mark.parametrize("overrides", [
    dict(num_beams=2, max_length=4, top_k=0),
    dict(num_beams=3, max_length=4, temperature=1.5, min_p=0.002, num_return_sequences=2),
], ids=str)
def test_beam_sampling_captions_follow_pytorch_beam_sampling(overrides):
    """Whole returned captions of 3,000 beam-sampled runs of one image, ours vs PyTorch's
    ``generate(do_sample=True, num_beams=K)``: a chi-square test of homogeneity over the
    captions seen at least 20 times (the rest pooled) must not reject at p = 1e-3, the
    false-alarm rate per case. Seeds are fixed, so the outcome is deterministic."""
    table = make_table(10, eos_bias=2.0)
    settings = settings_for(do_sample=True, **overrides)
    samples = 3000
    best = slice(None, None, settings.num_return_sequences)  # one caption per run
    ours = search_output(table, [0] * samples, settings, row_keys(samples, seed=21)).sequences
    torch.manual_seed(0)
    theirs = torch_output(table, [0] * samples, settings).sequences
    ours, theirs = ours[best], theirs[best]
    values, counts = np.unique(np.concatenate([ours, theirs]), axis=0, return_counts=True)
    categories = [tuple(v) for v, c in zip(values, counts) if c >= 20]
    assert len(categories) >= 5  # a real distribution, not a near-deterministic search
    table_counts = np.stack([caption_counts(ours, categories), caption_counts(theirs, categories)])
    table_counts = table_counts[:, table_counts.sum(axis=0) > 0]
    assert stats.chi2_contingency(table_counts).pvalue > 1e-3


def test_beam_sampling_depends_on_the_image_key_not_the_batch():
    table = make_table(9, eos_bias=0.5)
    settings = settings_for(max_length=10, do_sample=True, num_beams=3, num_return_sequences=2)
    keys = row_keys(4, seed=3)
    together = search_output(table, IMAGE_SEEDS[:4], settings, keys)
    alone = search_output(table, IMAGE_SEEDS[2:3], settings, keys[2:3])
    np.testing.assert_array_equal(alone.sequences, together.sequences[4:6])
    np.testing.assert_array_equal(alone.beam_indices, together.beam_indices[4:6])
    greedy_beams = search_output(table, IMAGE_SEEDS[:4], settings_for(max_length=10, num_beams=3,
                                                                      num_return_sequences=2))
    assert not np.array_equal(together.sequences, greedy_beams.sequences)


# ----------------------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(bad_words_ids=[12]), "bad_words_ids must be a list of non-empty token-id lists"),
    (dict(bad_words_ids="12"), "bad_words_ids must be a non-empty list of token-id lists"),
    (dict(bad_words_ids=["ab"]), "bad_words_ids must be a list of non-empty token-id lists"),
    (dict(bad_words_ids=[[1], []]), "bad_words_ids must be a list of non-empty token-id lists"),
    (dict(bad_words_ids=[]), "bad_words_ids must be a non-empty list"),
    (dict(bad_words_ids=[[-3]]), "bad_words_ids must be lists of non-negative integer"),
    (dict(bad_words_ids=[[1.5]]), "bad_words_ids must be lists of non-negative integer"),
    (dict(sequence_bias={(1,): "x"}), "sequence_bias must map"),
    (dict(sequence_bias=[[[], 1.0]]), "sequence_bias must map"),
    (dict(sequence_bias=5), "sequence_bias must map"),
    (dict(suppress_tokens=[1, -1]), "suppress_tokens must be a list of non-negative"),
    (dict(begin_suppress_tokens="3"), "begin_suppress_tokens must be a list"),
    (dict(forced_bos_token_id=-1), "forced_bos_token_id must be a non-negative integer"),
    (dict(forced_eos_token_id=[1, 2]), "forced_eos_token_id must be a non-negative integer"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty must be"),
    (dict(exponential_decay_length_penalty=(2, 0.0)), "exponential_decay_length_penalty"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(typical_p=0.0), "typical_p must be in (0, 1]"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff must be in [0, 1)"),
    (dict(eta_cutoff=-0.1), "eta_cutoff must be in [0, 1)"),
    (dict(renormalize_logits="yes"), "renormalize_logits must be True or False"),
    (dict(output_scores=1), "output_scores must be True or False"),
    (dict(num_beam_groups=2, diversity_penalty=0.5), "diversity_penalty (group/diverse beam"),
    (dict(num_beam_groups=2), "num_beam_groups (group/diverse beam search) is not supported"),
    (dict(force_words_ids=[[3]]), "force_words_ids (constrained beam search)"),
    (dict(constraints=["c"]), "constraints (constrained beam search)"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha (contrastive search)"),
    (dict(dola_layers="high"), "dola_layers (DoLa decoding)"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens (prompt-lookup decoding)"),
    (dict(guidance_scale=2.0), "guidance_scale (classifier-free guidance)"),
])
def test_new_settings_are_validated_with_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        settings_for(**overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_new_settings_are_hashable_and_normalised():
    settings = settings_for(sequence_bias={(1, 2): -1, (3,): 0.5}, suppress_tokens=[4, 5],
                            begin_suppress_tokens=np.array([6]),
                            exponential_decay_length_penalty=[3, 1.2],
                            num_beam_groups=1, diversity_penalty=0.0, penalty_alpha=0.0)
    assert settings.sequence_bias == (((1, 2), -1.0), ((3,), 0.5))
    assert settings.suppress_tokens == (4, 5) and settings.begin_suppress_tokens == (6,)
    assert settings.exponential_decay_length_penalty == (3, 1.2)
    assert hash(settings) == hash(settings_for(sequence_bias=[[[1, 2], -1.0], [[3], 0.5]],
                                               suppress_tokens=(4, 5), begin_suppress_tokens=[6],
                                               exponential_decay_length_penalty=(3, 1.2)))
    # Beam sampling is a mode now.
    assert settings_for(num_beams=3, do_sample=True).do_sample


def test_beam_sampling_keys_are_required():
    settings = settings_for(num_beams=2, do_sample=True, max_length=4)
    with pytest.raises(ValueError, match="beam sampling needs row_keys"):
        search.search(lambda tokens, position, state: (jnp.zeros(tokens.shape + (VOCAB,)), state),
                      lambda state, indices: state, None, 1, settings, None)


def test_generation_config_json_sets_defaults(tmp_path):
    """A checkpoint's generation_config.json fields become defaults, as in ``generate``; the
    card's num_beams / max_length (4 / 16) stay the fallback; overrides still win."""
    import json
    import shutil
    from pathlib import Path

    from flax_captioner import loading

    shapes = Path(__file__).resolve().parent.parent / "examples" / "shapes-captioner"
    shutil.copy(shapes / "config.json", tmp_path / "config.json")
    config = loading.read_config(tmp_path)
    assert loading.generation_defaults(config, tmp_path) == loading.generation_defaults(config)
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "num_beams": 3, "no_repeat_ngram_size": 2, "suppress_tokens": [5, 6],
        "sequence_bias": [[[7], -1.5]], "bos_token_id": 0, "top_p": None,
        "num_beam_groups": 1, "transformers_version": "4.57.6"}))
    defaults = loading.generation_defaults(config, tmp_path)
    assert hash(defaults) is not None
    settings = GenerationSettings.resolve(defaults, length_penalty=2.0)
    assert (settings.num_beams, settings.max_length) == (3, 16)
    assert settings.no_repeat_ngram_size == 2 and settings.suppress_tokens == (5, 6)
    assert settings.sequence_bias == (((7,), -1.5),) and settings.length_penalty == 2.0
    assert GenerationSettings.resolve(defaults, num_beams=1).num_beams == 1
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    with pytest.raises(loading.ModelLoadError, match="lists several EOS ids"):
        loading.generation_defaults(config, tmp_path)


def test_parity_report_names_the_settings_compared():
    from flax_captioner import parity

    settings = settings_for(num_beams=3, sequence_bias={(3,): 1.0}, min_p=0.1,
                            renormalize_logits=True)
    first_line = parity.format_report(parity.ParityReport(settings, [])).splitlines()[0]
    assert first_line.startswith("settings: decoder_start_token_id=15")
    for shown in ("num_beams=3", "sequence_bias=(((3,), 1.0),)", "min_p=0.1",
                  "renormalize_logits=True"):
        assert shown in first_line
    assert "top_k" not in first_line  # defaults are not listed
    # Per-token and per-step differences are reported where both sides have them.
    sequences = np.zeros((2, 5), np.int32)
    ours = parity.GenerationOutput(sequences, np.zeros(2, np.float32),
                                   np.full((2, 5), 0.5, np.float32),
                                   step_scores=np.full((6, 4, 16), -np.inf, np.float32))
    theirs = parity.GenerationOutput(sequences, np.zeros(2, np.float32),
                                     np.full((2, 5), 0.25, np.float32),
                                     step_scores=np.full((6, 4, 16), -np.inf, np.float32))
    theirs.step_scores[0, 0, 0], ours.step_scores[0, 0, 0] = 1.0, 1.5
    report = parity.compare_outputs(theirs, ours, settings_for(max_length=5))
    assert (report.token_score_difference, report.step_score_difference) == (0.25, 0.5)
    assert "max token score difference 2.50e-01; max step score difference 5.00e-01" in (
        parity.format_report(report))
    kwargs = parity.pytorch_generate_kwargs(settings)
    assert kwargs["sequence_bias"] == {(3,): 1.0} and kwargs["min_p"] == 0.1
    assert kwargs["renormalize_logits"] is True and kwargs["return_dict_in_generate"] is True
