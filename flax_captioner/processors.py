"""PyTorch's logits processors and sampling warpers as pure functions of a step's scores.

``process_scores`` applies the whole list ``GenerationMixin._get_logits_processor`` builds in
transformers 4.57 (processors, then the warpers when sampling, then the renormalization), in
its order and with its float32 arithmetic; each ``settings`` field that is at its no-op value
is skipped, as PyTorch skips its processor. The searches (``search.py``) call it once per
step on scores [B, K, V] (K beams, or R sampled rows, per image; V vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_captioner.settings import GenerationSettings


def process_scores(scores: jax.Array, sequences: jax.Array, cur_len: jax.Array,
                   settings: GenerationSettings) -> jax.Array:
    """Applies PyTorch's whole ``logits_processor`` list: processors, warpers, renormalization.

    Order as ``_get_logits_processor`` builds it: sequence_bias -> repetition_penalty ->
    no_repeat_ngram -> bad_words -> min_length -> forced_bos -> forced_eos ->
    remove_invalid_values -> exponential_decay_length_penalty -> suppress_tokens ->
    begin_suppress_tokens; then, when sampling, the warpers (``warp_scores``); then
    ``renormalize_logits`` (a log-softmax), always last.

    Args:
      scores: [B, K, V] float32, raw logits (greedy/sampling) or log-probs (beam search).
      sequences: [B, K, T] int32; positions ``< cur_len`` hold the tokens so far.
      cur_len: int32 [], the number of tokens so far (PyTorch's ``input_ids.shape[-1]``).
      settings: static settings.

    Returns:
      [B, K, V] float32.
    """
    vocab = jnp.arange(scores.shape[-1])
    if settings.sequence_bias:
        scores = _sequence_bias(scores, sequences, cur_len, settings.sequence_bias)
    if settings.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, sequences, cur_len, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        scores = _no_repeat_ngram(scores, sequences, cur_len, settings.no_repeat_ngram_size)
    bad_words = tuple(word for word in settings.bad_words_ids if word != (settings.eos_token_id,))
    if bad_words:
        scores = _bad_words(scores, sequences, cur_len, bad_words)
    if settings.min_length > 0:
        is_eos = vocab == settings.eos_token_id
        scores = jnp.where(is_eos & (cur_len < settings.min_length), -jnp.inf, scores)
    if settings.forced_bos_token_id is not None:
        forced = jnp.where(vocab == settings.forced_bos_token_id, 0.0, -jnp.inf)
        scores = jnp.where(cur_len == 1, forced, scores)
    if settings.forced_eos_token_id is not None:
        forced = jnp.where(vocab == settings.forced_eos_token_id, 0.0, -jnp.inf)
        scores = jnp.where(cur_len == settings.max_length - 1, forced, scores)
    if settings.remove_invalid_values:
        finfo = jnp.finfo(jnp.float32)
        cleaned = jnp.where(jnp.isnan(scores), 0.0, scores)
        cleaned = jnp.where(scores == jnp.inf, finfo.max, cleaned)
        scores = jnp.where(scores == -jnp.inf, finfo.min, cleaned)
    if settings.exponential_decay_length_penalty is not None:
        scores = _exponential_decay(scores, cur_len, settings)
    if settings.suppress_tokens:
        scores = jnp.where(jnp.isin(vocab, jnp.asarray(settings.suppress_tokens)), -jnp.inf,
                           scores)
    if settings.begin_suppress_tokens:
        # PyTorch's begin_index: the prompt length (1), one later after a forced BOS.
        begin_index = 1 if settings.forced_bos_token_id is None else 2
        suppressed = jnp.isin(vocab, jnp.asarray(settings.begin_suppress_tokens))
        scores = jnp.where(suppressed & (cur_len == begin_index), -jnp.inf, scores)
    if settings.do_sample:
        # Beam sampling keeps one more token than there are EOS ids (PyTorch's rule).
        scores = warp_scores(scores, settings, 2 if settings.num_beams > 1 else 1)
    if settings.renormalize_logits:
        scores = jax.nn.log_softmax(scores, axis=-1)
    return scores


def warp_scores(scores: jax.Array, settings: GenerationSettings,
                min_tokens_to_keep: int = 1) -> jax.Array:
    """Sampling warpers in PyTorch's order:
    temperature -> top_k -> top_p -> min_p -> typical_p -> epsilon_cutoff -> eta_cutoff.

    Args:
      scores: [B, K, V] float32 processed logits (log-probs in beam sampling).
      settings: the enabled warpers (a warper at its no-op value is skipped, as in PyTorch).
      min_tokens_to_keep: 1 for sampling, 2 for beam sampling.

    Returns:
      [B, K, V] float32; removed tokens are ``-inf``.
    """
    vocab_size = scores.shape[-1]
    if settings.temperature != 1.0:
        scores = scores / jnp.float32(settings.temperature)
    if settings.top_k != 0:
        top_k = min(max(settings.top_k, min_tokens_to_keep), vocab_size)
        scores = jnp.where(scores < _kth_best(scores, top_k), -jnp.inf, scores)
    if settings.top_p < 1.0:
        order = jnp.argsort(scores, axis=-1, stable=True)  # ascending
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, axis=-1),
                                               axis=-1), axis=-1)
        remove_sorted = cumulative <= jnp.float32(1 - settings.top_p)
        remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)
        scores = jnp.where(_unsort(remove_sorted, order), -jnp.inf, scores)
    if settings.min_p is not None:
        probs = jax.nn.softmax(scores, axis=-1)
        remove = probs < jnp.float32(settings.min_p) * jnp.max(probs, axis=-1, keepdims=True)
        scores = jnp.where(remove & ~_top_tokens(scores, min_tokens_to_keep), -jnp.inf, scores)
    if settings.typical_p < 1.0:
        scores = _typical(scores, settings.typical_p, min_tokens_to_keep)
    if 0.0 < settings.epsilon_cutoff < 1.0:
        remove = jax.nn.softmax(scores, axis=-1) < jnp.float32(settings.epsilon_cutoff)
        keep_top = min(min_tokens_to_keep, vocab_size)
        scores = jnp.where(remove & (scores < _kth_best(scores, keep_top)), -jnp.inf, scores)
    if 0.0 < settings.eta_cutoff < 1.0:
        scores = _eta(scores, settings.eta_cutoff, min(min_tokens_to_keep, vocab_size))
    return scores


def _kth_best(scores: jax.Array, k: int) -> jax.Array:
    """[..., V] -> [..., 1]: the k-th largest value (ties counted, as ``torch.topk``)."""
    return lax.top_k(scores, k)[0][..., -1:]


def _unsort(sorted_values: jax.Array, order: jax.Array) -> jax.Array:
    """Scatters values laid out in ``order`` back to vocabulary positions."""
    return jnp.take_along_axis(sorted_values, jnp.argsort(order, axis=-1), axis=-1)


def _top_tokens(scores: jax.Array, count: int) -> jax.Array:
    """bool [..., V]: the ``count`` best tokens (descending sort, lower index first on ties)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    in_front = jnp.arange(scores.shape[-1]) < count
    return _unsort(jnp.broadcast_to(in_front, scores.shape), order)


def _typical(scores: jax.Array, mass: float, min_tokens_to_keep: int) -> jax.Array:
    """TypicalLogitsWarper: keep the tokens whose surprisal is closest to the entropy until
    their mass reaches ``mass``."""
    normalized = jax.nn.log_softmax(scores, axis=-1)
    p = jnp.exp(normalized)
    entropy = -jnp.nansum(normalized * p, axis=-1, keepdims=True)
    shifted = jnp.abs(-normalized - entropy)
    order = jnp.argsort(shifted, axis=-1, stable=True)
    sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, axis=-1),
                                           axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cumulative < jnp.float32(mass), axis=-1, keepdims=True),
                       scores.shape[-1] - 1)
    remove_sorted = sorted_shifted > jnp.take_along_axis(sorted_shifted, last, axis=-1)
    remove_sorted = remove_sorted.at[..., :min_tokens_to_keep].set(False)
    return jnp.where(_unsort(remove_sorted, order), -jnp.inf, scores)


