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
batch. The loop either exits as soon as every image is done or runs a fixed number of steps
(``run_steps``); both return the same arrays.

The arithmetic mirrors transformers 4.57 (``GenerationMixin._beam_search`` and helpers,
``_sample``; its ``LogitsProcessor``s are ``processors.py``) operation by operation, in
float32, including its ``-1e9`` masking constant and its float32 divisions by
Python-computed length penalties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_captioner import processors
from flax_captioner.settings import GenerationSettings

# PyTorch's beam masking constant. In float32 its spacing is 64, so ``-1e9 + x`` rounds back
# to ``-1e9`` for small x: masked entries tie exactly, as they do in PyTorch.
MASK_SCORE = -1.0e9

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


# ----------------------------------------------------------------------------------------
# Greedy search and sampling.
# ----------------------------------------------------------------------------------------


class SearchOutput(NamedTuple):
    """What a search returns; N = B x R rows (R = ``num_return_sequences``), image-major.

    A named tuple (a pytree, so jit/pmap return it; ``[0]`` is the sequences).

    Attributes:
      sequences: int32 [N, T], ``decoder_start`` then the generated tokens, padded.
      scores: float32 [N]: beam search, PyTorch's ``sequences_scores``; greedy and sampling,
        the summed log-probabilities of the generated tokens (``SamplingState.scores``).
      token_scores: float32 [N, T], the log-probability of each token of ``sequences`` under
        the distribution it was picked from (log-softmax of the processed, and when sampling
        warped, scores; in beam search the processed log-prob PyTorch's
        ``compute_transition_scores`` gives along ``beam_indices``); 0 at the prompt and
        after the end.
      beam_indices: int32 [N, T - 1] (beam search) or ``None``: the beam (0..K-1 within the
        image) each generated token extended; -1 past the end. PyTorch's are ``b * K + k``.
      step_scores: float32 [B * S, T - 1, V] or ``None`` (``output_scores``): PyTorch's
        ``scores``, the processed scores of step ``t`` for each of the S search rows of an
        image (S = K running beams in beam search, R rows when sampling, 1 greedy); NaN for
        steps the loop did not run.
      step_logits: float32 [B * S, T - 1, V] or ``None`` (``output_logits``): the raw logits,
        PyTorch's ``logits``; NaN for steps not run.
    """

    sequences: jax.Array
    scores: jax.Array
    token_scores: jax.Array
    beam_indices: jax.Array | None = None
    step_scores: jax.Array | None = None
    step_logits: jax.Array | None = None


def _step_buffer(enabled: bool, rows: tuple[int, int], length: int,
                 vocab_size: int) -> jax.Array | None:
    """NaN-filled float32 [B, S, T - 1, V] per-step record, or None when not asked for."""
    if not enabled:
        return None
    return jnp.full(rows + (length - 1, vocab_size), jnp.nan, jnp.float32)


def _record(buffer: jax.Array | None, step: jax.Array, values: jax.Array) -> jax.Array | None:
    """Writes values [B, S, V] at step ``step`` of a [B, S, T - 1, V] buffer."""
    if buffer is None:
        return None
    return lax.dynamic_update_slice_in_dim(buffer, values[:, :, None], step, axis=2)


def run_steps(keep_going: Callable[[Any], jax.Array], body: Callable[[Any], Any], state: Any,
              steps: int, loop: str) -> Any:
    """Applies ``body`` to ``state`` while ``keep_going(state)``, at most ``steps`` times.

    ``loop`` (``backend.Kernels.search_loop``, which picks one per platform):

    - ``"until_done"``: a while loop that exits as soon as ``keep_going`` is false. Its trip
      count is data-dependent, so XLA:GPU decides every iteration on the host (its while
      thunk copies the predicate back and waits for it), and over a mesh the predicate is an
      all-reduce per step.
    - ``"fixed_steps"``: exactly ``steps`` iterations, a trip count XLA knows at compile time
      (``known_trip_count``), so XLA:GPU launches the iterations back to back without reading
      anything back. The iterations after ``keep_going`` turns false change nothing the
      search returns: a done image's results are frozen, and the per-step records
      (``step_scores``, ``step_logits``) are only written while ``keep_going``.

    ``state`` has ``step_scores`` and ``step_logits`` fields (None when not recorded).
    """
    if loop == "until_done":
        return lax.while_loop(keep_going, body, state)

    def fixed_body(_: jax.Array, state: Any) -> Any:
        advanced = body(state)
        if state.step_scores is None and state.step_logits is None:
            return advanced
        running = keep_going(state)

        def unless_stopped(old: jax.Array | None, new: jax.Array | None) -> jax.Array | None:
            return None if old is None else jnp.where(running, new, old)

        return advanced.replace(
            step_scores=unless_stopped(state.step_scores, advanced.step_scores),
            step_logits=unless_stopped(state.step_logits, advanced.step_logits))

    return lax.fori_loop(0, steps, fixed_body, state)


