"""The captioner as Flax modules: a ViT encoder, a GPT-2 decoder with cross-attention and an
LM head tied to the token embedding.

The parameter tree is ``FlaxVisionEncoderDecoderModel``'s (the same names, shapes and
dtypes), so the Flax lineage's ``flax_model.msgpack`` loads unchanged, without transformers'
Flax classes. Each module declares its parameters (with Hugging Face's initializers) and runs
``model.py``'s functions on them, the arithmetic the generator compiles, adding only dropout
and teacher forcing over whole sequences: training's forward pass and the generator cannot
drift apart.

Shapes: B images, C channels, T tokens, S encoder positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_captioner import model
from flax_captioner.model import ModelSpec, Params


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """What the modules need beyond ``ModelSpec``: initializer scales and dropout rates.

    Hashable, so the modules that hold it stay static under ``jax.jit``.
    """

    spec: ModelSpec
    encoder_initializer_range: float
    decoder_initializer_range: float
    encoder_hidden_dropout: float
    encoder_attention_dropout: float
    decoder_embedding_dropout: float
    decoder_residual_dropout: float
    decoder_attention_dropout: float

    @classmethod
    def from_config(cls, config: Any) -> "ModuleConfig":
        """Reads a ``VisionEncoderDecoderConfig`` (ViT encoder, GPT-2 decoder).

        Raises:
          ModelLoadError: the config uses a feature the modules do not implement.
        """
        encoder, decoder = config.encoder, config.decoder
        return cls(spec=ModelSpec.from_config(config),
                   encoder_initializer_range=encoder.initializer_range,
                   decoder_initializer_range=decoder.initializer_range,
                   encoder_hidden_dropout=encoder.hidden_dropout_prob,
                   encoder_attention_dropout=encoder.attention_probs_dropout_prob,
                   decoder_embedding_dropout=decoder.embd_pdrop,
                   decoder_residual_dropout=decoder.resid_pdrop,
                   decoder_attention_dropout=decoder.attn_pdrop)


def _vit_init(config: ModuleConfig) -> nn.initializers.Initializer:
    """transformers' Flax ViT initializer for kernels, the CLS token and positions."""
    return nn.initializers.variance_scaling(config.encoder_initializer_range ** 2, "fan_in",
                                            "truncated_normal")


def _dense(features_in: int, features_out: int, init: nn.initializers.Initializer) -> dict:
    """An ``nn.Dense`` layout: kernel [D_in, D_out], bias [D_out]."""
    return {"kernel": (init, (features_in, features_out)),
            "bias": (nn.initializers.zeros, (features_out,))}


def _conv1d(features_in: int, features_out: int) -> dict:
    """transformers' ``FlaxConv1D`` layout: kernel [D_out, D_in] (drawn with std 0.02, as
    there), bias [D_out]."""
    return {"kernel": (nn.initializers.normal(0.02), (features_out, features_in)),
            "bias": (nn.initializers.zeros, (features_out,))}


def _layer_norm(features: int) -> dict:
    return {"scale": (nn.initializers.ones, (features,)),
            "bias": (nn.initializers.zeros, (features,))}


class _Group(nn.Module):
    """A named group of parameters (a folder of the tree) declared from a layout."""

    layout: Mapping[str, Any]

    @nn.compact
    def __call__(self) -> Params:
        return declare(self, self.layout)


def declare(module: nn.Module, layout: Mapping[str, Any]) -> Params:
    """Declares ``layout``'s parameters in ``module`` and returns them as a nested dict.

    ``layout`` maps a name to an ``(initializer, shape)`` pair, or to a nested layout (a
    submodule of that name), so every name is a step of the parameter's path. Call it from
    the module's ``nn.compact`` method.
    """
    return {name: _Group(entry, name=name)() if isinstance(entry, Mapping)
            else module.param(name, entry[0], entry[1], jnp.float32)
            for name, entry in layout.items()}


def _dropout(rate: float, deterministic: bool) -> model.Dropout:
    """Dropout at ``rate`` while training; the identity otherwise. Called inside a module's
    compact method, so each use is a fresh ``nn.Dropout`` with its own random stream."""
    if deterministic or rate == 0.0:
        return lambda x: x
    return lambda x: nn.Dropout(rate, deterministic=False)(x)


