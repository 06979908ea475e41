"""Video Former: the 3D Perceiver that turns one-step GFDM features into 224 policy tokens.

The reference's ``Video_Former_3D`` (Step3_DeFI/policy_models/module/Video_Former.py). Shapes with the
released sizes (every one is a constructor argument):

    feats_BTNC     [B, 16, 512, 2560]  GFDM features per predicted frame: static 256 + gripper 256 tokens
    goal_emb       2560 -> 768 -> GELU -> 384, then + time_pos_emb [16, 1, 384] (one vector per frame)
    latents_TQD    [16, 14, 384]       learned queries, 14 per frame
    x depth (6):
      cross_attn     per frame: LN(feats), LN(queries); q from queries, k/v from [feats ; queries],
                     8 heads x 64 (512 inner), no biases, out 512 -> 384
      temporal_attn  per query index across the 16 frames: fused qkv 384 -> 1152 (bias), 8 heads x 48,
                     proj with bias; no pre-norm, no positions, bidirectional
      ffn            LN -> 384 -> 1536 (no bias) -> GELU -> 384 (no bias)
      (a residual around each)
    norm           final LayerNorm
    tokens_BSD     [B, 224, 384]        token index = frame * 14 + query

The reference builds the temporal attention with an all-ones additive float mask: it shifts every logit
by 1 and changes nothing, so it is not reproduced. Parameter names map to the reference's through the
small table in ``defi_jax.interop.defi_policy`` (``layers.{i}.cross_attn`` is its ``layers.{i}.0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn
from defi_jax.sharding import constrain


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)   # torch nn.GELU() is the erf form


class PerceiverAttention(nnx.Module):
    """Queries of one frame attend to that frame's features and to themselves."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, rngs: nnx.Rngs):
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_media = nn.layer_norm(dim, rngs=rngs)
        self.norm_latents = nn.layer_norm(dim, rngs=rngs)
        self.to_q = nn.linear(dim, inner, rngs=rngs, axes=("embed", "heads"), use_bias=False)
        self.to_k = nn.linear(dim, inner, rngs=rngs, axes=("embed", "heads"), use_bias=False)
        self.to_v = nn.linear(dim, inner, rngs=rngs, axes=("embed", "heads"), use_bias=False)
        self.to_out = nn.linear(inner, dim, rngs=rngs, axes=("heads", "embed"), use_bias=False)

    def __call__(self, feats_bND: jax.Array, latents_bQD: jax.Array) -> jax.Array:
        b, Q, _ = latents_bQD.shape
        H, Dh = self.heads, self.dim_head
        feats_bND = self.norm_media(feats_bND)
        latents_bQD = self.norm_latents(latents_bQD)
        kv_in_bSD = jnp.concatenate([feats_bND, latents_bQD], axis=1)   # S = N + Q
        S = kv_in_bSD.shape[1]
        q_bQHd = self.to_q(latents_bQD).reshape(b, Q, H, Dh)
        k_bSHd = self.to_k(kv_in_bSD).reshape(b, S, H, Dh)
        v_bSHd = self.to_v(kv_in_bSD).reshape(b, S, H, Dh)
        out_bQHd = nn.attention(q_bQHd, k_bSHd, v_bSHd)
        return self.to_out(out_bQHd.reshape(b, Q, H * Dh))


