"""Interop with transformers' ``FlaxVisionEncoderDecoderModel``, the Flax lineage the
checkpoint was trained in; transformers < 5 only (5.0 removed its Flax classes).

The package itself runs on the parameter tree (``modules.py`` declares it, identical to this
class's ``params``), so this is the one module that imports a transformers Flax class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from flax_captioner.captioner import Captioner
from flax_captioner.errors import ModelLoadError
from flax_captioner.loading import GenerationDefaults, LoadedCheckpoint, generation_defaults
from flax_captioner.options import CaptionOptions
from flax_captioner.preprocess import PreprocessConfig


def available() -> bool:
    """Whether the installed transformers provides ``FlaxVisionEncoderDecoderModel``."""
    try:
        _model_class()
    except ModelLoadError:
        return False
    return True


def _model_class() -> Any:
    try:
        with _quiet_flax_deprecation():
            from transformers import FlaxVisionEncoderDecoderModel
    except ImportError:
        import transformers

        raise ModelLoadError(
            f"FlaxVisionEncoderDecoderModel: transformers {transformers.__version__} has no "
            "Flax classes (removed in 5.0); install transformers<5 for this interop, or use "
            "Captioner and flax_captioner.modules, which need none") from None
    return FlaxVisionEncoderDecoderModel


@contextlib.contextmanager
def _quiet_flax_deprecation() -> Iterator[None]:
    """Drops transformers' "TensorFlow and JAX classes are deprecated" notice inside the block.

    Only that record of that logger, only inside the block; the rest of the program keeps
    transformers' logging as it was (the notice is logged once per process).
    """
    logger = logging.getLogger("transformers.modeling_flax_utils")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("TensorFlow and JAX classes are deprecated")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def to_flax_model(params: Any, config: Any, *, dtype: Any = jnp.float32) -> Any:
    """A ``FlaxVisionEncoderDecoderModel`` of ``config`` holding ``params`` (not copied).

    transformers builds this class only with ``_do_init=True``: its constructor initialises
    every weight at random, op by op (about 192 small XLA compiles) before they are replaced
    (docs/results/history.md, "Start-up and compilation"). Here ``init_weights`` is traced with
    ``jax.eval_shape`` for this one instance (what the base class does for
    ``_do_init=False``), so nothing is computed before ``params`` are assigned.

    Raises:
      ModelLoadError: transformers >= 5 is installed.
    """
    model_class = _model_class()
    with _quiet_flax_deprecation():
        model = model_class.__new__(model_class)
        init_weights = model.init_weights
        model.init_weights = lambda rng, input_shape, params=None: jax.eval_shape(
            functools.partial(init_weights, input_shape=input_shape), rng)
        model_class.__init__(model, config, dtype=dtype)
        del model.init_weights  # the class's own method again
    model.params = params
    return model


def captioner_from_flax_model(model: Any, tokenizer: Any, preprocess_config: PreprocessConfig,
                              *, params: Any = None, dtype: str | Any = CaptionOptions.dtype,
                              parallelism: str = CaptionOptions.parallelism) -> Captioner:
    """A ``Captioner`` of a ``FlaxVisionEncoderDecoderModel``'s config and weights (or
    ``params`` of that config, trained ones say), with ``tokenizer`` and
    ``preprocess_config`` (the model holds neither)."""
    defaults: GenerationDefaults = generation_defaults(model.config)
    params = model.params if params is None else params
    checkpoint = LoadedCheckpoint(params=params, config=model.config, tokenizer=tokenizer,
                                  preprocess_config=preprocess_config,
                                  generation_defaults=defaults, directory=None)
    return Captioner(checkpoint, dtype=dtype, parallelism=parallelism)


def flax_model_of(captioner: Captioner) -> Any:
    """The ``FlaxVisionEncoderDecoderModel`` of a ``Captioner``'s float32 weights."""
    return to_flax_model(captioner.params, captioner.config)