class ViTLayer(nn.Module):
    """transformers' ``FlaxViTLayer``: hidden float32[B, S, D] -> float32[B, S, D]."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        spec, init = self.config.spec, _vit_init(self.config)
        width, inner = spec.encoder_hidden_size, spec.encoder_intermediate_size
        params = declare(self, {
            "attention": {"attention": {name: _dense(width, width, init)
                                        for name in ("query", "key", "value")},
                          "output": {"dense": _dense(width, width, init)}},
            "intermediate": {"dense": _dense(width, inner, init)},
            "output": {"dense": _dense(inner, width, init)},
            "layernorm_before": _layer_norm(width),
            "layernorm_after": _layer_norm(width)})
        return model.encoder_layer(
            params, hidden, spec, self.dtype,
            dropout=_dropout(self.config.encoder_hidden_dropout, deterministic),
            attention_dropout=_dropout(self.config.encoder_attention_dropout, deterministic))


class _ViTLayers(nn.Module):
    """transformers' ``FlaxViTLayerCollection``: the layers "0", "1", ... in order."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        for index in range(self.config.spec.encoder_num_layers):
            hidden = ViTLayer(self.config, self.dtype, name=str(index))(hidden, deterministic)
        return hidden


class _ViTStack(nn.Module):
    """transformers' ``FlaxViTEncoder``: the folder ``encoder/layer``."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        return _ViTLayers(self.config, self.dtype, name="layer")(hidden, deterministic)


class ViTEncoder(nn.Module):
    """transformers' ``FlaxViTModule`` with its pooler (declared, as the checkpoint holds it;
    captioning does not use it): pixels float32[B, C, H, W] -> hidden float32[B, S, D]."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, deterministic: bool = True) -> jax.Array:
        spec, init = self.config.spec, _vit_init(self.config)
        width, patch = spec.encoder_hidden_size, spec.patch_size
        params = declare(self, {
            "embeddings": {
                "cls_token": (init, (1, 1, width)),
                "patch_embeddings": {"projection": {
                    "kernel": (init, (patch, patch, spec.num_channels, width)),
                    "bias": (nn.initializers.zeros, (width,))}},
                "position_embeddings": (init, (1, spec.encoder_length, width))},
            "layernorm": _layer_norm(width),
            "pooler": {"dense": _dense(width, width, init)}})
        hidden = model.embed_patches(params, pixel_values, spec, self.dtype)  # [B, S, D]
        hidden = _dropout(self.config.encoder_hidden_dropout, deterministic)(hidden)
        hidden = _ViTStack(self.config, self.dtype, name="encoder")(hidden, deterministic)
        return model.layer_norm(hidden, params["layernorm"], spec.encoder_layer_norm_eps)


class GPT2Block(nn.Module):
    """transformers' ``FlaxGPT2Block`` with cross-attention, over whole sequences:
    hidden float32[B, T, D] -> float32[B, T, D]."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, visible: jax.Array, encoder_hidden: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """``visible``: bool[B, 1, T, T]; ``encoder_hidden``: float32[B, S, D]."""
        spec = self.config.spec
        width, inner = spec.hidden_size, spec.intermediate_size
        params = declare(self, {
            "ln_1": _layer_norm(width),
            "attn": {"c_attn": _conv1d(width, 3 * width), "c_proj": _conv1d(width, width)},
            "ln_cross_attn": _layer_norm(width),
            "crossattention": {"c_attn": _conv1d(width, 2 * width),
                               "q_attn": _conv1d(width, width),
                               "c_proj": _conv1d(width, width)},
            "ln_2": _layer_norm(width),
            "mlp": {"c_fc": _conv1d(width, inner), "c_proj": _conv1d(inner, width)}})
        cross_key, cross_value = model.layer_cross_kv(
            params["crossattention"]["c_attn"], encoder_hidden, spec, self.dtype)
        return model.decoder_layer(
            params, hidden, visible, cross_key, cross_value, spec, self.dtype,
            dropout=_dropout(self.config.decoder_residual_dropout, deterministic),
            attention_dropout=_dropout(self.config.decoder_attention_dropout, deterministic))


class _GPT2Blocks(nn.Module):
    """transformers' ``FlaxGPT2BlockCollection``: the blocks "0", "1", ... in order."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, visible: jax.Array, encoder_hidden: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        for index in range(self.config.spec.num_layers):
            hidden = GPT2Block(self.config, self.dtype, name=str(index))(
                hidden, visible, encoder_hidden, deterministic)
        return hidden