def _eta(scores: jax.Array, epsilon: float, keep_top: int) -> jax.Array:
    """EtaLogitsWarper: drop tokens below min(eps, sqrt(eps) * exp(-entropy)); the entropy is
    ``torch.distributions.Categorical``'s (normalized logits clamped to the float32 min)."""
    normalized = scores - jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    probs = jax.nn.softmax(normalized, axis=-1)
    clamped = jnp.maximum(normalized, jnp.finfo(jnp.float32).min)
    entropy = -jnp.sum(clamped * probs, axis=-1, keepdims=True)
    epsilon = jnp.float32(epsilon)
    eta = jnp.minimum(epsilon, jnp.sqrt(epsilon) * jnp.exp(-entropy))
    remove = jax.nn.softmax(scores, axis=-1) < eta
    return jnp.where(remove & (scores < _kth_best(scores, keep_top)), -jnp.inf, scores)


def _sequence_bias(scores, sequences, cur_len, sequence_bias):
    """SequenceBiasLogitsProcessor: single-token biases always; a longer sequence's bias on
    its last token when the row ends with the rest (skipped while longer than the context).
    The bias is summed in PyTorch's order before it is added to the scores."""
    vocab = jnp.arange(scores.shape[-1])
    length_1 = np.zeros(scores.shape[-1], np.float32)
    for ids, value in sequence_bias:
        if len(ids) == 1 and ids[0] < scores.shape[-1]:
            length_1[ids[0]] = value
    bias = jnp.zeros(scores.shape, jnp.float32) + jnp.asarray(length_1)
    for ids, value in sequence_bias:
        if len(ids) == 1:
            continue
        prefix_length = len(ids) - 1
        tail = lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - prefix_length, 0),
                                        prefix_length, axis=2)
        matches = jnp.all(tail == jnp.asarray(ids[:-1], jnp.int32), axis=-1) & (len(ids) <= cur_len)
        bias = bias + jnp.where(matches[..., None] & (vocab == ids[-1]), jnp.float32(value), 0.0)
    return scores + bias


