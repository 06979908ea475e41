"""T5 encoder (transformers ``T5EncoderModel``) in Flax NNX, and the GIDM's instruction-embedding cache.

DeFI's GIDM embeds each instruction with the frozen T5-base encoder (``last_hidden_state``, 768 wide)
and appends the tokens, with their attention mask, to every frame's tokens::

    from defi_jax.interop import hf_t5
    from defi_jax.models.t5 import InstructionEmbedder
    from defi_jax.models.t5_tokenizer import T5Tokenizer

    t5 = hf_t5.load_encoder("/ckpt/t5-base")                       # config.json + model.safetensors
    tok = T5Tokenizer.from_folder("/ckpt/t5-base")                 # spiece.model
    embed = InstructionEmbedder(t5, tok, max_length=32)
    emb_BLD, mask_BL = embed(["pick up the red block", "open the drawer", "pick up the red block"])
    # emb_BLD: float32 numpy [3, 32, 768], zero past each instruction's tokens; mask_BL: int32 [3, 32]

Attention: T5 adds a learned relative-position bias (bucketed, shared by all layers, table in layer 0)
to unscaled q.k scores, so it calls ``jax.nn.dot_product_attention`` directly with ``bias=`` and
``scale=1`` (``defi_jax.nn.attention`` takes no bias); the padding mask goes in as a boolean mask.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import nn
from defi_jax.models.t5_tokenizer import T5Tokenizer  # noqa: F401  (re-exported: models.t5.T5Tokenizer)

_log = logging.getLogger(__name__)

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """transformers ``T5Config`` names (encoder part); defaults = t5-base (transformers' own default is t5-small)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"     # "relu" (t5) or "gated-gelu" (t5 v1.1 / flan-t5)
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        if self.dense_act_fn not in _ACTIVATIONS or len(self.feed_forward_proj.split("-")) > 2:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation for backwards compatibility
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


@functools.cache
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] bucket ids of ``key_pos - query_pos``, bidirectional, as T5 (float32 log, truncation)."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    # np.maximum only avoids log(0): those positions take the exact branch below
    large = max_exact + (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class _RMSNorm(nnx.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, rngs, dtype, param_dtype):
        self.weight = nn.param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(self.dtype or x.dtype)


class _Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool, *, rngs, dtype, param_dtype):
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.q = nn.linear(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.k = nn.linear(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.v = nn.linear(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.o = nn.linear(inner, cfg.d_model, axes=("heads", "embed"), **kw)
        if has_bias_table:
            self.relative_attention_bias = nn.param(rngs, nnx.initializers.normal(1.0),
                                                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                                                    (None, None), param_dtype)
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def __call__(self, x_BLD, bias_1NLL, mask_B11L):
        B, L, _ = x_BLD.shape
        split = lambda t: t.reshape(B, L, self.num_heads, self.d_kv)  # noqa: E731  -> B L N H
        q, k, v = split(self.q(x_BLD)), split(self.k(x_BLD)), split(self.v(x_BLD))
        out_BLNH = jax.nn.dot_product_attention(q, k, v, bias=bias_1NLL.astype(q.dtype), mask=mask_B11L,
                                                scale=1.0)
        return self.o(out_BLNH.reshape(B, L, self.num_heads * self.d_kv))


class _FeedForward(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        if cfg.is_gated_act:
            self.wi_0 = nn.linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
            self.wi_1 = nn.linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        else:
            self.wi = nn.linear(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        self.wo = nn.linear(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **kw)
        self.act = _ACTIVATIONS[cfg.dense_act_fn]
        self.gated = cfg.is_gated_act

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attn = _Attention(cfg, has_bias_table, **kw)
        self.ffn_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.ffn = _FeedForward(cfg, **kw)

    def __call__(self, x_BLD, bias_1NLL, mask_B11L):
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), bias_1NLL, mask_B11L)
        return x_BLD + self.ffn(self.ffn_norm(x_BLD))


class T5Encoder(nnx.Module):
    """``t5(input_ids[B, L], attention_mask[B, L] = None) -> last_hidden_state[B, L, d_model]``.

    The computation of transformers ``T5EncoderModel(...).last_hidden_state`` in inference mode
    (no dropout; DeFI keeps T5 frozen). Parameters: ``shared`` (the token embedding), ``blocks.N``,
    ``final_layer_norm``.
    """

    def __init__(self, config: T5Config = T5Config(), *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        c = self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.shared = nn.param(rngs, nnx.initializers.normal(1.0), (c.vocab_size, c.d_model), ("vocab", "embed"),
                               param_dtype)
        self.blocks = nnx.List([_Block(c, i == 0, **kw) for i in range(c.num_layers)])
        self.final_layer_norm = _RMSNorm(c.d_model, c.layer_norm_epsilon, **kw)
        self.dtype = dtype

    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        B, L = input_ids.shape
        x_BLD = self.shared[...][input_ids]
        if self.dtype is not None:
            x_BLD = x_BLD.astype(self.dtype)
        buckets_LL = relative_position_buckets(L, c.relative_attention_num_buckets, c.relative_attention_max_distance)
        bias_1NLL = self.blocks[0].attn.relative_attention_bias[...][buckets_LL].transpose(2, 0, 1)[None]
        if attention_mask is None:
            mask_B11L = None
        else:
            mask_B11L = (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        for block in self.blocks:
            x_BLD = block(x_BLD, bias_1NLL, mask_B11L)
        return self.final_layer_norm(x_BLD)


class InstructionEmbedder:
    """T5 embeddings of instruction strings, computed once per unique string (host-side cache).

    ``embedder(texts) -> (emb[B, max_length, d_model] float32 numpy, mask[B, max_length] int32 numpy)``.
    New strings are tokenized, padded to ``max_length`` and run through one jitted encoder call per
    ``batch_size`` of them (fixed shapes: one compilation); each string's valid token states are kept in
    a dict. Rows are zero past each instruction's tokens. Because T5 attention is bidirectional with a
    padding mask and a relative (not absolute) position bias, the valid-token states equal those of the
    reference (which pads to the longest instruction in its batch). Instructions longer than
    ``max_length`` tokens are truncated (keeping ``</s>``) with a warning.
    """

    def __init__(self, encoder: T5Encoder, tokenizer, *, max_length: int = 32, batch_size: int = 32):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.cache: dict[str, np.ndarray] = {}
        self._forward = nnx.jit(lambda m, ids, mask: m(ids, mask))

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    def _fill(self, texts: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            padded = chunk + [""] * (self.batch_size - len(chunk))  # keep one compiled batch shape
            ids, mask = self.tokenizer(padded, max_length=self.max_length)
            for t, n in zip(chunk, self.tokenizer.lengths(chunk)):
                if n > self.max_length:
                    _log.warning("instruction of %d tokens truncated to max_length=%d: %r", n, self.max_length, t)
            out = np.asarray(jax.device_get(self._forward(self.encoder, jnp.asarray(ids), jnp.asarray(mask))))
            for row, t in enumerate(chunk):
                self.cache[t] = out[row, :int(mask[row].sum())].astype(np.float32)

    def __call__(self, texts: Sequence[str]):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self._fill(texts)
        emb = np.zeros((len(texts), self.max_length, self.width), np.float32)
        mask = np.zeros((len(texts), self.max_length), np.int32)
        for row, t in enumerate(texts):
            e = self.cache[t]
            emb[row, :len(e)] = e
            mask[row, :len(e)] = 1
        return emb, mask
