"""CLIP text tower (transformers ``CLIPTextModel``) in Flax NNX, and DeFI's text conditioning.

DeFI conditions the GFDM on CLIP ViT-B/32 text features: the instruction is tokenized to exactly 20 tokens
(``padding="max_length", truncation=True, max_length=20``), the text tower runs on those 20 tokens with
their attention mask, and ``last_hidden_state`` [B, 20, 512] is concatenated with itself on channels to
[B, 20, 1024], which replaces SVD's CLIP image embedding as ``encoder_hidden_states``
(reference: ``Diffusion_feature_extractor.encode_text`` / ``train_svd.encode_text``; their optional
sin-cos position encoding is off in the released configs).

    from defi_jax.interop import hf_clip
    from defi_jax.models.clip_tokenizer import CLIPTokenizer
    from defi_jax.models.clip_text import defi_text_condition

    encoder = hf_clip.load_text_encoder("/ckpt/clip-vit-base-patch32")
    tokenizer = CLIPTokenizer.from_folder("/ckpt/clip-vit-base-patch32")
    ids, mask = tokenizer(["pick up the red block"], max_length=20)
    cond_BLD = defi_text_condition(encoder(ids, mask))           # [1, 20, 1024]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import nn

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` field names; defaults = openai/clip-vit-base-patch32's text tower."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512          # kept for round trips; the projection head is not part of this model
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")


class _Attention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = nn.linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = nn.linear(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = nn.linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = nn.linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x_BLD, mask_BNLS):
        B, L, D = x_BLD.shape
        split = lambda t: t.reshape(B, L, self.num_heads, D // self.num_heads)  # noqa: E731  -> B L N H
        out_BLNH = nn.attention(split(self.q_proj(x_BLD)), split(self.k_proj(x_BLD)), split(self.v_proj(x_BLD)),
                                mask=mask_BNLS)
        return self.out_proj(out_BLNH.reshape(B, L, D))


class _Layer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = nn.layer_norm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.self_attn = _Attention(cfg, **kw)
        self.layer_norm2 = nn.layer_norm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = nn.Mlp(cfg.hidden_size, cfg.intermediate_size, _ACTIVATIONS[cfg.hidden_act], **kw)

    def __call__(self, x_BLD, mask_BNLS):
        x_BLD = x_BLD + self.self_attn(self.layer_norm1(x_BLD), mask_BNLS)
        return x_BLD + self.mlp(self.layer_norm2(x_BLD))


class CLIPTextEncoder(nnx.Module):
    """``text_encoder(input_ids[B, L], attention_mask=None) -> last_hidden_state[B, L, hidden_size]``.

    Same computation as transformers ``CLIPTextModel(...).last_hidden_state``: token + position
    embeddings, pre-LN transformer with a causal mask (combined with the padding mask when given),
    final layer norm. ``L`` may be anything up to ``max_position_embeddings``. Inference only (no dropout;
    CLIP's attention dropout is 0 and DeFI keeps the text tower frozen).

    ``with_projection=True`` adds ``text_projection`` (``CLIPTextModelWithProjection``; not counted in the
    63,165,952) for :meth:`text_embeds`, the pooled sentence embedding (e.g. a policy's language goal token).
    """

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig(), *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, with_projection: bool = False):
        c = self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nn.param(rngs, init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), param_dtype)
        self.position_embedding = nn.param(rngs, init, (c.max_position_embeddings, c.hidden_size),
                                           ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([_Layer(c, **kw) for _ in range(c.num_hidden_layers)])
        self.final_layer_norm = nn.layer_norm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.with_projection = with_projection
        if with_projection:
            self.text_projection = nn.linear(c.hidden_size, c.projection_dim, axes=("embed", None), use_bias=False,
                                             **kw)
        self.dtype = dtype

    def __call__(self, input_ids, attention_mask=None):
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} > max_position_embeddings {self.config.max_position_embeddings}")
        x_BLD = self.token_embedding[...][input_ids] + self.position_embedding[...][:L][None]
        if self.dtype is not None:
            x_BLD = x_BLD.astype(self.dtype)
        mask_BNLS = jnp.tril(jnp.ones((L, L), bool))[None, None]
        if attention_mask is not None:
            mask_BNLS = mask_BNLS & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        for layer in self.layers:
            x_BLD = layer(x_BLD, mask_BNLS)
        return self.final_layer_norm(x_BLD)

    def pooled(self, input_ids, last_hidden_BLD):
        """transformers' ``pooler_output``: the state at the first ``eos_token_id`` of each row."""
        if self.config.eos_token_id == 2:  # legacy configs: the highest token id marks the end of text
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_BLD, idx[:, None, None], axis=1)[:, 0]

    def text_embeds(self, input_ids, attention_mask=None):
        """``CLIPTextModelWithProjection(...).text_embeds``: [B, projection_dim] (needs ``with_projection``)."""
        if not self.with_projection:
            raise ValueError("text_embeds needs a CLIPTextEncoder built with with_projection=True")
        return self.text_projection(self.pooled(input_ids, self(input_ids, attention_mask)))


def defi_text_condition(hidden_BLD, num_tokens: int = 20, position_encode: bool = False):
    """DeFI's GFDM conditioning from CLIP ``last_hidden_state``: ``[B, num_tokens, 2 * D]``.

    The reference tokenizes to exactly ``num_tokens`` (20) and runs the text tower on them; pass that
    output here. A longer output (e.g. 77 tokens) is cut to its first ``num_tokens``, which is identical for
    instructions that fit (CLIP attention is causal), but differs from the reference for longer ones
    (the reference truncates so that the 20th token is end-of-text). ``position_encode`` adds the
    reference's optional 1D sin-cos table (off in DeFI's released configs) before the channel doubling.
    """
    L = hidden_BLD.shape[1]
    if L < num_tokens:
        raise ValueError(f"text hidden states have {L} tokens, fewer than num_tokens={num_tokens}; "
                         f"tokenize with max_length={num_tokens}")
    h_BLD = hidden_BLD[:, :num_tokens]
    if position_encode:
        h_BLD = h_BLD + jnp.asarray(sincos_1d(h_BLD.shape[-1], num_tokens), h_BLD.dtype)[None]
    return jnp.concatenate([h_BLD, h_BLD], axis=-1)


def sincos_1d(dim: int, length: int) -> np.ndarray:
    """[length, dim] table: sin of the first dim/2 frequencies, then cos (MAE-style, as the reference)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)
