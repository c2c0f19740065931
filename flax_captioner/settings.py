"""Generation settings: PyTorch ``generate``'s names and meanings, validated, hashable.

Plain Python and numpy, no JAX: the command line checks every flag value with these rules
before it imports JAX or loads a model (``GenerationSettings.check_overrides``), and the same
class, resolved against a checkpoint's defaults, keys the generator's compile cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Union

import numpy as np

EarlyStopping = Union[bool, str]
# Token ids that stand in for a checkpoint's when flag values are checked before loading it.
_ANY_TOKEN_IDS = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 0}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a search; hashable, so it keys the compile cache.

    Names and meanings are PyTorch ``generate``'s. ``max_length`` and ``min_length`` count
    the decoder prompt ``[decoder_start]``; ``max_new_tokens``/``min_new_tokens`` are folded
    into them by ``resolve``. Token lists are tuples: ``bad_words_ids`` and
    ``suppress_tokens``-like fields of token ids, ``sequence_bias`` of ``(token_ids, bias)``
    pairs. The warpers (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``,
    ``epsilon_cutoff``, ``eta_cutoff``) only act when ``do_sample`` is true; ``top_k``
    defaults to 50 as in PyTorch. ``do_sample`` with ``num_beams > 1`` is beam sampling.
    ``output_scores`` / ``output_logits`` add the per-step processed scores / raw logits to
    the output (they change the compiled program, so they are part of the key).
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
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    renormalize_logits: bool = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    output_scores: bool = False
    output_logits: bool = False

    @classmethod
    def resolve(cls, defaults: Any, **overrides: Any) -> "GenerationSettings":
        """Settings from ``defaults`` (any object with some of these attribute names, e.g. the
        checkpoint's generation defaults) with ``overrides`` applied, validated.

        ``overrides`` may also hold ``max_new_tokens`` and ``min_new_tokens`` (they take
        precedence over ``max_length``/``min_length``, as in PyTorch); ``None`` values are
        ignored. List-valued settings may be lists (``bad_words_ids=[[12], [7, 8]]``,
        ``sequence_bias={(7,): -2.0}`` or ``[[[7], -2.0]]``); they are stored as tuples.
        Settings transformers 4.57 no longer runs in-library (``UNSUPPORTED``) are refused
        unless they hold their no-op value.

        Raises:
          ValueError: one line naming the setting and the problem.
        """
        settings = cls(**cls._values(defaults, overrides))
        settings.validate()
        return settings

    @classmethod
    def check_overrides(cls, **overrides: Any) -> None:
        """Validates each of ``overrides`` on its own, by the rules ``resolve`` applies, without
        a checkpoint: what the command line checks before it loads one. Rules between settings
        (``num_return_sequences`` against ``num_beams``) and the checkpoint's limits
        (vocabulary, positions) are left to ``resolve`` and the generator.

        Raises:
          ValueError: one line naming the setting and the problem.
        """
        cls(**cls._values(_ANY_TOKEN_IDS, overrides))._check_fields()

    @classmethod
    def _values(cls, defaults: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        """The field values of ``defaults`` with ``overrides`` applied, in stored form."""
        names = {field.name for field in dataclasses.fields(cls)}
        if isinstance(defaults, dict):
            values = {name: defaults[name] for name in names if name in defaults}
        else:
            values = {name: getattr(defaults, name) for name in names if hasattr(defaults, name)}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        for name in sorted(set(overrides) & set(UNSUPPORTED)):
            description, is_noop = UNSUPPORTED[name]
            _require(is_noop(overrides.pop(name)),
                     f"{name} ({description}) is not supported: transformers 4.57 no longer "
                     f"runs it in-library")
        unknown = sorted(set(overrides) - names - {"max_new_tokens", "min_new_tokens"})
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(unknown)}")
        max_new_tokens = overrides.pop("max_new_tokens", None)
        min_new_tokens = overrides.pop("min_new_tokens", None)
        values.update(overrides)
        if max_new_tokens is not None:
            _require(_is_int(max_new_tokens) and max_new_tokens >= 1,
                     f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
            values["max_length"] = 1 + max_new_tokens
        if min_new_tokens is not None:
            _require(_is_int(min_new_tokens) and min_new_tokens >= 0,
                     f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
            values["min_length"] = 1 + min_new_tokens
        for token_name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            _require(token_name in values, f"{token_name} is not set (no default and no override)")
        if "bad_words_ids" in values:
            values["bad_words_ids"] = _as_token_lists("bad_words_ids", values["bad_words_ids"])
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            if name in values:
                values[name] = _as_token_list(name, values[name])
        if "sequence_bias" in values:
            values["sequence_bias"] = _as_sequence_bias(values["sequence_bias"])
        penalty = values.get("exponential_decay_length_penalty")
        if isinstance(penalty, (list, tuple)):
            values["exponential_decay_length_penalty"] = tuple(penalty)
        return values

    def validate(self) -> None:
        """Raises ValueError (one line) for settings PyTorch would reject or we cannot run."""
        self._check_fields()
        if self.num_beams > 1:
            _require(self.num_return_sequences <= self.num_beams,
                     f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                     f"({self.num_beams})")
        elif not self.do_sample:
            _require(self.num_return_sequences == 1,
                     f"greedy search returns one sequence per image; num_return_sequences="
                     f"{self.num_return_sequences} needs num_beams >= that or do_sample=True")

    def _check_fields(self) -> None:
        """Raises ValueError (one line) for the first field whose value is invalid on its own."""
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
        for name in ("do_sample", "remove_invalid_values", "renormalize_logits", "output_scores",
                     "output_logits"):
            _require(isinstance(getattr(self, name), (bool, np.bool_)),
                     f"{name} must be True or False, got {getattr(self, name)!r}")
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
        _require(self.min_p is None or (_is_number(self.min_p) and 0 <= self.min_p <= 1),
                 f"min_p must be in [0, 1], got {self.min_p!r}")
        _require(_is_number(self.typical_p) and 0 < self.typical_p <= 1,
                 f"typical_p must be in (0, 1] (1 disables it), got {self.typical_p!r}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1,
                     f"{name} must be in [0, 1) (0 disables it), got {value!r}")
        _require(isinstance(self.bad_words_ids, tuple) and all(
            _is_token_tuple(word) and word for word in self.bad_words_ids),
            f"bad_words_ids must be non-empty lists of non-negative token ids, "
            f"got {self.bad_words_ids!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            _require(_is_token_tuple(value),
                     f"{name} must be a list of non-negative token ids, got {value!r}")
        _require(isinstance(self.sequence_bias, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and _is_token_tuple(pair[0]) and pair[0]
            and _is_number(pair[1]) and math.isfinite(pair[1]) for pair in self.sequence_bias),
            f"sequence_bias must map non-empty token-id lists to finite biases, "
            f"got {self.sequence_bias!r}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 0),
                     f"{name} must be a non-negative integer, got {value!r}")
        penalty = self.exponential_decay_length_penalty
        _require(penalty is None or (
            isinstance(penalty, tuple) and len(penalty) == 2 and _is_int(penalty[0])
            and penalty[0] >= 0 and _is_number(penalty[1]) and math.isfinite(penalty[1])
            and penalty[1] > 0),
            f"exponential_decay_length_penalty must be (start_index >= 0, decay_factor > 0), "
            f"got {penalty!r}")


# Settings of transformers 4.57's GenerationConfig that it no longer runs in-library (moved to
# hub-hosted ``custom_generate`` code, or inapplicable to an image encoder):
# name -> (what it is, its no-op test).
UNSUPPORTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "num_beam_groups": ("group/diverse beam search", lambda value: value == 1),
    "diversity_penalty": ("group/diverse beam search", lambda value: value == 0),
    "constraints": ("constrained beam search", lambda value: not value),
    "force_words_ids": ("constrained beam search", lambda value: not value),
    "penalty_alpha": ("contrastive search", lambda value: value == 0),
    "dola_layers": ("DoLa decoding", lambda value: False),
    "assistant_model": ("assisted generation", lambda value: False),
    "prompt_lookup_num_tokens": ("prompt-lookup decoding", lambda value: False),
    "assistant_early_exit": ("self-speculative decoding", lambda value: False),
    "guidance_scale": ("classifier-free guidance", lambda value: value == 1),
    "encoder_repetition_penalty": ("needs encoder token ids; an image encoder has none",
                                   lambda value: value == 1),
    "encoder_no_repeat_ngram_size": ("needs encoder token ids; an image encoder has none",
                                     lambda value: value == 0),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _is_token_tuple(tokens: Any) -> bool:
    return isinstance(tokens, tuple) and all(_is_int(t) and t >= 0 for t in tokens)


def _as_token_list(name: str, tokens: Any) -> tuple[int, ...]:
    """A flat list of token ids -> tuple; anything else -> one-line ValueError."""
    _require(isinstance(tokens, (list, tuple, np.ndarray))
             and all(_is_int(t) and t >= 0 for t in tokens),
             f"{name} must be a list of non-negative token ids, got {tokens!r}")
    return tuple(int(t) for t in tokens)


def _as_token_lists(name: str, words: Any) -> tuple[tuple[int, ...], ...]:
    """A list of non-empty token-id lists -> tuple of tuples (``[12]`` or ``"12"`` refused)."""
    _require(isinstance(words, (list, tuple)) and (words or isinstance(words, tuple)),
             f"{name} must be a non-empty list of token-id lists such as [[12], [7, 8]], "
             f"got {words!r}")
    for word in words:
        _require(isinstance(word, (list, tuple)) and len(word) > 0,
                 f"{name} must be a list of non-empty token-id lists such as [[12], [7, 8]], "
                 f"got {words!r}")
        _require(all(_is_int(t) and t >= 0 for t in word),
                 f"{name} must be lists of non-negative integer token ids, got {words!r}")
    return tuple(tuple(int(t) for t in word) for word in words)


def _as_sequence_bias(bias: Any) -> tuple[tuple[tuple[int, ...], float], ...]:
    """PyTorch's ``{(ids...): bias}`` or ``[[[ids...], bias], ...]`` -> tuple of pairs.

    Later entries for the same ids replace earlier ones (PyTorch builds a dict).
    """
    message = (f"sequence_bias must map non-empty token-id lists to finite biases, e.g. "
               f"{{(7,): -2.0}} or [[[7], -2.0]], got {bias!r}")
    if isinstance(bias, dict):
        pairs = list(bias.items())
    else:
        _require(isinstance(bias, (list, tuple)) and (bias or isinstance(bias, tuple)), message)
        _require(all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in bias), message)
        pairs = [tuple(pair) for pair in bias]
    merged: dict[tuple[int, ...], float] = {}
    for ids, value in pairs:
        _require(isinstance(ids, (list, tuple)) and len(ids) > 0
                 and all(_is_int(t) and t >= 0 for t in ids)
                 and _is_number(value) and math.isfinite(value), message)
        merged[tuple(int(t) for t in ids)] = float(value)
    return tuple(merged.items())