class TemporalAttention(nnx.Module):
    """Self-attention across frames for each query index (the reference's ``Attention``, fused qkv)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"Video Former width {dim} is not divisible by temporal_heads={heads}")
        self.heads = heads
        self.qkv = nn.linear(dim, 3 * dim, rngs=rngs, axes=("embed", "heads"))
        self.proj = nn.linear(dim, dim, rngs=rngs, axes=("heads", "embed"))

    def __call__(self, x_bTD: jax.Array) -> jax.Array:
        b, T, D = x_bTD.shape
        H = self.heads
        # Output channels are ordered (3, H, D/H), as the reference's reshape reads them.
        qkv_bT3Hd = self.qkv(x_bTD).reshape(b, T, 3, H, D // H)
        q_bTHd, k_bTHd, v_bTHd = (qkv_bT3Hd[:, :, i] for i in range(3))
        return self.proj(nn.attention(q_bTHd, k_bTHd, v_bTHd).reshape(b, T, D))


class VideoFormerLayer(nnx.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, temporal_heads: int, ff_mult: int, *,
                 rngs: nnx.Rngs):
        self.cross_attn = PerceiverAttention(dim, heads, dim_head, rngs=rngs)
        self.temporal_attn = TemporalAttention(dim, temporal_heads, rngs=rngs)
        # Sequential indices 0 / 1 / 3 as in the reference's feed_forward_layer.
        self.ffn = nnx.Sequential(
            nn.layer_norm(dim, rngs=rngs),
            nn.linear(dim, ff_mult * dim, rngs=rngs, axes=("embed", "mlp"), use_bias=False), _gelu,
            nn.linear(ff_mult * dim, dim, rngs=rngs, axes=("mlp", "embed"), use_bias=False))

    def __call__(self, x_BTQD: jax.Array, feats_BTND: jax.Array) -> jax.Array:
        B, T, Q, D = x_BTQD.shape
        x_bQD = x_BTQD.reshape(B * T, Q, D)   # b = (B T): per frame
        x_bQD = x_bQD + self.cross_attn(feats_BTND.reshape(B * T, -1, D), x_bQD)
        x_bTD = x_bQD.reshape(B, T, Q, D).transpose(0, 2, 1, 3).reshape(B * Q, T, D)   # b = (B Q): per query
        x_bTD = x_bTD + self.temporal_attn(x_bTD)
        x_BTQD = x_bTD.reshape(B, Q, T, D).transpose(0, 2, 1, 3)
        return constrain(x_BTQD + self.ffn(x_BTQD), ("batch", None, None, "embed"))


class VideoFormer(nnx.Module):
    """GFDM features [B, num_frames, N, condition_dim] -> tokens [B, num_frames * queries_per_frame, dim]."""

    def __init__(self, *, dim: int = 384, depth: int = 6, condition_dim: int = 2560, num_frames: int = 16,
                 queries_per_frame: int = 14, heads: int = 8, dim_head: int = 64, temporal_heads: int | None = None,
                 ff_mult: int = 4, num_time_embeds: int | None = None, rngs: nnx.Rngs):
        self.num_frames = num_frames
        temporal_heads = heads if temporal_heads is None else temporal_heads   # one ``heads`` in the reference
        num_time_embeds = num_frames if num_time_embeds is None else num_time_embeds
        if num_time_embeds < num_frames:
            raise ValueError(f"Video Former: num_time_embeds={num_time_embeds} < num_frames={num_frames}")
        self.goal_emb = nnx.Sequential(
            nn.linear(condition_dim, 2 * dim, rngs=rngs, axes=(None, "mlp")), _gelu,
            nn.linear(2 * dim, dim, rngs=rngs, axes=("mlp", "embed")))
        randn = jax.random.normal
        self.latents = nn.param(rngs, randn, (num_frames, queries_per_frame, dim), (None, None, "embed"))
        self.time_pos_emb = nn.param(rngs, randn, (num_time_embeds, 1, dim), (None, None, "embed"))
        self.layers = nnx.List([VideoFormerLayer(dim, heads, dim_head, temporal_heads, ff_mult, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nn.layer_norm(dim, rngs=rngs)

    def __call__(self, feats_BTNC: jax.Array) -> jax.Array:
        B, T, N, _ = feats_BTNC.shape
        if T != self.num_frames:
            raise ValueError(f"Video Former built for {self.num_frames} frames, got features of {T} frames")
        feats_BTND = self.goal_emb(feats_BTNC) + self.time_pos_emb[:T][None]   # [1, T, 1, D] per frame
        feats_BTND = constrain(feats_BTND, ("batch", None, None, "embed"))
        latents_TQD = self.latents[...].astype(feats_BTND.dtype)
        x_BTQD = jnp.broadcast_to(latents_TQD[None], (B, *latents_TQD.shape))
        for layer in self.layers:
            x_BTQD = layer(x_BTQD, feats_BTND)
        _, _, Q, D = x_BTQD.shape
        return self.norm(x_BTQD.reshape(B, T * Q, D))