def _exponential_decay(scores, cur_len, settings):
    """ExponentialDecayLengthPenalty: past ``start_index`` generated tokens the EOS score grows
    by ``|score| * (factor ** n - 1)``; the factor table is computed in double, like Python."""
    start, factor = settings.exponential_decay_length_penalty
    regulation_start = start + 1  # + the prompt length
    table = np.array([factor ** (length - regulation_start) - 1 if length > regulation_start
                      else 0.0 for length in range(settings.max_length + 1)], np.float32)
    multiplier = jnp.asarray(table)[cur_len]
    is_eos = jnp.arange(scores.shape[-1]) == settings.eos_token_id
    penalty = jnp.where(is_eos & (cur_len > regulation_start),
                        jnp.abs(scores) * multiplier, 0.0)
    return scores + penalty


def _token_presence(tokens: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """[B, K, N] tokens, [B, K, N] or [N] valid -> [B, K, V] bool: token occurs where valid."""
    tokens = jnp.where(valid, tokens, vocab_size)  # out of range: dropped by the scatter
    batch, beams, _ = tokens.shape
    presence = jnp.zeros((batch, beams, vocab_size), bool)
    b = jnp.arange(batch)[:, None, None]
    k = jnp.arange(beams)[None, :, None]
    return presence.at[b, k, tokens].set(True, mode="drop")


def _repetition_penalty(scores, sequences, cur_len, penalty):
    seen = _token_presence(sequences, jnp.arange(sequences.shape[-1]) < cur_len, scores.shape[-1])
    penalty = jnp.float32(penalty)
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalized, scores)


def _no_repeat_ngram(scores, sequences, cur_len, ngram_size):
    """Bans every token that would complete an n-gram already present in the row (fairseq's rule,
    the prompt included). An n-gram starting at ``i`` counts when it lies inside ``cur_len``."""
    length = sequences.shape[-1]
    windows = length - ngram_size + 1
    if windows <= 0:
        return scores
    starts = jnp.arange(windows)
    # The (n-1) most recent tokens; the slice start is clamped at 0, where nothing is valid.
    recent = lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - ngram_size + 1, 0),
                                      ngram_size - 1, axis=2) if ngram_size > 1 else None
    matches = jnp.broadcast_to(starts < cur_len - ngram_size + 1, sequences.shape[:2] + (windows,))
    for offset in range(ngram_size - 1):
        window_tokens = sequences[..., offset:offset + windows]
        matches = matches & (window_tokens == recent[..., offset:offset + 1])
    banned = _token_presence(sequences[..., ngram_size - 1:ngram_size - 1 + windows], matches,
                             scores.shape[-1])
    return jnp.where(banned, -jnp.inf, scores)


def _bad_words(scores, sequences, cur_len, bad_words):
    """NoBadWordsLogitsProcessor: ``-inf`` on a word's last token when the row ends with the
    rest of the word (always, for one-token words)."""
    vocab = jnp.arange(scores.shape[-1])
    banned = jnp.zeros(scores.shape, bool)
    for word in bad_words:
        prefix_length = len(word) - 1
        if prefix_length == 0:
            completes = jnp.ones(scores.shape[:2], bool)
        else:
            tail = lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - prefix_length, 0),
                                            prefix_length, axis=2)
            completes = jnp.all(tail == jnp.asarray(word[:-1], jnp.int32), axis=-1)
            # PyTorch skips words longer than the context (the prompt included).
            completes = completes & (len(word) <= cur_len)
        banned = banned | (completes[..., None] & (vocab == word[-1]))
    return jnp.where(banned, -jnp.inf, scores)
