"""The compiled generator: pixels -> encoder -> cross K/V (once per image) -> search -> tokens.

With ``resize.Canvases`` as input the program starts one stage earlier: uint8 canvases ->
PIL's resize and the normalisation (``resize.pixel_values``) -> pixels -> ...

``build_generate_fn`` returns one pure function, so the whole caption search compiles to one
XLA program that ``jax.jit``, a mesh-sharded ``jit`` or ``pmap`` can wrap (batch axis 0 in
and out). ``Generator`` is the one stateful piece: parameters on device and a cache of
compiled programs keyed by (batch bucket, settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_captioner import backend, model, preprocess, resize, search, sharding
from flax_captioner.errors import OptionError

if TYPE_CHECKING:
    from flax_captioner.settings import GenerationSettings

__all__ = ["Dispatched", "GenerationOutput", "Generator", "build_generate_fn", "bucket_size",
           "enable_compilation_cache", "image_keys"]

GenerateFn = Callable[[Any, jax.Array, jax.Array], search.SearchOutput]


@dataclasses.dataclass
class GenerationOutput:
    """What ``Generator.generate`` returns; N = images x num_return_sequences, image-major.

    T = ``max_length``, V = vocabulary, K = ``num_beams``; S = search rows per image (K in
    beam search, R = ``num_return_sequences`` when sampling, 1 greedy).

    Attributes:
      sequences: np.int32 [N, T], ``decoder_start`` first, padded with pad.
      scores: np.float32 [N]: beam search, PyTorch's ``sequences_scores`` (summed processed
        log-probs / generated_length ** length_penalty); greedy and sampling, the summed
        log-probabilities of the generated tokens, EOS included (see ``search.SamplingState``).
        In beam search an image's rows are ranked by it (best first), every beam with
        ``num_return_sequences == num_beams``.
      token_scores: np.float32 [N, T] or None: each token's log-probability under the
        distribution it was picked from (greedy/sampling: log-softmax of the processed and
        warped scores, summing to ``scores``; beam search: the processed log-prob, PyTorch's
        ``compute_transition_scores(sequences, scores, beam_indices)``); 0 at position 0 and
        after the caption ends.
      beam_indices: np.int32 [N, T - 1] or None (beam search only): the beam (0..K-1 of the
        same image) each generated token extended, -1 past the end (PyTorch's are
        ``image * K + beam``, over its batch).
      step_scores: np.float32 [B * S, T - 1, V] or None (``settings.output_scores``): the
        processed scores of every step, PyTorch's ``output.scores`` stacked on axis 1;
        NaN for steps the loop did not run.
      step_logits: np.float32 [B * S, T - 1, V] or None (``settings.output_logits``): the raw
        logits, PyTorch's ``output.logits``; NaN for steps not run.
    """

    sequences: np.ndarray
    scores: np.ndarray
    token_scores: np.ndarray | None = None
    beam_indices: np.ndarray | None = None
    step_scores: np.ndarray | None = None
    step_logits: np.ndarray | None = None

    @classmethod
    def from_search(cls, output: search.SearchOutput, images: int,
                    settings: GenerationSettings) -> "GenerationOutput":
        """Host copies of a program's ``search.SearchOutput`` for its first ``images`` images
        (the rest of the bucket is padding)."""
        rows = images * settings.num_return_sequences
        search_rows = images * (settings.num_beams if settings.num_beams > 1 else
                                settings.num_return_sequences if settings.do_sample else 1)

        def host(array: Any, count: int) -> np.ndarray | None:
            return None if array is None else np.asarray(array)[:count]

        return cls(sequences=host(output.sequences, rows), scores=host(output.scores, rows),
                   token_scores=host(output.token_scores, rows),
                   beam_indices=host(output.beam_indices, rows),
                   step_scores=host(output.step_scores, search_rows),
                   step_logits=host(output.step_logits, search_rows))


def build_generate_fn(spec: model.ModelSpec, settings: GenerationSettings,
                      dtype: Any = jnp.float32,
                      kernels: backend.Kernels = backend.Kernels()) -> GenerateFn:
    """The whole search as one pure function of (params, pixels, keys).

    Returns ``fn(params, pixel_values [B, 3, H, W] float32, row_keys [B, 2] uint32) ->
    search.SearchOutput`` (a named tuple: sequences int32 [B * R, T], scores float32 [B * R],
    then the per-token and, when asked for, per-step arrays); ``row_keys`` only matter when
    sampling. Cross-attention keys/values are computed once per image and shared by its
    beams; step one runs on B rows, the search expands the cache to K beams after it.
    ``kernels`` gives the attention forms and the step loop (``backend.Kernels``; its
    ``compiler_options`` are for whoever compiles the function).
    """

    def generate_fn(params: Any, pixel_values: jax.Array,
                    row_keys: jax.Array) -> search.SearchOutput:
        batch = pixel_values.shape[0]
        encoder_hidden = model.encode(params, pixel_values, spec, dtype,
                                      kernels.encoder_attention)  # [B, S, D]
        cross = model.cross_kv(params, encoder_hidden, spec, dtype, kernels.cross_context)
        cache = model.init_cache(batch, 1, settings.max_length, spec, dtype)

        def step_fn(tokens, position, cache):
            return model.decode_step(params, tokens, position, cache, cross, spec, dtype,
                                     kernels.cross_context, kernels.self_attention)

        return search.search(step_fn, model.reorder_cache, cache, batch, settings, row_keys,
                             kernels.search_loop)

    return generate_fn


def _resizing_first(generate_fn: GenerateFn,
                    config: preprocess.PreprocessConfig) -> Callable[..., search.SearchOutput]:
    """``generate_fn`` of canvases: ``fn(params, canvases, *coefficients, row_keys)`` runs
    ``resize.pixel_values`` (``config``'s resize and lookup table) then ``generate_fn``."""
    lut = preprocess.pixel_lut(config)

    def generate_from_canvases(params: Any, canvases: jax.Array,
                               *coefficients_and_keys: jax.Array) -> search.SearchOutput:
        *coefficients, row_keys = coefficients_and_keys
        pixel_values = resize.pixel_values(canvases, resize.Coefficients(*coefficients),
                                           jnp.asarray(lut))  # float32[B, 3, H, W]
        return generate_fn(params, pixel_values, row_keys)

    return generate_from_canvases


def bucket_size(batch: int, num_shards: int = 1) -> int:
    """The padded batch a program is compiled for: the next power of two, then rounded up to
    a multiple of ``num_shards`` (so a few programs serve every batch size)."""
    bucket = 1 << max(batch - 1, 0).bit_length()
    return -(-bucket // num_shards) * num_shards


def image_keys(rng: jax.Array | None, first_index: int, count: int) -> np.ndarray:
    """uint32 [count, 2]: image ``first_index + i`` gets ``fold_in(rng, first_index + i)``,
    so its samples do not depend on how images are batched (``rng`` None: ``PRNGKey(0)``).

    Made on the host's CPU backend (where JAX has one), the key too: on an accelerator any op
    of theirs would queue behind the search in flight, and reading its result back would
    wait for that search.
    """
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        host = jax.local_devices()[0]
    with jax.default_device(host):
        rng = jax.random.PRNGKey(0) if rng is None else jax.device_put(rng, host)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        indices = np.arange(first_index, first_index + count, dtype=np.uint32)
        return np.asarray(_fold_in_each(rng, indices))


# Compiled once per batch size: run op by op, the vmap was traced again for every batch, on the
# thread that feeds the devices.
_fold_in_each = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Switches on JAX's persistent compilation cache in ``path`` (every program is cached,
    so a restarted process skips recompiling the search)."""
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class Generator:
    """Parameters on device plus compiled searches, one per (batch bucket, settings).

    Args:
      model_or_params: a ``FlaxVisionEncoderDecoderModel`` or its ``params`` tree.
      config: the ``VisionEncoderDecoderConfig``.
      dtype: matmul compute dtype: ``jnp.float32`` (parity) or ``jnp.bfloat16`` (fast).
      data_parallel: a ``sharding.DataParallel`` placement; ``None`` places everything on
        the first local device (``sharding.SingleDevice``).
      kernels: the attention forms, step loop and XLA options the searches compile with
        (``backend.Kernels``); ``None`` takes the devices' platform's for ``dtype``
        (``backend.kernels``), without XLA options for the pmap placement, which takes none.

    Raises:
      ValueError: (one line) ``kernels`` the devices cannot run in ``dtype``, or XLA options
        for the pmap placement.
    """

    def __init__(self, model_or_params: Any, config: Any, *, dtype: Any = jnp.float32,
                 data_parallel: sharding.DataParallel | None = None,
                 kernels: backend.Kernels | None = None):
        params = getattr(model_or_params, "params", model_or_params)
        self.spec = model.ModelSpec.from_config(config)
        self.dtype = jnp.dtype(dtype)
        if self.dtype != jnp.float32:
            params = model.cast_params(params, self.dtype)
        self.data_parallel = data_parallel or sharding.SingleDevice()
        self.num_shards = self.data_parallel.num_shards
        platform = self.data_parallel.devices[0].platform
        if kernels is None:  # pmap compiles with XLA's default options: it takes none
            pmap = isinstance(self.data_parallel, sharding.PmapDataParallel)
            kernels = backend.kernels(platform, self.dtype,
                                      **({"compiler_options": ()} if pmap else {}))
        kernels.check(platform, self.dtype)  # at construction, not first call
        if kernels.compiler_options:  # the pmap placement refuses them, here too
            self.data_parallel.wrap(lambda params: params, dict(kernels.compiler_options))
        self.kernels = kernels
        self.params = self.data_parallel.replicate(params)
        self._programs: dict[tuple[Any, ...], sharding.Program] = {}
        # Seconds spent compiling programs (ahead of their first call, so running is apart).
        self.compile_seconds = 0.0

    def check(self, settings: GenerationSettings) -> None:
        """Raises OptionError (a ValueError naming the setting, one line) for settings this
        model cannot run."""
        vocab = self.spec.vocab_size
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id",
                     "forced_bos_token_id", "forced_eos_token_id"):
            if getattr(settings, name) is not None and getattr(settings, name) >= vocab:
                raise OptionError(name, f"{getattr(settings, name)} is outside the vocabulary "
                                        f"(size {vocab})")
        token_lists = {
            "bad_words_ids": [t for word in settings.bad_words_ids for t in word],
            "sequence_bias": [t for ids, _ in settings.sequence_bias for t in ids],
            "suppress_tokens": settings.suppress_tokens,
            "begin_suppress_tokens": settings.begin_suppress_tokens,
        }
        for name, tokens in token_lists.items():
            out_of_range = sorted({t for t in tokens if t >= vocab})
            if out_of_range:
                raise OptionError(name, f"{out_of_range} are outside the vocabulary "
                                        f"(size {vocab})")
        if settings.max_length > self.spec.n_positions:
            raise OptionError("max_length", f"{settings.max_length} exceeds the decoder's "
                                            f"{self.spec.n_positions} positions")

    def program(self, bucket: int, settings: GenerationSettings,
                canvas: tuple[int, preprocess.PreprocessConfig] | None = None
                ) -> sharding.Program:
        """The compiled search for ``bucket`` images (compiled on first use, then cached):
        of float32 pixel values, or with ``canvas`` (side, config) of ``resize.Canvases``
        arrays (``Canvases.arrays``), which it resizes first."""
        # Traced at the dtype's own precision ("highest" for float32, so not TF32 on GPUs),
        # whatever the caller's jax config (backend.py). Nothing is donated: the pixels cannot
        # alias any output (tokens and scores, of other shapes) and the params are reused.
        # The search has no host callbacks or transfers (tests/test_backend.py checks the
        # compiled HLO and runs it under jax.transfer_guard("disallow")).
        precision = backend.matmul_precision(self.dtype)
        key = (bucket, settings, precision, canvas)
        if key not in self._programs:
            self.check(settings)
            generate_fn = build_generate_fn(self.spec, settings, self.dtype, self.kernels)
            if canvas is not None:
                generate_fn = _resizing_first(generate_fn, canvas[1])
            self._programs[key] = self.data_parallel.wrap(
                backend.at_precision(generate_fn, precision), dict(self.kernels.compiler_options))
        return self._programs[key]

    def generate(self, pixel_values: np.ndarray | jax.Array, settings: GenerationSettings, *,
                 rng: jax.Array | None = None, first_index: int = 0,
                 params: Any = None) -> GenerationOutput:
        """Captions a batch of preprocessed images: ``dispatch(...).result()``.

        Args:
          pixel_values: float [B, 3, H, W] (normalized as the checkpoint's preprocessor does).
          settings: validated ``GenerationSettings``.
          rng: PRNG key for sampling (default ``PRNGKey(0)``); ignored otherwise.
          first_index: global index of the first image; image ``i`` samples with
            ``fold_in(rng, first_index + i)``, so results do not depend on batching.
          params: parameters to use instead of the generator's own, placed by
            ``data_parallel.replicate`` in the generator's dtype (the trainer captions with
            its current weights through the same compiled programs).

        Returns:
          ``GenerationOutput`` with N = B x num_return_sequences rows, image-major.

        Raises:
          ValueError: one line naming the bad input (pixel shape, out-of-vocabulary ids, ...).
          CaptionerError: the batch does not fit in device memory (one line naming the batch
            size and a smaller one to try, ``fix=("smaller_batch",)``).
        """
        return self.dispatch(pixel_values, settings, rng=rng, first_index=first_index,
                             params=params).result()

    def dispatch(self, pixel_values: np.ndarray | jax.Array | resize.Canvases,
                 settings: GenerationSettings, *, rng: jax.Array | None = None,
                 first_index: int = 0, params: Any = None) -> Dispatched:
        """Starts ``generate``'s search on the devices and returns without waiting for it
        (compiling first, timed, when the program is new); ``Dispatched.result`` waits. The
        arguments and errors are ``generate``'s, except that ``pixel_values`` may also be
        ``resize.Canvases`` (the feed's with ``ImageDecoding.device_resize``), which the
        program resizes and normalises first; running out of memory may surface in either.
        """
        size, channels = self.spec.image_size, self.spec.num_channels
        if isinstance(pixel_values, resize.Canvases):
            config = pixel_values.config
            if config.size != (size, size):
                raise ValueError(f"canvases resize to {config.size}, but the encoder takes "
                                 f"{size}x{size} images")
            batch_args = pixel_values.arrays
            canvas = (pixel_values.pixels.shape[1], config)
        else:
            batch_args = (np.asarray(pixel_values, np.float32),)
            canvas = None
            if batch_args[0].ndim != 4 or batch_args[0].shape[1:] != (channels, size, size):
                raise ValueError(f"pixel_values must have shape [B, {channels}, {size}, "
                                 f"{size}], got {list(batch_args[0].shape)}")
        batch = batch_args[0].shape[0]
        bucket = bucket_size(batch, self.num_shards) if batch else 0
        dispatched = Dispatched(None, batch, bucket, self.num_shards, settings)
        if batch == 0:
            return dispatched
        programs_before = len(self._programs)
        program = self.program(bucket, settings, canvas)
        padded = [sharding.pad_to_multiple(array, bucket) for array in batch_args]
        keys = image_keys(rng, first_index, bucket)
        params = self.params if params is None else params
        with dispatched.out_of_memory_as_error():
            if len(self._programs) > programs_before:  # a new program: compile it, timed
                started = time.perf_counter()
                program.compile(params, *padded, keys)
                self.compile_seconds += time.perf_counter() - started
            return dataclasses.replace(dispatched, output=program(params, *padded, keys))


@dataclasses.dataclass(frozen=True)
class Dispatched:
    """A batch's search, running on the devices (``Generator.dispatch``).

    Attributes:
      output: the program's ``search.SearchOutput`` (device arrays, maybe not yet computed);
        None for an empty batch.
      images: images in the batch (the program ran on ``bucket``, padded).
      bucket: the batch size the program was compiled for.
      num_shards: devices the batch is split over.
      settings: the batch's ``GenerationSettings``.
    """

    output: search.SearchOutput | None
    images: int
    bucket: int
    num_shards: int
    settings: GenerationSettings

    def result(self) -> GenerationOutput:
        """Waits for the search and copies its first ``images`` images' rows to the host.

        Raises:
          CaptionerError: the batch did not fit in device memory (execution failures surface
            here, under asynchronous dispatch).
        """
        if self.output is None:
            length = self.settings.max_length
            return GenerationOutput(np.zeros((0, length), np.int32), np.zeros((0,), np.float32),
                                    np.zeros((0, length), np.float32))
        with self.out_of_memory_as_error():
            jax.block_until_ready(self.output)
        return GenerationOutput.from_search(self.output, self.images, self.settings)

    @contextlib.contextmanager
    def out_of_memory_as_error(self) -> Iterator[None]:
        """XLA's RESOURCE_EXHAUSTED inside, as ``backend.out_of_memory_error``'s one line."""
        try:
            yield
        except RuntimeError as error:
            if not backend.is_out_of_memory(error):
                raise
            raise backend.out_of_memory_error(error, batch=self.images, bucket=self.bucket,
                                              num_shards=self.num_shards,
                                              platform=jax.default_backend()) from error
