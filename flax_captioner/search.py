"""Greedy, sampling and beam search as pure XLA loops with PyTorch ``generate`` semantics.

The search is written against an abstract decoder step, so it knows nothing about the model::

    step_fn(tokens [B, K] int32, position int32 [], model_state)
        -> (logits [B, K, V] float32, model_state)
    reorder_fn(model_state, beam_indices [B, K] int32) -> model_state

``position`` is the index of the fed token in the sequence (0 for ``decoder_start``).
``reorder_fn`` gathers beams per image (``new[b, k] = old[b, beam_indices[b, k]]``) and also
expands a ``K = 1`` state to ``K`` beams (all indices 0): the first step runs on B rows only,
because before it every beam of an image holds the same prompt.

Shapes: B images, K beams (or R sampled rows per image), V vocabulary, T = ``max_length``
(the prompt ``[decoder_start]`` included). Each image carries its own sticky "done" flag and
a done image's results are frozen, so an image's caption never depends on the rest of the
batch; the loop exits as soon as every image is done.

The arithmetic mirrors transformers 4.57 (``GenerationMixin._beam_search`` and helpers,
``_sample``, ``LogitsProcessor``s) operation by operation, in float32, including its
``-1e9`` masking constant and its float32 divisions by Python-computed length penalties.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# PyTorch's beam masking constant. In float32 its spacing is 64, so ``-1e9 + x`` rounds back
# to ``-1e9`` for small x: masked entries tie exactly, as they do in PyTorch.
MASK_SCORE = -1.0e9

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]
EarlyStopping = Union[bool, str]


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a search; hashable, so it keys the compile cache.

    Names and meanings are PyTorch ``generate``'s. ``max_length`` and ``min_length`` count
    the decoder prompt ``[decoder_start]``; ``max_new_tokens``/``min_new_tokens`` are folded
    into them by ``resolve``. ``bad_words_ids`` is a tuple of token-id tuples. The sampling
    fields (``temperature``, ``top_k``, ``top_p``) only act when ``do_sample`` is true;
    ``top_k`` defaults to 50 as in PyTorch.
    """

    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: int
    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    @classmethod
    def resolve(cls, defaults: Any, **overrides: Any) -> "GenerationSettings":
        """Settings from ``defaults`` (any object with some of these attribute names, e.g. the
        checkpoint's generation defaults) with ``overrides`` applied, validated.

        ``overrides`` may also hold ``max_new_tokens`` and ``min_new_tokens`` (they take
        precedence over ``max_length``/``min_length``, as in PyTorch); ``None`` values are
        ignored.

        Raises:
          ValueError: one line naming the setting and the problem.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        values = {name: getattr(defaults, name) for name in names if hasattr(defaults, name)}
        unknown = sorted(set(overrides) - names - {"max_new_tokens", "min_new_tokens"})
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(unknown)}")
        overrides = {name: value for name, value in overrides.items() if value is not None}
        max_new_tokens = overrides.pop("max_new_tokens", None)
        min_new_tokens = overrides.pop("min_new_tokens", None)
        values.update(overrides)
        if max_new_tokens is not None:
            _require(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                     f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
            values["max_length"] = 1 + max_new_tokens
        if min_new_tokens is not None:
            _require(isinstance(min_new_tokens, int) and min_new_tokens >= 0,
                     f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
            values["min_length"] = 1 + min_new_tokens
        for token_name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            _require(token_name in values, f"{token_name} is not set (no default and no override)")
        if "bad_words_ids" in values:
            values["bad_words_ids"] = _as_token_tuples(values["bad_words_ids"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raises ValueError (one line) for settings PyTorch would reject or we cannot run."""
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0,
                     f"{name} must be a non-negative integer, got {value!r}")
        _require(_is_int(self.max_length) and self.max_length >= 2,
                 f"max_length must be an integer >= 2 (the prompt plus one token), "
                 f"got {self.max_length!r}")
        _require(_is_int(self.min_length) and self.min_length >= 0,
                 f"min_length must be a non-negative integer, got {self.min_length!r}")
        _require(_is_int(self.num_beams) and self.num_beams >= 1,
                 f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        _require(_is_int(self.num_return_sequences) and self.num_return_sequences >= 1,
                 f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.num_beams > 1:
            _require(self.num_return_sequences <= self.num_beams,
                     f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                     f"({self.num_beams})")
            _require(not self.do_sample,
                     "do_sample with num_beams > 1 (beam sampling) is not supported; "
                     "use num_beams=1 to sample")
        elif not self.do_sample:
            _require(self.num_return_sequences == 1,
                     f"greedy search returns one sequence per image; num_return_sequences="
                     f"{self.num_return_sequences} needs num_beams >= that or do_sample=True")
        _require(self.early_stopping is True or self.early_stopping is False
                 or self.early_stopping == "never",
                 f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        _require(_is_number(self.length_penalty) and math.isfinite(self.length_penalty),
                 f"length_penalty must be a finite number, got {self.length_penalty!r}")
        _require(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
                 f"no_repeat_ngram_size must be a non-negative integer, "
                 f"got {self.no_repeat_ngram_size!r}")
        _require(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        _require(_is_number(self.temperature) and self.temperature > 0,
                 f"temperature must be a number > 0, got {self.temperature!r}")
        _require(_is_int(self.top_k) and self.top_k >= 0,
                 f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(isinstance(self.bad_words_ids, tuple) and all(
            isinstance(word, tuple) and word and all(_is_int(t) and t >= 0 for t in word)
            for word in self.bad_words_ids),
            f"bad_words_ids must be non-empty lists of non-negative token ids, "
            f"got {self.bad_words_ids!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _as_token_tuples(words: Any) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(word) for word in words or ())
    except (TypeError, ValueError):
        raise ValueError(f"bad_words_ids must be a list of token-id lists, got {words!r}") from None


# ----------------------------------------------------------------------------------------
# Logits processors: PyTorch's order (_get_logits_processor) and float32 arithmetic.
# ----------------------------------------------------------------------------------------


def process_scores(scores: jax.Array, sequences: jax.Array, cur_len: jax.Array,
                   settings: GenerationSettings) -> jax.Array:
    """Applies the enabled logits processors in PyTorch's order.

    repetition_penalty -> no_repeat_ngram -> bad_words -> min_length.

    Args:
      scores: [B, K, V] float32, raw logits (greedy/sampling) or log-probs (beam search).
      sequences: [B, K, T] int32; positions ``< cur_len`` hold the tokens so far.
      cur_len: int32 [], the number of tokens so far (PyTorch's ``input_ids.shape[-1]``).
      settings: static settings.

    Returns:
      [B, K, V] float32.
    """
    if settings.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, sequences, cur_len, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        scores = _no_repeat_ngram(scores, sequences, cur_len, settings.no_repeat_ngram_size)
    bad_words = tuple(word for word in settings.bad_words_ids if word != (settings.eos_token_id,))
    if bad_words:
        scores = _bad_words(scores, sequences, cur_len, bad_words)
    if settings.min_length > 0:
        is_eos = jnp.arange(scores.shape[-1]) == settings.eos_token_id
        scores = jnp.where(is_eos & (cur_len < settings.min_length), -jnp.inf, scores)
    return scores


def warp_scores(scores: jax.Array, settings: GenerationSettings) -> jax.Array:
    """Sampling warpers in PyTorch's order: temperature -> top_k -> top_p.

    Args:
      scores: [B, K, V] float32 processed logits.

    Returns:
      [B, K, V] float32; removed tokens are ``-inf``.
    """
    if settings.temperature != 1.0:
        scores = scores / jnp.float32(settings.temperature)
    if settings.top_k != 0:
        top_k = min(max(settings.top_k, 1), scores.shape[-1])
        kth_best = lax.top_k(scores, top_k)[0][..., -1:]
        scores = jnp.where(scores < kth_best, -jnp.inf, scores)
    if settings.top_p < 1.0:
        order = jnp.argsort(scores, axis=-1, stable=True)
        sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
        remove_sorted = cumulative <= jnp.float32(1 - settings.top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)  # min_tokens_to_keep = 1
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        scores = jnp.where(remove, -jnp.inf, scores)
    return scores


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


# ----------------------------------------------------------------------------------------
# Greedy search and sampling.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class SamplingState:
    """Loop state of greedy search and sampling (B images, R rows per image, T = max_length).

    Attributes:
      step: int32 [], tokens generated so far; the next one goes to position ``step + 1``.
      sequences: int32 [B, R, T], ``decoder_start`` then the generated tokens, pad after.
      scores: float32 [B, R], summed log-probabilities of the generated tokens (EOS
        included) under the distribution they were picked from: log-softmax of the processed
        (and, when sampling, warped) logits.
      is_finished: bool [B, R], the row has emitted EOS (it emits pad from then on).
      model_state: the decoder's state for R rows per image (cache, cross K/V ...).
    """

    step: jax.Array
    sequences: jax.Array
    scores: jax.Array
    is_finished: jax.Array
    model_state: Any


def sample_search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
                  settings: GenerationSettings,
                  row_keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy search (``do_sample`` false) or ancestral sampling, PyTorch ``_sample`` semantics.

    Args:
      step_fn, reorder_fn: the decoder step and beam gather (module docstring).
      model_state: the decoder state for B rows (one per image).
      batch_size: B.
      settings: static settings with ``num_beams == 1``.
      row_keys: uint32 [B, 2], one PRNG key per image (sampling only). Step ``t`` of image
        ``b`` draws its R tokens with ``fold_in(row_keys[b], t)``, so samples do not depend on
        the batch the image is in.

    Returns:
      sequences: int32 [B * R, T]; scores: float32 [B * R] (see ``SamplingState.scores``).
    """
    rows = settings.num_return_sequences if settings.do_sample else 1
    length = settings.max_length
    if settings.do_sample and row_keys is None:
        raise ValueError("sampling needs row_keys, one PRNG key per image")

    def pick(logits: jax.Array, sequences: jax.Array, step: jax.Array):
        """logits [B, R, V] -> next tokens [B, R] and their log-probs [B, R]."""
        scores = process_scores(logits, sequences, step + 1, settings)
        if settings.do_sample:
            scores = warp_scores(scores, settings)
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
            tokens = jax.vmap(jax.random.categorical)(step_keys, scores)
        else:
            tokens = jnp.argmax(scores, axis=-1)
        log_probs = jax.nn.log_softmax(scores, axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
        return tokens.astype(jnp.int32), token_log_probs

    def advance(state: SamplingState, tokens, token_log_probs) -> SamplingState:
        tokens = jnp.where(state.is_finished, settings.pad_token_id, tokens)
        scores = state.scores + jnp.where(state.is_finished, 0.0, token_log_probs)
        at_next = jnp.arange(length) == state.step + 1
        sequences = jnp.where(at_next, tokens[..., None], state.sequences)
        return state.replace(step=state.step + 1, sequences=sequences, scores=scores,
                             is_finished=state.is_finished | (tokens == settings.eos_token_id))

    sequences = jnp.full((batch_size, rows, length), settings.pad_token_id, jnp.int32)
    sequences = sequences.at[:, :, 0].set(settings.decoder_start_token_id)
    state = SamplingState(step=jnp.int32(0), sequences=sequences,
                          scores=jnp.zeros((batch_size, rows), jnp.float32),
                          is_finished=jnp.zeros((batch_size, rows), bool),
                          model_state=model_state)

    # Step 0 on one row per image: the R rows share the prompt, hence the logits.
    start = jnp.full((batch_size, 1), settings.decoder_start_token_id, jnp.int32)
    logits, model_state = step_fn(start, jnp.int32(0), state.model_state)
    logits = jnp.broadcast_to(logits, (batch_size, rows, logits.shape[-1]))
    state = advance(state, *pick(logits, state.sequences, state.step))
    if rows > 1:
        model_state = reorder_fn(model_state, jnp.zeros((batch_size, rows), jnp.int32))
    state = state.replace(model_state=model_state)

    def keep_going(state: SamplingState) -> jax.Array:
        return (state.step < length - 1) & ~jnp.all(state.is_finished)

    def body(state: SamplingState) -> SamplingState:
        tokens = lax.dynamic_index_in_dim(state.sequences, state.step, axis=2, keepdims=False)
        logits, model_state = step_fn(tokens, state.step, state.model_state)
        state = advance(state, *pick(logits, state.sequences, state.step))
        return state.replace(model_state=model_state)

    state = lax.while_loop(keep_going, body, state)
    return (state.sequences.reshape(batch_size * rows, length),
            state.scores.reshape(batch_size * rows))


# ----------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
    """Loop state of beam search (B images, K beams, T = max_length).

    Attributes:
      step: int32 [], tokens generated so far; the next one goes to position ``step + 1``.
      running_sequences: int32 [B, K, T], the live beams (filled with the output pad).
      running_scores: float32 [B, K], their summed processed log-probs (dead beams ~ -1e9).
      finished_sequences: int32 [B, K, T], the finished pool, best first.
      finished_scores: float32 [B, K], length-normalised scores of the pool (-1e9: empty slot).
      is_finished: bool [B, K], the pool slot holds a finished hypothesis.
      may_improve: bool [B], PyTorch's sticky ``is_early_stop_heuristic_unsatisfied``.
      is_done: bool [B], sticky: the image's pool is final (what a batch of one would stop on).
      model_state: the decoder's state for K beams per image.
    """

    step: jax.Array
    running_sequences: jax.Array
    running_scores: jax.Array
    finished_sequences: jax.Array
    finished_scores: jax.Array
    is_finished: jax.Array
    may_improve: jax.Array
    is_done: jax.Array
    model_state: Any


def _length_divisors(exponent: float, lengths: np.ndarray) -> np.ndarray:
    """``float32(length ** exponent)`` computed in double, as Python does for PyTorch."""
    return np.array([float(length) ** exponent for length in lengths], np.float32)


def beam_search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
                settings: GenerationSettings) -> tuple[jax.Array, jax.Array]:
    """Beam search with transformers 4.57's vectorized semantics, one sticky state per image.

    Per step: log-softmax, processors, add the beam's running score; keep the top 2K of the
    K*V candidates; a candidate hits a stopping criterion when its token is EOS or the
    sequence reaches ``max_length``; the next running beams are the top K after masking
    those with -1e9; candidates ranked in the first K that hit a criterion enter the
    finished pool with ``score / generated_length ** length_penalty`` unless the image's
    pool is full with ``early_stopping=True`` or its early-stop heuristic has closed it.

    Args:
      step_fn, reorder_fn: the decoder step and beam gather (module docstring).
      model_state: the decoder state for one row per image.
      batch_size: B.
      settings: static settings with ``num_beams > 1``.

    Returns:
      sequences: int32 [B * R, T], the R best finished hypotheses per image, padded with
        ``pad_token_id`` (PyTorch falls back to EOS when pad is 0; so does this).
      scores: float32 [B * R], PyTorch's ``sequences_scores``.
    """
    beams = settings.num_beams
    candidates = 2 * beams  # max(2, 1 + number of EOS ids) * num_beams, one EOS id
    length = settings.max_length
    fill = settings.pad_token_id or settings.eos_token_id  # PyTorch's `pad or eos`
    generated = np.arange(1, length)
    finished_divisors = jnp.asarray(_length_divisors(settings.length_penalty, generated))
    if settings.early_stopping == "never" and settings.length_penalty > 0:
        best_lengths = np.full_like(generated, length - 1)
    else:
        best_lengths = generated
    heuristic_divisors = jnp.asarray(_length_divisors(settings.length_penalty, best_lengths))
    in_first_k = jnp.arange(candidates) < beams

    def gather(values: jax.Array, indices: jax.Array) -> jax.Array:
        """values [B, N, ...], indices [B, M] -> [B, M, ...] along the beam axis."""
        indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
        return jnp.take_along_axis(values, indices, axis=1)

    def select(state: BeamState, log_probs: jax.Array) -> tuple[BeamState, jax.Array]:
        """One beam update from processed log-probs [B, K, V]; returns the new state and
        the source beam of each new running beam, [B, K]."""
        vocab = log_probs.shape[-1]
        step = state.step
        accumulated = (log_probs + state.running_scores[:, :, None]).reshape(batch_size, -1)
        topk_scores, topk_indices = lax.top_k(accumulated, candidates)
        topk_beams = topk_indices // vocab
        topk_tokens = (topk_indices % vocab).astype(jnp.int32)
        at_next = jnp.arange(length) == step + 1
        topk_sequences = jnp.where(at_next, topk_tokens[..., None],
                                   gather(state.running_sequences, topk_beams))
        hits_criterion = (topk_tokens == settings.eos_token_id) | (step + 2 >= length)

        # Next running beams: the best K that did not stop.
        running_candidates = topk_scores + hits_criterion.astype(jnp.float32) * MASK_SCORE
        next_indices = lax.top_k(running_candidates, beams)[1]
        running_sequences = gather(topk_sequences, next_indices)
        running_scores = gather(running_candidates, next_indices)
        source_beams = gather(topk_beams, next_indices).astype(jnp.int32)

        # Finished pool: same additions, in the same order, as PyTorch.
        just_finished = hits_criterion & in_first_k
        pool_full = jnp.all(state.is_finished, axis=-1, keepdims=True) & (
            settings.early_stopping is True)
        scores = topk_scores / finished_divisors[step]
        scores = scores + pool_full.astype(jnp.float32) * MASK_SCORE
        scores = scores + (~state.may_improve[:, None]).astype(jnp.float32) * MASK_SCORE
        scores = scores + (~just_finished).astype(jnp.float32) * MASK_SCORE
        merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
        keep = lax.top_k(merged_scores, beams)[1]
        finished_sequences = gather(
            jnp.concatenate([state.finished_sequences, topk_sequences], axis=1), keep)
        finished_scores = gather(merged_scores, keep)
        is_finished = gather(jnp.concatenate([state.is_finished, just_finished], axis=1), keep)

        # Early-stop heuristic with the advanced length, then the per-image stop test.
        best_running = running_scores[:, :1] / heuristic_divisors[step]
        worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True),
                                   MASK_SCORE)
        may_improve = state.may_improve & jnp.any(best_running > worst_finished, axis=-1)
        pool_closed = jnp.all(is_finished, axis=-1) & (settings.early_stopping is True)
        no_continuation = jnp.all(hits_criterion, axis=-1)
        stops = ~may_improve | pool_closed | no_continuation

        # A done image keeps its pool: what a batch of one would have returned.
        frozen = state.is_done
        new_state = state.replace(
            step=step + 1,
            running_sequences=running_sequences,
            running_scores=running_scores,
            finished_sequences=jnp.where(frozen[:, None, None], state.finished_sequences,
                                         finished_sequences),
            finished_scores=jnp.where(frozen[:, None], state.finished_scores, finished_scores),
            is_finished=jnp.where(frozen[:, None], state.is_finished, is_finished),
            may_improve=jnp.where(frozen, state.may_improve, may_improve),
            is_done=frozen | stops,
        )
        return new_state, source_beams

    def beam_log_probs(logits: jax.Array, state: BeamState) -> jax.Array:
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return process_scores(log_probs, state.running_sequences, state.step + 1, settings)

    sequences = jnp.full((batch_size, beams, length), fill, jnp.int32)
    sequences = sequences.at[:, :, 0].set(settings.decoder_start_token_id)
    running_scores = jnp.where(jnp.arange(beams) == 0, 0.0, MASK_SCORE).astype(jnp.float32)
    state = BeamState(
        step=jnp.int32(0),
        running_sequences=sequences,
        running_scores=jnp.broadcast_to(running_scores, (batch_size, beams)),
        finished_sequences=sequences,
        finished_scores=jnp.full((batch_size, beams), MASK_SCORE, jnp.float32),
        is_finished=jnp.zeros((batch_size, beams), bool),
        may_improve=jnp.ones((batch_size,), bool),
        is_done=jnp.zeros((batch_size,), bool),
        model_state=None,
    )

    # Step 0 on one row per image: all K beams hold the prompt, so their logits are equal;
    # beams 1..K-1 take part with their -1e9 scores exactly as in PyTorch.
    start = jnp.full((batch_size, 1), settings.decoder_start_token_id, jnp.int32)
    logits, model_state = step_fn(start, jnp.int32(0), model_state)
    logits = jnp.broadcast_to(logits, (batch_size, beams, logits.shape[-1]))
    state, _ = select(state, beam_log_probs(logits, state))
    state = state.replace(
        model_state=reorder_fn(model_state, jnp.zeros((batch_size, beams), jnp.int32)))

    def keep_going(state: BeamState) -> jax.Array:
        return (state.step < length - 1) & ~jnp.all(state.is_done)

    def body(state: BeamState) -> BeamState:
        tokens = lax.dynamic_index_in_dim(state.running_sequences, state.step, axis=2,
                                          keepdims=False)
        logits, model_state = step_fn(tokens, state.step, state.model_state)
        state, source_beams = select(state, beam_log_probs(logits, state))
        return state.replace(model_state=reorder_fn(model_state, source_beams))

    state = lax.while_loop(keep_going, body, state)
    returned = settings.num_return_sequences
    return (state.finished_sequences[:, :returned].reshape(batch_size * returned, length),
            state.finished_scores[:, :returned].reshape(batch_size * returned))


def search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
           settings: GenerationSettings,
           row_keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Runs the search ``settings`` asks for; see ``beam_search`` and ``sample_search``.

    Returns:
      sequences: int32 [B * R, T]; scores: float32 [B * R].
    """
    if settings.num_beams > 1:
        return beam_search(step_fn, reorder_fn, model_state, batch_size, settings)
    return sample_search(step_fn, reorder_fn, model_state, batch_size, settings, row_keys)
