"""Pure functions for the ViT encoder and one cached GPT-2 decoder step.

They run on the parameter tree of transformers' ``FlaxVisionEncoderDecoderModel``
(``{"encoder": ViT, "decoder": GPT-2 LM head}``, which ``modules.py`` declares) and are the
one definition of the model's arithmetic: the generator calls ``encode``, ``cross_kv`` and
``decode_step``; training's modules call ``embed_patches``, ``encoder_layer``,
``layer_cross_kv``, ``decoder_layer`` and ``tied_logits``. They follow PyTorch's
numerics, the reference for captions: attention scores are scaled after ``q @ k``, masked with
the dtype minimum, softmax and layer norms run in float32, ViT uses exact GELU and GPT-2 the
tanh approximation.

Shapes: B images, K beams per image, S encoder positions (patches + CLS), T cache length
(the generation ``max_length``), L decoder layers, H heads, Dh head size, D hidden size,
V vocabulary. ``dtype`` is the matmul compute dtype (float32, or bfloat16 for the fast mode);
the residual stream, softmax, layer norms and logits stay float32.

Unlike HF Flax, cross-attention keys and values are computed once per image (``cross_kv``)
and shared by that image's K beams through a beam axis on the queries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flax_captioner.errors import ModelLoadError

Params = Any  # the nested dict of FlaxVisionEncoderDecoderModel.params (modules.py builds it)
# Hidden activations by config name, as transformers' Flax ACT2FN defines them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "tanh": jnp.tanh,
}
# Training's dropout at one point of a layer: an array in, the same shape out.
Dropout = Callable[[jax.Array], jax.Array]


def _keep(x: jax.Array) -> jax.Array:
    """No dropout (generation)."""
    return x


# jax.nn.dot_product_attention implementations an attention can run through instead of this
# module's einsums ("cudnn": one fused kernel; "xla": JAX's reference, in the same layouts).
# The attention forms are ``backend.Kernels``' fields, checked there.
FUSED_FORMS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers the functions need; hashable, so static under ``jax.jit``."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float
    activation: str
    encoder_num_layers: int
    encoder_num_heads: int
    encoder_head_dim: int
    encoder_hidden_size: int
    encoder_intermediate_size: int
    encoder_layer_norm_eps: float
    encoder_activation: str
    image_size: int
    patch_size: int
    num_channels: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """Reads a ``VisionEncoderDecoderConfig`` (ViT encoder, GPT-2 decoder).

        Raises:
          ModelLoadError: the config uses a feature these functions do not implement.
        """
        encoder, decoder = config.encoder, config.decoder
        unsupported = []
        if encoder.model_type != "vit" or decoder.model_type != "gpt2":
            unsupported.append(f"encoder {encoder.model_type!r} / decoder {decoder.model_type!r}"
                               " (only vit / gpt2)")
        if not decoder.add_cross_attention:
            unsupported.append("decoder without cross-attention")
        if encoder.hidden_size != decoder.hidden_size:
            unsupported.append("encoder and decoder hidden sizes differ (enc_to_dec_proj)")
        cross_size = getattr(decoder, "cross_attention_hidden_size", None)
        if cross_size not in (None, encoder.hidden_size):
            unsupported.append(f"cross_attention_hidden_size {cross_size} (the encoder's "
                               f"hidden size is {encoder.hidden_size})")
        if not decoder.scale_attn_weights or decoder.scale_attn_by_inverse_layer_idx:
            unsupported.append("non-default GPT-2 attention scaling")
        if not decoder.tie_word_embeddings:
            unsupported.append("untied GPT-2 lm_head")
        if not getattr(encoder, "qkv_bias", True):
            unsupported.append("ViT attention without biases (qkv_bias)")
        for name in (encoder.hidden_act, decoder.activation_function):
            if name not in ACTIVATIONS:
                unsupported.append(f"activation {name!r}")
        if unsupported:
            raise ModelLoadError(f"model config: unsupported {'; '.join(unsupported)}")
        return cls(
            num_layers=decoder.n_layer,
            num_heads=decoder.n_head,
            head_dim=decoder.n_embd // decoder.n_head,
            hidden_size=decoder.n_embd,
            intermediate_size=decoder.n_inner or 4 * decoder.n_embd,
            vocab_size=decoder.vocab_size,
            n_positions=decoder.n_positions,
            layer_norm_epsilon=decoder.layer_norm_epsilon,
            activation=decoder.activation_function,
            encoder_num_layers=encoder.num_hidden_layers,
            encoder_num_heads=encoder.num_attention_heads,
            encoder_head_dim=encoder.hidden_size // encoder.num_attention_heads,
            encoder_hidden_size=encoder.hidden_size,
            encoder_intermediate_size=encoder.intermediate_size,
            encoder_layer_norm_eps=encoder.layer_norm_eps,
            encoder_activation=encoder.hidden_act,
            image_size=encoder.image_size,
            patch_size=encoder.patch_size,
            num_channels=encoder.num_channels,
        )

    @property
    def encoder_length(self) -> int:
        """S: patches plus the CLS position."""
        return (self.image_size // self.patch_size) ** 2 + 1


@flax.struct.dataclass
class CrossKV:
    """Cross-attention keys and values of every decoder layer, one copy per image.

    One array per layer rather than one stacked [L, ...] array: reading layer ``l`` of a
    stacked array inside the compiled step copies it, most of a CPU step's time
    (docs/performance.md, "Decoder state layout").

    Attributes:
      key: L arrays [B, H, S, Dh] in the compute dtype; [B, S, H, Dh] for a fused
        cross-attention (``jax.nn.dot_product_attention``'s layout).
      value: L arrays, as ``key``.
    """

    key: tuple[jax.Array, ...]
    value: tuple[jax.Array, ...]


@flax.struct.dataclass
class SelfAttentionCache:
    """Fixed-length self-attention cache, read through ``rows`` so a beam reorder moves no
    keys or values.

    Slot ``t`` of row ``k`` holds the keys/values row ``k`` computed at position ``t``, and
    beam ``k`` reads slot ``t`` from row ``rows[b, k, t]`` (FasterTransformer's "cache
    indirection"). Reordering beams gathers ``rows`` only: gathering the keys and values
    instead wrote a new cache every step, which XLA then copied back into the loop's buffers
    (docs/performance.md, "Decoder state layout"). How a step reads through ``rows`` is
    ``backend.Kernels.self_attention``. One array per layer, like ``CrossKV``, so a step
    updates and reads each in place.

    Attributes:
      key: L arrays [B, K, H, T, Dh] in the compute dtype.
      value: L arrays [B, K, H, T, Dh] in the compute dtype.
      rows: int32 [B, K, T], the row each beam reads each slot from.
    """

    key: tuple[jax.Array, ...]
    value: tuple[jax.Array, ...]
    rows: jax.Array


def cast_params(params: Params, dtype: jnp.dtype) -> Params:
    """Casts matmul kernels and embeddings to ``dtype`` once, before any compiled loop.

    Biases, layer-norm parameters, the CLS token and ViT position embeddings stay float32
    (they enter float32 computations). The functions below cast at use as well, so unprepared
    float32 params also work, at the cost of a cast per call.
    """
    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        return leaf.astype(dtype) if name in ("kernel", "embedding") else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def layer_norm(x: jax.Array, norm: Params, epsilon: float) -> jax.Array:
    """PyTorch's LayerNorm in float32 (biased variance of the centred input). [..., D]."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = jnp.square(centred).mean(axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(variance + epsilon)
    return normed * norm["scale"].astype(jnp.float32) + norm["bias"].astype(jnp.float32)


def dense(x: jax.Array, dense: Params, dtype: jnp.dtype) -> jax.Array:
    """Flax ``nn.Dense`` (kernel [D_in, D_out]): [..., D_in] -> [..., D_out] float32."""
    y = jnp.matmul(x.astype(dtype), dense["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32)
    return y + dense["bias"].astype(jnp.float32)


def conv1d(x: jax.Array, conv: Params, dtype: jnp.dtype) -> jax.Array:
    """GPT-2 ``Conv1D`` as stored by Flax (kernel [D_out, D_in]): [..., D_in] -> [..., D_out].

    Contracts with the kernel's second axis directly, so no transposed copy is made per step.
    """
    y = jax.lax.dot_general(x.astype(dtype), conv["kernel"].astype(dtype),
                            (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y + conv["bias"].astype(jnp.float32)


def softmax_attention(scores: jax.Array, values: jax.Array, equation: str,
                      dtype: jnp.dtype, dropout: Dropout | None = None) -> jax.Array:
    """float32 softmax over the last axis of ``scores``, then ``einsum(equation, probs, values)``.

    The result is in ``dtype``: it only feeds the output projection, and XLA:CPU cannot run
    every batched bfloat16 x bfloat16 -> float32 layout this einsum may be given.
    ``dropout``: applied to the probabilities (training's attention dropout).
    """
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum(equation, probs.astype(dtype), values.astype(dtype),
                      preferred_element_type=dtype)


def _fused_attention(query: jax.Array, key: jax.Array, value: jax.Array, dtype: jnp.dtype,
                     implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` over [B, T, H, Dh] queries and [B, S, H, Dh] keys and
    values, all in ``dtype``: [B, T, H, Dh] in ``dtype``. Scores are scaled by 1 / sqrt(Dh)
    (exactly as the einsums' division where Dh is a power of two), the softmax runs in
    float32 and the probabilities meet the values in ``dtype``, as in the einsums."""
    return jax.nn.dot_product_attention(
        query.astype(dtype), key.astype(dtype), value.astype(dtype),
        scale=1.0 / math.sqrt(query.shape[-1]), implementation=implementation)


def embed_patches(vit: Params, pixel_values: jax.Array, spec: ModelSpec,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """ViT embeddings: pixels [B, C, H, W] -> [B, S, D] float32 (CLS first, positions added).

    ``vit`` is the encoder's parameters (``params["encoder"]``). The patch convolution runs
    as one matmul over flattened (row, column, channel) patches, the order of Flax's HWIO
    conv kernel.
    """
    batch = pixel_values.shape[0]
    patch, grid = spec.patch_size, spec.image_size // spec.patch_size
    patches = pixel_values.reshape(batch, spec.num_channels, grid, patch, grid, patch)
    patches = patches.transpose(0, 2, 4, 3, 5, 1).reshape(batch, grid * grid, -1)
    projection = vit["embeddings"]["patch_embeddings"]["projection"]
    kernel = projection["kernel"].reshape(-1, spec.encoder_hidden_size)
    embedded = dense(patches, {"kernel": kernel, "bias": projection["bias"]}, dtype)
    cls_token = jnp.broadcast_to(vit["embeddings"]["cls_token"].astype(jnp.float32),
                                 (batch, 1, spec.encoder_hidden_size))
    hidden = jnp.concatenate([cls_token, embedded], axis=1)
    return hidden + vit["embeddings"]["position_embeddings"].astype(jnp.float32)


def encoder_layer(layer: Params, hidden: jax.Array, spec: ModelSpec,
                  dtype: jnp.dtype = jnp.float32, attention: str = "einsum",
                  dropout: Dropout = _keep, attention_dropout: Dropout | None = None
                  ) -> jax.Array:
    """One pre-norm ViT layer: hidden [B, S, D] float32 -> [B, S, D] float32.

    ``dropout`` follows each residual branch and ``attention_dropout`` the attention
    probabilities, as in ViT training (the identity, and none, when generating).
    """
    batch = hidden.shape[0]
    heads, head_dim = spec.encoder_num_heads, spec.encoder_head_dim
    self_attention = layer["attention"]["attention"]
    normed = layer_norm(hidden, layer["layernorm_before"], spec.encoder_layer_norm_eps)
    query, key, value = (dense(normed, self_attention[name], dtype)
                         for name in ("query", "key", "value"))  # [B, S, D] each
    if attention in FUSED_FORMS:  # [B, S, H, Dh] in and out: no head transposes
        context = _fused_attention(*(x.reshape(batch, -1, heads, head_dim)
                                     for x in (query, key, value)), dtype, attention)
    else:
        def split_heads(x):  # [B, S, D] -> [B, H, S, Dh]
            return x.reshape(batch, -1, heads, head_dim).transpose(0, 2, 1, 3)

        query, key, value = map(split_heads, (query, key, value))  # [B, H, S, Dh]
        scores = jnp.einsum("bhqd,bhkd->bhqk", query.astype(dtype), key.astype(dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(head_dim)
        # Heads-major output, then one transpose: asking the einsum for [B, S, H, Dh]
        # directly makes XLA:CPU pick a slower layout.
        context = softmax_attention(scores, value, "bhqk,bhkd->bhqd", dtype, attention_dropout)
        context = context.transpose(0, 2, 1, 3)  # [B, S, H, Dh]
    context = context.reshape(batch, -1, spec.encoder_hidden_size)
    hidden = hidden + dropout(dense(context, layer["attention"]["output"]["dense"], dtype))
    normed = layer_norm(hidden, layer["layernorm_after"], spec.encoder_layer_norm_eps)
    activation = ACTIVATIONS[spec.encoder_activation]
    intermediate = activation(dense(normed, layer["intermediate"]["dense"], dtype))
    return hidden + dropout(dense(intermediate, layer["output"]["dense"], dtype))


def encode(params: Params, pixel_values: jax.Array, spec: ModelSpec,
           dtype: jnp.dtype = jnp.float32, attention: str = "einsum") -> jax.Array:
    """The ViT encoder: pixels [B, C, H, W] (normalized, float) -> hidden [B, S, D] float32.

    Equals ``VisionEncoderDecoderModel.encoder(pixel_values).last_hidden_state``.
    ``attention``: the self-attention's form (``backend.Kernels.encoder_attention``).
    """
    vit = params["encoder"]
    hidden = embed_patches(vit, pixel_values, spec, dtype)  # [B, S, D]
    for index in range(spec.encoder_num_layers):
        hidden = encoder_layer(vit["encoder"]["layer"][str(index)], hidden, spec, dtype,
                               attention)
    return layer_norm(hidden, vit["layernorm"], spec.encoder_layer_norm_eps)


def layer_cross_kv(projection: Params, encoder_hidden: jax.Array, spec: ModelSpec,
                   dtype: jnp.dtype = jnp.float32, fused: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
    """One decoder layer's cross-attention keys and values from ``encoder_hidden`` [B, S, D]
    through its ``crossattention.c_attn`` ``projection``: two [B, H, S, Dh] in ``dtype``
    ([B, S, H, Dh], ``jax.nn.dot_product_attention``'s layout, when ``fused``)."""
    batch, length = encoder_hidden.shape[:2]
    key_value = conv1d(encoder_hidden, projection, dtype)  # [B, S, 2D]
    key_value = key_value.reshape(batch, length, 2, spec.num_heads, spec.head_dim)
    # [2, B, S, H, Dh] -> [2, B, H, S, Dh], or kept for fused attention.
    key_value = key_value.transpose((2, 0, 1, 3, 4) if fused else (2, 0, 3, 1, 4)).astype(dtype)
    return key_value[0], key_value[1]


def cross_kv(params: Params, encoder_hidden: jax.Array, spec: ModelSpec,
             dtype: jnp.dtype = jnp.float32, cross_context: str = "multiply_reduce"
             ) -> CrossKV:
    """Cross-attention keys/values of all decoder layers from ``encoder_hidden`` [B, S, D].

    Run once per image; returns ``CrossKV`` with L keys/values [B, H, S, Dh] in ``dtype``
    ([B, S, H, Dh] when ``decode_step``'s ``cross_context`` is fused).
    """
    layers = params["decoder"]["transformer"]["h"]
    keys, values = zip(*(layer_cross_kv(layers[str(index)]["crossattention"]["c_attn"],
                                        encoder_hidden, spec, dtype,
                                        cross_context in FUSED_FORMS)
                         for index in range(spec.num_layers)))
    return CrossKV(key=tuple(keys), value=tuple(values))


def init_cache(batch: int, beams: int, max_length: int, spec: ModelSpec,
               dtype: jnp.dtype = jnp.float32) -> SelfAttentionCache:
    """An all-zero cache with L keys/values [B, K, H, T=max_length, Dh] in ``dtype``, each
    beam reading its own row."""
    if max_length > spec.n_positions:
        raise ValueError(f"max_length {max_length} exceeds the decoder's n_positions "
                         f"{spec.n_positions}")
    shape = (batch, beams, spec.num_heads, max_length, spec.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(spec.num_layers))
    return SelfAttentionCache(key=zeros, value=zeros, rows=_own_rows(batch, beams, max_length))


def _own_rows(batch: int, beams: int, length: int) -> jax.Array:
    """int32 [B, K, T]: every beam reads every slot from its own row."""
    return jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[:, None], (batch, beams, length))


def _read_rows(array: jax.Array, rows: jax.Array) -> jax.Array:
    """Beam ``k``'s keys or values: ``array`` [B, K, H, T, Dh] read through ``rows``
    [B, K, T]; [B, K, H, T, Dh]."""
    return jnp.take_along_axis(array, rows[:, :, None, :, None], axis=1, mode="clip")


def _self_attention(query: jax.Array, key: jax.Array, value: jax.Array, rows: jax.Array,
                    visible: jax.Array, dtype: jnp.dtype, form: str) -> jax.Array:
    """The K beams' queries [B, K, H, Dh] over the cache's keys and values [B, K, H, T, Dh],
    each beam reading slot t from row ``rows[b, k, t]``, slots where ``visible`` [T] is false
    masked as PyTorch masks them (the float32 minimum): the context [B, K, H, Dh]
    (``decode_step``'s ``self_attention`` forms)."""
    query = query.astype(dtype)
    keys, values = _read_rows(key, rows), _read_rows(value, rows)  # [B, K, H, T, Dh]
    scale = math.sqrt(query.shape[-1])
    if form == "einsum":
        scores = jnp.einsum("bkhd,bkhtd->bkht", query, keys,
                            preferred_element_type=jnp.float32) / scale
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        return softmax_attention(scores, values, "bkht,bkhtd->bkhd", dtype)
    # Products of ``dtype`` operands are exact in float32, as in the einsum's accumulation.
    scores = jnp.sum(query[:, :, :, None, :].astype(jnp.float32) * keys.astype(jnp.float32),
                     axis=-1) / scale  # [B, K, H, T]
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.sum(probs[..., None] * values.astype(jnp.float32), axis=-2)


def _cross_attention(query: jax.Array, key: jax.Array, value: jax.Array, dtype: jnp.dtype,
                     cross_context: str) -> jax.Array:
    """Cross-attention of the K beams' queries [B, K, H, Dh] over their image's keys and
    values (``CrossKV``'s layout): the context [B, K, H, Dh] (``decode_step``'s forms)."""
    if cross_context in FUSED_FORMS:  # an image's beams are its K queries
        return _fused_attention(query, key, value, dtype, cross_context)
    scores = jnp.einsum("bkhd,bhsd->bkhs", query.astype(dtype), key,
                        preferred_element_type=jnp.float32) / math.sqrt(query.shape[-1])
    if cross_context == "einsum":
        return softmax_attention(scores, value, "bkhs,bhsd->bkhd", dtype)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, H, S]
    return jnp.sum(probs[..., None] * value[:, None].astype(jnp.float32), axis=-2)


def _mlp(layer: Params, hidden: jax.Array, spec: ModelSpec, dtype: jnp.dtype) -> jax.Array:
    """A GPT-2 block's feed-forward branch (before the residual add): [..., D] -> [..., D]."""
    normed = layer_norm(hidden, layer["ln_2"], spec.layer_norm_epsilon)
    intermediate = ACTIVATIONS[spec.activation](conv1d(normed, layer["mlp"]["c_fc"], dtype))
    return conv1d(intermediate, layer["mlp"]["c_proj"], dtype)


def tied_logits(gpt2: Params, hidden: jax.Array, spec: ModelSpec,
                 dtype: jnp.dtype) -> jax.Array:
    """The final layer norm and the LM head tied to ``wte``: [..., D] -> [..., V] float32."""
    normed = layer_norm(hidden, gpt2["ln_f"], spec.layer_norm_epsilon)
    return jax.lax.dot_general(normed.astype(dtype), gpt2["wte"]["embedding"].astype(dtype),
                               (((normed.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def decoder_layer(layer: Params, hidden: jax.Array, visible: jax.Array, cross_key: jax.Array,
                  cross_value: jax.Array, spec: ModelSpec, dtype: jnp.dtype = jnp.float32,
                  dropout: Dropout = _keep, attention_dropout: Dropout | None = None
                  ) -> jax.Array:
    """One GPT-2 block over whole sequences (teacher forcing): [B, T, D] -> [B, T, D] float32.

    Args:
      visible: bool [B, 1, T, T], which keys each query may attend to (causal and padding).
      cross_key, cross_value: this layer's cross-attention keys and values [B, H, S, Dh]
        (``layer_cross_kv``).
      dropout: follows the embeddings' and each residual branch (GPT-2's resid_pdrop).
      attention_dropout: applied to both attentions' probabilities (attn_pdrop).
    """
    batch, length = hidden.shape[:2]

    def split_heads(x):  # [B, T, D] -> [B, H, T, Dh]
        return x.reshape(batch, length, spec.num_heads, spec.head_dim).transpose(0, 2, 1, 3)

    def merge_heads(x):  # [B, H, T, Dh] -> [B, T, D]
        return x.transpose(0, 2, 1, 3).reshape(batch, length, spec.hidden_size)

    scale = math.sqrt(spec.head_dim)
    normed = layer_norm(hidden, layer["ln_1"], spec.layer_norm_epsilon)
    query, key, value = map(split_heads, jnp.split(conv1d(normed, layer["attn"]["c_attn"], dtype),
                                                   3, -1))  # [B, H, T, Dh] each
    scores = jnp.einsum("bhqd,bhkd->bhqk", query.astype(dtype), key.astype(dtype),
                        preferred_element_type=jnp.float32) / scale  # [B, H, T, T]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    context = softmax_attention(scores, value, "bhqk,bhkd->bhqd", dtype, attention_dropout)
    hidden = hidden + dropout(conv1d(merge_heads(context), layer["attn"]["c_proj"], dtype))

    cross_attention = layer["crossattention"]
    normed = layer_norm(hidden, layer["ln_cross_attn"], spec.layer_norm_epsilon)
    query = split_heads(conv1d(normed, cross_attention["q_attn"], dtype))  # [B, H, T, Dh]
    scores = jnp.einsum("bhqd,bhsd->bhqs", query.astype(dtype), cross_key.astype(dtype),
                        preferred_element_type=jnp.float32) / scale  # [B, H, T, S]
    context = softmax_attention(scores, cross_value, "bhqs,bhsd->bhqd", dtype, attention_dropout)
    hidden = hidden + dropout(conv1d(merge_heads(context), cross_attention["c_proj"], dtype))
    return hidden + dropout(_mlp(layer, hidden, spec, dtype))


def decode_step(params: Params, tokens: jax.Array, position: jax.Array,
                cache: SelfAttentionCache, cross: CrossKV, spec: ModelSpec,
                dtype: jnp.dtype = jnp.float32, cross_context: str = "multiply_reduce",
                self_attention: str = "einsum") -> tuple[jax.Array, SelfAttentionCache]:
    """One GPT-2 step for every beam: returns (logits [B, K, V] float32, updated cache).

    Args:
      tokens: [B, K] int32, the tokens at ``position`` (the decoder start token at 0).
      position: int32 scalar; the step writes cache slot ``position`` and attends to slots
        ``<= position``.
      cache: L keys/values [B, K, H, T, Dh] and the rows each beam reads.
      cross: L keys/values [B, H, S, Dh] ([B, S, H, Dh] for a fused ``cross_context``),
        shared by the K beams of each image.
      cross_context: how the cross-attention is computed: its context (probabilities x
        values) as ``"multiply_reduce"`` (a float32 multiply and a sum over S) or
        ``"einsum"`` (a batched matmul in ``dtype``), or the whole attention through
        ``jax.nn.dot_product_attention`` (``FUSED_FORMS``), an image's K beams as its K
        queries (``backend.Kernels.cross_context``).
      self_attention: how the self-attention reads the cache through its rows: einsums over
        the gathered keys and values (``"einsum"``) or float32 multiply-reduces
        (``"multiply_reduce"``; ``backend.Kernels.self_attention``).
    """
    gpt2 = params["decoder"]["transformer"]
    batch, beams = tokens.shape
    heads, head_dim = spec.num_heads, spec.head_dim
    cache_length = cache.key[0].shape[3]

    wte = gpt2["wte"]["embedding"]
    position_embedding = jax.lax.dynamic_index_in_dim(gpt2["wpe"]["embedding"], position,
                                                      keepdims=False)
    hidden = (wte[tokens].astype(jnp.float32)
              + position_embedding.astype(jnp.float32))  # [B, K, D]
    # Slots after `position` hold zeros (or stale beams); PyTorch masks with the dtype minimum.
    visible = jnp.arange(cache_length) <= position  # [T]

    def split_heads(x):  # [B, K, D] -> [B, K, H, Dh]
        return x.reshape(batch, beams, heads, head_dim)

    # This step's slot is its row's own: every beam reads slot `position` from itself.
    rows = jnp.where(jnp.arange(cache_length) == position,
                     _own_rows(batch, beams, cache_length), cache.rows)  # [B, K, T]
    cache_keys, cache_values = [], []
    for index in range(spec.num_layers):
        layer = gpt2["h"][str(index)]
        normed = layer_norm(hidden, layer["ln_1"], spec.layer_norm_epsilon)
        query, key, value = jnp.split(conv1d(normed, layer["attn"]["c_attn"], dtype), 3, -1)
        slot = (0, 0, 0, position, 0)
        layer_key, layer_value = cache.key[index], cache.value[index]
        layer_key = jax.lax.dynamic_update_slice(
            layer_key, split_heads(key).astype(layer_key.dtype)[:, :, :, None, :], slot)
        layer_value = jax.lax.dynamic_update_slice(
            layer_value, split_heads(value).astype(layer_value.dtype)[:, :, :, None, :], slot)
        cache_keys.append(layer_key)
        cache_values.append(layer_value)
        context = _self_attention(split_heads(query), layer_key, layer_value, rows, visible,
                                  dtype, self_attention)  # [B, K, H, Dh]
        hidden = hidden + conv1d(context.reshape(batch, beams, -1), layer["attn"]["c_proj"],
                                  dtype)

        cross_attention = layer["crossattention"]
        normed = layer_norm(hidden, layer["ln_cross_attn"], spec.layer_norm_epsilon)
        query = split_heads(conv1d(normed, cross_attention["q_attn"], dtype))
        context = _cross_attention(query, cross.key[index], cross.value[index], dtype,
                                   cross_context)  # [B, K, H, Dh]
        hidden = hidden + conv1d(context.reshape(batch, beams, -1), cross_attention["c_proj"],
                                  dtype)

        hidden = hidden + _mlp(layer, hidden, spec, dtype)

    logits = tied_logits(gpt2, hidden, spec, dtype)  # [B, K, V]
    return logits, SelfAttentionCache(key=tuple(cache_keys), value=tuple(cache_values),
                                      rows=rows)


def reorder_cache(cache: SelfAttentionCache, beam_indices: jax.Array) -> SelfAttentionCache:
    """Selects beams: new beam ``k`` continues old beam ``beam_indices[b, k]`` ([B, K'] int32).

    With K' = K only ``rows`` is gathered (new beam k reads what its source beam read). With
    K' != K (K = 1 and zero indices: the single live beam of step one expanded to K' beams)
    the keys and values are gathered as their beams read them, into L arrays
    [B, K', H, T, Dh] that each beam reads from its own row.
    """
    batch, beams = beam_indices.shape
    if beams == cache.rows.shape[1]:
        return cache.replace(rows=jnp.take_along_axis(cache.rows, beam_indices[:, :, None],
                                                      axis=1, mode="clip"))
    indices = beam_indices[:, :, None, None, None]

    def select(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(_read_rows(x, cache.rows), indices, axis=1, mode="clip")

    return SelfAttentionCache(key=tuple(map(select, cache.key)),
                              value=tuple(map(select, cache.value)),
                              rows=_own_rows(batch, beams, cache.rows.shape[2]))