def _flat_rows(array: jax.Array | None) -> jax.Array | None:
    """[B, S, ...] -> [B * S, ...]."""
    return None if array is None else array.reshape((-1,) + array.shape[2:])


@flax.struct.dataclass
class SamplingState:
    """Loop state of greedy search and sampling (B images, R rows per image, T = max_length).

    Attributes:
      step: int32 [], tokens generated so far; the next one goes to position ``step + 1``.
      sequences: int32 [B, R, T], ``decoder_start`` then the generated tokens, pad after.
      scores: float32 [B, R], summed log-probabilities of the generated tokens (EOS
        included) under the distribution they were picked from: log-softmax of the processed
        (and, when sampling, warped) logits.
      token_scores: float32 [B, R, T], the summands of ``scores`` at their positions.
      is_finished: bool [B, R], the row has emitted EOS (it emits pad from then on).
      step_scores, step_logits: float32 [B, R, T - 1, V] or None (``SearchOutput``).
      model_state: the decoder's state for R rows per image (cache, cross K/V ...).
    """

    step: jax.Array
    sequences: jax.Array
    scores: jax.Array
    token_scores: jax.Array
    is_finished: jax.Array
    step_scores: jax.Array | None
    step_logits: jax.Array | None
    model_state: Any


def _step_keys(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    """uint32 [B, 2]: image b's key for step ``step``, ``fold_in(row_keys[b], step)``."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def sample_search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
                  settings: GenerationSettings, row_keys: jax.Array | None = None,
                  loop: str = "until_done") -> SearchOutput:
    """Greedy search (``do_sample`` false) or ancestral sampling, PyTorch ``_sample`` semantics.

    Args:
      step_fn, reorder_fn: the decoder step and beam gather (module docstring).
      model_state: the decoder state for B rows (one per image).
      batch_size: B.
      settings: static settings with ``num_beams == 1``.
      row_keys: uint32 [B, 2], one PRNG key per image (sampling only). Step ``t`` of image
        ``b`` draws its R tokens with ``fold_in(row_keys[b], t)``, so samples do not depend on
        the batch the image is in.
      loop: how the step loop ends (``run_steps``).

    Returns:
      ``SearchOutput`` (no ``beam_indices``).
    """
    rows = settings.num_return_sequences if settings.do_sample else 1
    length = settings.max_length
    if settings.do_sample and row_keys is None:
        raise ValueError("sampling needs row_keys, one PRNG key per image")

    def advance(state: SamplingState, logits: jax.Array) -> SamplingState:
        """One step from raw logits [B, R, V]."""
        step = state.step
        scores = processors.process_scores(logits, state.sequences, step + 1, settings)
        if settings.do_sample:
            tokens = jax.vmap(jax.random.categorical)(_step_keys(row_keys, step), scores)
        else:
            tokens = jnp.argmax(scores, axis=-1)
        log_probs = jax.nn.log_softmax(scores, axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
        token_log_probs = jnp.where(state.is_finished, 0.0, token_log_probs)
        tokens = jnp.where(state.is_finished, settings.pad_token_id, tokens).astype(jnp.int32)
        at_next = jnp.arange(length) == step + 1
        return state.replace(
            step=step + 1,
            sequences=jnp.where(at_next, tokens[..., None], state.sequences),
            scores=state.scores + token_log_probs,
            token_scores=jnp.where(at_next, token_log_probs[..., None], state.token_scores),
            is_finished=state.is_finished | (tokens == settings.eos_token_id),
            step_scores=_record(state.step_scores, step, scores),
            step_logits=_record(state.step_logits, step, logits))

    sequences = jnp.full((batch_size, rows, length), settings.pad_token_id, jnp.int32)
    sequences = sequences.at[:, :, 0].set(settings.decoder_start_token_id)

    # Step 0 on one row per image: the R rows share the prompt, hence the logits.
    start = jnp.full((batch_size, 1), settings.decoder_start_token_id, jnp.int32)
    logits, model_state = step_fn(start, jnp.int32(0), model_state)
    vocab_size = logits.shape[-1]
    state = SamplingState(
        step=jnp.int32(0), sequences=sequences,
        scores=jnp.zeros((batch_size, rows), jnp.float32),
        token_scores=jnp.zeros((batch_size, rows, length), jnp.float32),
        is_finished=jnp.zeros((batch_size, rows), bool),
        step_scores=_step_buffer(settings.output_scores, (batch_size, rows), length, vocab_size),
        step_logits=_step_buffer(settings.output_logits, (batch_size, rows), length, vocab_size),
        model_state=None)
    state = advance(state, jnp.broadcast_to(logits, (batch_size, rows, vocab_size)))
    if rows > 1:
        model_state = reorder_fn(model_state, jnp.zeros((batch_size, rows), jnp.int32))
    state = state.replace(model_state=model_state)

    def keep_going(state: SamplingState) -> jax.Array:
        return (state.step < length - 1) & ~jnp.all(state.is_finished)

    def body(state: SamplingState) -> SamplingState:
        tokens = lax.dynamic_index_in_dim(state.sequences, state.step, axis=2, keepdims=False)
        logits, model_state = step_fn(tokens, state.step, state.model_state)
        return advance(state, logits).replace(model_state=model_state)

    # Steps 1 .. T - 2 (step 0 ran above; the last one fills position T - 1).
    state = run_steps(keep_going, body, state, max(length - 2, 0), loop)
    return SearchOutput(sequences=_flat_rows(state.sequences), scores=_flat_rows(state.scores),
                        token_scores=_flat_rows(state.token_scores),
                        step_scores=_flat_rows(state.step_scores),
                        step_logits=_flat_rows(state.step_logits))


# ----------------------------------------------------------------------------------------
# Beam search and beam sampling.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
    """Loop state of beam search (B images, K beams, T = max_length).

    Attributes:
      step: int32 [], tokens generated so far; the next one goes to position ``step + 1``.
      running_sequences: int32 [B, K, T], the live beams (filled with the output pad).
      running_scores: float32 [B, K], their summed processed log-probs (dead beams ~ -1e9).
      running_token_scores: float32 [B, K, T], each token's processed log-prob.
      running_beam_indices: int32 [B, K, T - 1], the beam each token extended (-1: none yet).
      finished_sequences: int32 [B, K, T], the finished pool, best first.
      finished_scores: float32 [B, K], length-normalised scores of the pool (-1e9: empty slot).
      finished_token_scores, finished_beam_indices: the pool's per-token records.
      is_finished: bool [B, K], the pool slot holds a finished hypothesis.
      may_improve: bool [B], PyTorch's sticky ``is_early_stop_heuristic_unsatisfied``.
      is_done: bool [B], sticky: the image's pool is final (what a batch of one would stop on).
      step_scores, step_logits: float32 [B, K, T - 1, V] or None (``SearchOutput``).
      model_state: the decoder's state for K beams per image.
    """

    step: jax.Array
    running_sequences: jax.Array
    running_scores: jax.Array
    running_token_scores: jax.Array
    running_beam_indices: jax.Array
    finished_sequences: jax.Array
    finished_scores: jax.Array
    finished_token_scores: jax.Array
    finished_beam_indices: jax.Array
    is_finished: jax.Array
    may_improve: jax.Array
    is_done: jax.Array
    step_scores: jax.Array | None
    step_logits: jax.Array | None
    model_state: Any


def _length_divisors(exponent: float, lengths: np.ndarray) -> np.ndarray:
    """``float32(length ** exponent)`` computed in double, as Python does for PyTorch."""
    return np.array([float(length) ** exponent for length in lengths], np.float32)


def beam_search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
                settings: GenerationSettings, row_keys: jax.Array | None = None,
                loop: str = "until_done") -> SearchOutput:
    """Beam search (or beam sampling) with transformers 4.57's vectorized semantics, one
    sticky state per image.

    Per step: log-softmax, processors (and warpers when sampling), add the beam's running
    score; keep the top 2K of the K*V candidates (beam sampling: draw 2K without
    replacement from their softmax, in draw order); a candidate hits a stopping criterion
    when its token is EOS or the sequence reaches ``max_length``; the next running beams
    are the top K after masking those with -1e9; candidates ranked in the first K that hit
    a criterion enter the finished pool with ``score / generated_length ** length_penalty``
    unless the image's pool is full with ``early_stopping=True`` or its early-stop
    heuristic has closed it.

    Args:
      step_fn, reorder_fn: the decoder step and beam gather (module docstring).
      model_state: the decoder state for one row per image.
      batch_size: B.
      settings: static settings with ``num_beams > 1``.
      row_keys: uint32 [B, 2] (beam sampling only): step ``t`` of image ``b`` draws with
        ``fold_in(row_keys[b], t)``.
      loop: how the step loop ends (``run_steps``).

    Returns:
      ``SearchOutput``: the R best finished hypotheses per image, padded with
      ``pad_token_id`` (PyTorch falls back to EOS when pad is 0; so does this), their
      ``sequences_scores``, per-token log-probs and beam indices.
    """
    beams = settings.num_beams
    candidates = 2 * beams  # max(2, 1 + number of EOS ids) * num_beams, one EOS id
    length = settings.max_length
    if settings.do_sample and row_keys is None:
        raise ValueError("beam sampling needs row_keys, one PRNG key per image")
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

    def top_candidates(accumulated: jax.Array, step: jax.Array) -> jax.Array:
        """[B, K*V] accumulated log-probs -> the 2K candidate indices [B, 2K]."""
        if not settings.do_sample:
            return lax.top_k(accumulated, candidates)[1]
        # Gumbel-top-k: the top 2K of log-probs + Gumbel noise are 2K draws without
        # replacement from their softmax, in draw order (torch.multinomial's distribution).
        noise = jax.vmap(lambda key: jax.random.gumbel(key, accumulated.shape[1:]))(
            _step_keys(row_keys, step))
        return lax.top_k(accumulated + noise, candidates)[1]

    def select(state: BeamState, logits: jax.Array) -> tuple[BeamState, jax.Array]:
        """One beam update from raw logits [B, K, V]; returns the new state and the source
        beam of each new running beam, [B, K]."""
        vocab = logits.shape[-1]
        step = state.step
        log_probs = processors.process_scores(jax.nn.log_softmax(logits, axis=-1),
                                              state.running_sequences, step + 1, settings)
        accumulated = (log_probs + state.running_scores[:, :, None]).reshape(batch_size, -1)
        topk_indices = top_candidates(accumulated, step)
        topk_scores = jnp.take_along_axis(accumulated, topk_indices, axis=1)
        topk_beams = (topk_indices // vocab).astype(jnp.int32)
        topk_tokens = (topk_indices % vocab).astype(jnp.int32)
        topk_token_log_probs = jnp.take_along_axis(log_probs.reshape(batch_size, -1),
                                                   topk_indices, axis=1)
        at_next = jnp.arange(length) == step + 1
        topk_sequences = jnp.where(at_next, topk_tokens[..., None],
                                   gather(state.running_sequences, topk_beams))
        topk_token_scores = jnp.where(at_next, topk_token_log_probs[..., None],
                                      gather(state.running_token_scores, topk_beams))
        topk_beam_indices = jnp.where(jnp.arange(length - 1) == step, topk_beams[..., None],
                                      gather(state.running_beam_indices, topk_beams))
        hits_criterion = (topk_tokens == settings.eos_token_id) | (step + 2 >= length)

        # Next running beams: the best K that did not stop.
        running_candidates = topk_scores + hits_criterion.astype(jnp.float32) * MASK_SCORE
        next_indices = lax.top_k(running_candidates, beams)[1]
        running_scores = gather(running_candidates, next_indices)
        source_beams = gather(topk_beams, next_indices)

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

        def merge(pool: jax.Array, new: jax.Array) -> jax.Array:
            return gather(jnp.concatenate([pool, new], axis=1), keep)

        finished_scores = gather(merged_scores, keep)
        is_finished = merge(state.is_finished, just_finished)

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

        def unless_frozen(old: jax.Array, new: jax.Array) -> jax.Array:
            return jnp.where(frozen.reshape((-1,) + (1,) * (old.ndim - 1)), old, new)

        new_state = state.replace(
            step=step + 1,
            running_sequences=gather(topk_sequences, next_indices),
            running_scores=running_scores,
            running_token_scores=gather(topk_token_scores, next_indices),
            running_beam_indices=gather(topk_beam_indices, next_indices),
            finished_sequences=unless_frozen(state.finished_sequences,
                                             merge(state.finished_sequences, topk_sequences)),
            finished_scores=unless_frozen(state.finished_scores, finished_scores),
            finished_token_scores=unless_frozen(
                state.finished_token_scores,
                merge(state.finished_token_scores, topk_token_scores)),
            finished_beam_indices=unless_frozen(
                state.finished_beam_indices,
                merge(state.finished_beam_indices, topk_beam_indices)),
            is_finished=unless_frozen(state.is_finished, is_finished),
            may_improve=unless_frozen(state.may_improve, may_improve),
            is_done=frozen | stops,
            step_scores=_record(state.step_scores, step, log_probs),
            step_logits=_record(state.step_logits, step, logits),
        )
        return new_state, source_beams

    sequences = jnp.full((batch_size, beams, length), fill, jnp.int32)
    sequences = sequences.at[:, :, 0].set(settings.decoder_start_token_id)
    token_scores = jnp.zeros((batch_size, beams, length), jnp.float32)
    beam_indices = jnp.full((batch_size, beams, length - 1), -1, jnp.int32)
    running_scores = jnp.where(jnp.arange(beams) == 0, 0.0, MASK_SCORE).astype(jnp.float32)

    # Step 0 on one row per image: all K beams hold the prompt, so their logits are equal;
    # beams 1..K-1 take part with their -1e9 scores exactly as in PyTorch.
    start = jnp.full((batch_size, 1), settings.decoder_start_token_id, jnp.int32)
    logits, model_state = step_fn(start, jnp.int32(0), model_state)
    vocab_size = logits.shape[-1]
    state = BeamState(
        step=jnp.int32(0),
        running_sequences=sequences,
        running_scores=jnp.broadcast_to(running_scores, (batch_size, beams)),
        running_token_scores=token_scores,
        running_beam_indices=beam_indices,
        finished_sequences=sequences,
        finished_scores=jnp.full((batch_size, beams), MASK_SCORE, jnp.float32),
        finished_token_scores=token_scores,
        finished_beam_indices=beam_indices,
        is_finished=jnp.zeros((batch_size, beams), bool),
        may_improve=jnp.ones((batch_size,), bool),
        is_done=jnp.zeros((batch_size,), bool),
        step_scores=_step_buffer(settings.output_scores, (batch_size, beams), length, vocab_size),
        step_logits=_step_buffer(settings.output_logits, (batch_size, beams), length, vocab_size),
        model_state=None,
    )
    state, _ = select(state, jnp.broadcast_to(logits, (batch_size, beams, vocab_size)))
    state = state.replace(
        model_state=reorder_fn(model_state, jnp.zeros((batch_size, beams), jnp.int32)))

    def keep_going(state: BeamState) -> jax.Array:
        return (state.step < length - 1) & ~jnp.all(state.is_done)

    def body(state: BeamState) -> BeamState:
        tokens = lax.dynamic_index_in_dim(state.running_sequences, state.step, axis=2,
                                          keepdims=False)
        logits, model_state = step_fn(tokens, state.step, state.model_state)
        state, source_beams = select(state, logits)
        return state.replace(model_state=reorder_fn(model_state, source_beams))

    state = run_steps(keep_going, body, state, max(length - 2, 0), loop)
    returned = settings.num_return_sequences
    return SearchOutput(
        sequences=_flat_rows(state.finished_sequences[:, :returned]),
        scores=_flat_rows(state.finished_scores[:, :returned]),
        token_scores=_flat_rows(state.finished_token_scores[:, :returned]),
        beam_indices=_flat_rows(state.finished_beam_indices[:, :returned]),
        step_scores=_flat_rows(state.step_scores),
        step_logits=_flat_rows(state.step_logits))


def search(step_fn: StepFn, reorder_fn: ReorderFn, model_state: Any, batch_size: int,
           settings: GenerationSettings, row_keys: jax.Array | None = None,
           loop: str = "until_done") -> SearchOutput:
    """Runs the search ``settings`` asks for; see ``beam_search`` and ``sample_search``.

    ``row_keys`` (uint32 [B, 2]) are only used when ``settings.do_sample``; ``loop`` is
    ``run_steps``'s.
    """
    row_keys = row_keys if settings.do_sample else None
    if settings.num_beams > 1:
        return beam_search(step_fn, reorder_fn, model_state, batch_size, settings, row_keys,
                           loop)
    return sample_search(step_fn, reorder_fn, model_state, batch_size, settings, row_keys, loop)