class GPT2Decoder(nn.Module):
    """transformers' ``FlaxGPT2Module`` and its tied LM head: tokens int32[B, T] ->
    logits float32[B, T, V], position ``t`` seeing the unpadded tokens ``<= t``."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array, encoder_hidden: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """``token_mask``: [B, T], 1 for tokens and 0 for padding (never attended to)."""
        spec = self.config.spec
        embedding = nn.initializers.normal(self.config.decoder_initializer_range)
        params = declare(self, {
            "wte": {"embedding": (embedding, (spec.vocab_size, spec.hidden_size))},
            "wpe": {"embedding": (embedding, (spec.n_positions, spec.hidden_size))},
            "ln_f": _layer_norm(spec.hidden_size)})
        length = tokens.shape[1]
        hidden = (params["wte"]["embedding"][tokens]
                  + params["wpe"]["embedding"][:length])  # [B, T, D] float32
        hidden = _dropout(self.config.decoder_embedding_dropout, deterministic)(hidden)
        causal = jnp.tril(jnp.ones((length, length), bool))  # [T, T]
        visible = causal & (token_mask[:, None, None, :] > 0)  # [B, 1, T, T]
        hidden = _GPT2Blocks(self.config, self.dtype, name="h")(
            hidden, visible, encoder_hidden, deterministic)
        return model.tied_logits(params, hidden, spec, self.dtype)  # [B, T, V]


class _GPT2LMHead(nn.Module):
    """transformers' ``FlaxGPT2LMHeadModule``: the folder ``transformer`` (the LM head is
    tied to ``wte``, so it has no parameters of its own)."""

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array, encoder_hidden: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        return GPT2Decoder(self.config, self.dtype, name="transformer")(
            tokens, token_mask, encoder_hidden, deterministic)


class VisionEncoderDecoder(nn.Module):
    """The captioner (transformers' ``FlaxVisionEncoderDecoderModule``), teacher-forced:
    pixels float32[B, C, H, W] and tokens int32[B, T] -> logits float32[B, T, V].

    Dropout runs when ``deterministic`` is False, drawing from the ``"dropout"`` stream.
    """

    config: ModuleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, decoder_input_ids: jax.Array,
                 decoder_attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        encoder_hidden = ViTEncoder(self.config, self.dtype, name="encoder")(
            pixel_values, deterministic)  # [B, S, D]
        return _GPT2LMHead(self.config, self.dtype, name="decoder")(
            decoder_input_ids, decoder_attention_mask, encoder_hidden, deterministic)


def _example_inputs(spec: ModelSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    pixels = jnp.zeros((1, spec.num_channels, spec.image_size, spec.image_size), jnp.float32)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return pixels, tokens, jnp.ones((1, 1), jnp.int32)


def init_params(config: Any, seed: int = 0) -> Params:
    """Fresh float32 parameters for a ``VisionEncoderDecoderConfig``, drawn from ``seed``
    with Hugging Face's initializers, in one compiled program."""
    module = VisionEncoderDecoder(ModuleConfig.from_config(config))
    init = jax.jit(lambda key: module.init(key, *_example_inputs(module.config.spec))["params"])
    return init(jax.random.PRNGKey(seed))


def param_shapes(config: Any) -> Params:
    """The parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves; computes nothing."""
    module = VisionEncoderDecoder(ModuleConfig.from_config(config))
    return jax.eval_shape(
        lambda key: module.init(key, *_example_inputs(module.config.spec))["params"],
        jax.random.PRNGKey(0))


def teacher_forced_logits(params: Params, config: Any, pixel_values: jax.Array,
                          decoder_input_ids: jax.Array,
                          decoder_attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits float32[B, T, V] of ``decoder_input_ids`` int32[B, T] for pixels
    float32[B, C, H, W], no dropout: what PyTorch's ``VisionEncoderDecoderModel(...).logits``
    gives for the same weights (the parity tests' comparison)."""
    module = VisionEncoderDecoder(ModuleConfig.from_config(config))
    decoder_input_ids = jnp.asarray(decoder_input_ids, jnp.int32)
    if decoder_attention_mask is None:
        decoder_attention_mask = jnp.ones_like(decoder_input_ids)
    return module.apply({"params": params}, jnp.asarray(pixel_values, jnp.float32),
                        decoder_input_ids, decoder_attention_mask)
