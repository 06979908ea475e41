"""Stable Video Diffusion's spatio-temporal UNet (diffusers ``UNetSpatioTemporalConditionModel``) in Flax NNX.

Same structure, attribute names and defaults as diffusers, channels-last::

    unet = UNetSpatioTemporal(UNetConfig(), rngs=nnx.Rngs(0))             # 1,524,623,082 parameters
    out_BTHWC = unet(sample_BTHWC, timestep_B, encoder_hidden_states_BLD, added_time_ids_B3)
    feats = unet.up_block_features(sample_BTHWC, timestep_B, ehs_BLD, ati_B3, num_up_blocks=2)
    # == unet(..., num_up_blocks=2): [up_blocks[0] output, up_blocks[1] output], each [B, T, h, w, C]

``encoder_hidden_states`` is one sequence per video ([B, L, D]); diffusers repeats it per frame, which
gives the same result. ``added_time_ids`` are (fps, motion_bucket_id, noise_aug_strength) per video.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn
from defi_jax.models.svd_layers import (AlphaBlender, Attention, Downsample2D, FeedForward,
                                        SpatioTemporalResBlock, TimestepEmbedding, Timesteps, Upsample2D, _pad)

_DOWN_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
_UP_TYPES = ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")


@dataclasses.dataclass
class UNetConfig:
    """diffusers ``UNetSpatioTemporalConditionModel`` config: same field names and defaults (SVD img2vid)."""

    sample_size: int | None = None
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                       "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int | tuple[int, ...] = 1024
    transformer_layers_per_block: int | tuple[Any, ...] = 1
    num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """From a diffusers ``config.json`` dict; private keys (``_class_name``, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"UNetConfig: unknown config keys {unknown}")
        kw = {k: _tuplify(v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        return {k: _listify(v) for k, v in dataclasses.asdict(self).items()}

    def per_block(self) -> dict[str, list]:
        """Per-down-block lists of heads, cross-attention dims, layers and transformer layers; validated."""
        n = len(self.down_block_types)
        if len(self.up_block_types) != n:
            raise ValueError(f"up_block_types {self.up_block_types} must have {n} entries like down_block_types")
        if len(self.block_out_channels) != n:
            raise ValueError(f"block_out_channels {self.block_out_channels} must have {n} entries")
        for key in ("num_attention_heads", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
            v = getattr(self, key)
            if not isinstance(v, int) and len(v) != n:
                raise ValueError(f"{key}={v} must be an int or have {n} entries")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"down block type {t!r} is not supported ({_DOWN_TYPES})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"up block type {t!r} is not supported ({_UP_TYPES})")
        rep = lambda v: [v] * n if isinstance(v, int) else list(v)  # noqa: E731
        return dict(heads=rep(self.num_attention_heads), cross=rep(self.cross_attention_dim),
                    layers=rep(self.layers_per_block), tlayers=rep(self.transformer_layers_per_block))


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list | tuple) else v


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, list | tuple) else v


def _per_layer(tlayers, num_layers: int) -> list[int]:
    return [tlayers] * num_layers if isinstance(tlayers, int) else list(tlayers)


class BasicTransformerBlock(nnx.Module):
    """Per-frame block: self-attention, cross-attention to the text, GEGLU feed-forward (pre-LayerNorm)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *, rngs, dtype, param_dtype,
                 attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = nn.layer_norm(dim, **mk)
        self.attn1 = Attention(dim, None, heads, head_dim, implementation=attention_impl, **mk)
        self.norm2 = nn.layer_norm(dim, **mk)
        self.attn2 = Attention(dim, cross_attention_dim, heads, head_dim, implementation=attention_impl, **mk)
        self.norm3 = nn.layer_norm(dim, **mk)
        self.ff = FeedForward(dim, **mk)

    def __call__(self, h_NLC: jax.Array, context_BSD: jax.Array) -> jax.Array:
        h_NLC = self.attn1(self.norm1(h_NLC)) + h_NLC
        h_NLC = self.attn2(self.norm2(h_NLC), context_BSD) + h_NLC
        return self.ff(self.norm3(h_NLC)) + h_NLC


class TemporalBasicTransformerBlock(nnx.Module):
    """The same block run along frames: every spatial position of a video is one sequence of T tokens."""

    def __init__(self, dim: int, time_mix_inner_dim: int, heads: int, head_dim: int, cross_attention_dim: int, *,
                 rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.is_res = dim == time_mix_inner_dim
        self.norm_in = nn.layer_norm(dim, **mk)
        self.ff_in = FeedForward(dim, time_mix_inner_dim, **mk)
        self.norm1 = nn.layer_norm(time_mix_inner_dim, **mk)
        self.attn1 = Attention(time_mix_inner_dim, None, heads, head_dim, implementation=attention_impl, **mk)
        self.norm2 = nn.layer_norm(time_mix_inner_dim, **mk)
        self.attn2 = Attention(time_mix_inner_dim, cross_attention_dim, heads, head_dim,
                               implementation=attention_impl, **mk)
        self.norm3 = nn.layer_norm(time_mix_inner_dim, **mk)
        self.ff = FeedForward(time_mix_inner_dim, **mk)

    def __call__(self, h_NLC: jax.Array, num_frames: int, context_BSD: jax.Array) -> jax.Array:
        n, length, c = h_NLC.shape
        b = n // num_frames
        # [B*T, HW, C] -> [B*HW, T, C]: attention runs across frames at each position
        h = h_NLC.reshape(b, num_frames, length, c).transpose(0, 2, 1, 3).reshape(b * length, num_frames, c)
        residual = h
        h = self.ff_in(self.norm_in(h))
        if self.is_res:
            h = h + residual
        h = self.attn1(self.norm1(h)) + h
        h = self.attn2(self.norm2(h), context_BSD) + h  # every position of video b reads b's context
        ff = self.ff(self.norm3(h))
        h = ff + h if self.is_res else ff
        c = h.shape[-1]
        return h.reshape(b, length, num_frames, c).transpose(0, 2, 1, 3).reshape(n, length, c)


class TransformerSpatioTemporalModel(nnx.Module):
    """GroupNorm, proj_in, [spatial block, temporal block (+ frame-index embedding), learned mix] x layers, proj_out."""

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
                 cross_attention_dim: int | None = None, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        blk = dict(mk, attention_impl=attention_impl)
        inner = num_attention_heads * attention_head_dim
        self.norm = nn.group_norm(in_channels, 32, epsilon=1e-6, **mk)
        self.proj_in = nn.linear(in_channels, inner, axes=("embed", "embed"), **mk)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim, **blk)
            for _ in range(num_layers)])
        self.temporal_transformer_blocks = nnx.List([
            TemporalBasicTransformerBlock(inner, inner, num_attention_heads, attention_head_dim, cross_attention_dim,
                                          **blk)
            for _ in range(num_layers)])
        self.time_pos_embed = TimestepEmbedding(in_channels, in_channels * 4, out_dim=in_channels, **mk)
        self.time_proj = Timesteps(in_channels, True, 0)
        self.time_mixer = AlphaBlender(0.5, "learned_with_images", param_dtype=param_dtype)
        self.proj_out = nn.linear(inner, in_channels, axes=("embed", "embed"), **mk)

    def __call__(self, x_NHWC: jax.Array, context_BSD: jax.Array, num_frames: int) -> jax.Array:
        n, hh, ww, c = x_NHWC.shape
        b = n // num_frames
        residual = x_NHWC
        h = self.proj_in(self.norm(x_NHWC).reshape(n, hh * ww, c))  # [B*T, HW, inner]
        frame_idx_N = jnp.tile(jnp.arange(num_frames), b)
        emb_N1C = self.time_pos_embed(self.time_proj(frame_idx_N).astype(h.dtype))[:, None, :]
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = block(h, context_BSD)
            h_mix = temporal_block(h + emb_N1C, num_frames, context_BSD)
            h = self.time_mixer(h, h_mix)
        return self.proj_out(h).reshape(n, hh, ww, c) + residual


_UNIT_HOOK: contextvars.ContextVar = contextvars.ContextVar("svd_unet_unit_hook", default=None)


@contextlib.contextmanager
def unit_hook(fn):
    """Routes every res-block / transformer call of the UNet (its remat units) through
    ``fn(layer, remat, args, static) -> output`` while the context is open (in this thread).

    ``defi_jax.aot``'s per-block compile uses it to record the units and stand in for them; nothing else should.
    """
    token = _UNIT_HOOK.set(fn)
    try:
        yield
    finally:
        _UNIT_HOOK.reset(token)


def _run(layer, remat: bool, *args, **static):
    """``layer(*args, **static)``, under ``nnx.remat`` (activations recomputed in the backward pass) if asked."""
    hook = _UNIT_HOOK.get()
    if hook is not None:
        return hook(layer, remat, args, static)
    if not remat:
        return layer(*args, **static)
    return nnx.remat(lambda m, *a: m(*a, **static))(layer, *args)


class _Block(nnx.Module):
    """Shared plumbing of the down / mid / up blocks (resnets, optional attentions)."""

    remat: bool = False

    def _resnet(self, i: int, h, temb, num_frames):
        return _run(self.resnets[i], self.remat, h, temb, num_frames=num_frames)

    def _attend(self, i: int, h, context_BSD, num_frames):
        if self.attentions is None:
            return h
        return _run(self.attentions[i], self.remat, h, context_BSD, num_frames=num_frames)


class DownBlockSpatioTemporal(_Block):
    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, *, cross: bool,
                 heads=1, cross_attention_dim=1280, transformer_layers=1, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # diffusers: eps 1e-6 in the cross-attention down blocks, 1e-5 in the plain one
        eps = 1e-6 if cross else 1e-5
        self.resnets = nnx.List([SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels,
                                                        temb_channels, eps, **mk) for i in range(num_layers)])
        tl = _per_layer(transformer_layers, num_layers)
        self.attentions = nnx.List([
            TransformerSpatioTemporalModel(heads, out_channels // heads, out_channels, tl[i], cross_attention_dim,
                                           attention_impl=attention_impl, **mk)
            for i in range(num_layers)]) if cross else None
        self.downsamplers = nnx.List([Downsample2D(out_channels, out_channels, padding=1, **mk)]) \
            if add_downsample else None

    def __call__(self, h, temb, context_BSD, num_frames):
        outputs = []
        for i in range(len(self.resnets)):
            h = self._attend(i, self._resnet(i, h, temb, num_frames), context_BSD, num_frames)
            outputs.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            outputs.append(h)
        return h, outputs


class UNetMidBlockSpatioTemporal(_Block):
    def __init__(self, in_channels, temb_channels, num_layers=1, transformer_layers=1, heads=1,
                 cross_attention_dim=1280, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        tl = _per_layer(transformer_layers, num_layers)
        self.resnets = nnx.List([SpatioTemporalResBlock(in_channels, in_channels, temb_channels, 1e-5, **mk)
                                 for _ in range(num_layers + 1)])
        self.attentions = nnx.List([
            TransformerSpatioTemporalModel(heads, in_channels // heads, in_channels, tl[i], cross_attention_dim,
                                           attention_impl=attention_impl, **mk)
            for i in range(num_layers)])

    def __call__(self, h, temb, context_BSD, num_frames):
        h = self._resnet(0, h, temb, num_frames)
        for i in range(len(self.attentions)):
            h = self._resnet(i + 1, self._attend(i, h, context_BSD, num_frames), temb, num_frames)
        return h


class UpBlockSpatioTemporal(_Block):
    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, add_upsample, *,
                 cross: bool, heads=1, cross_attention_dim=1280, transformer_layers=1, rngs, dtype, param_dtype,
                 attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channel if i == 0 else out_channels
            resnets.append(SpatioTemporalResBlock(cin + skip, out_channels, temb_channels, 1e-6, **mk))
        self.resnets = nnx.List(resnets)
        tl = _per_layer(transformer_layers, num_layers)
        self.attentions = nnx.List([
            TransformerSpatioTemporalModel(heads, out_channels // heads, out_channels, tl[i], cross_attention_dim,
                                           attention_impl=attention_impl, **mk)
            for i in range(num_layers)]) if cross else None
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **mk)]) if add_upsample else None

    def __call__(self, h, skips, temb, context_BSD, num_frames, upsample_size=None):
        skips = list(skips)
        for i in range(len(self.resnets)):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self._attend(i, self._resnet(i, h, temb, num_frames), context_BSD, num_frames)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class UNetSpatioTemporal(nnx.Module):
    """SVD's UNet. Call: ``unet(sample[B,T,H,W,Cin], timestep[B] | scalar, encoder_hidden_states[B,L,D],
    added_time_ids[B,3], num_up_blocks=None) -> [B,T,H,W,Cout]``.

    With ``num_up_blocks=k`` the network stops after ``up_blocks[k-1]`` and returns the list of the first k up
    blocks' outputs (each ``[B, T, h, w, C]``, after the block's upsampler, as diffusers' up block returns it).
    ``dtype`` is the compute dtype (None: from inputs/params), ``param_dtype`` the parameters', and
    ``attention_impl`` goes to ``jax.nn.dot_product_attention`` (None: XLA; "cudnn": flash attention on GPU).
    ``remat=True`` recomputes every res-block's and transformer's activations in the backward pass (memory
    for the full model at 16 frames); numerics are unchanged.
    """

    def __init__(self, config: UNetConfig | None = None, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_impl: str | None = None, remat: bool = False):
        cfg = self.config = config or UNetConfig()
        pb = cfg.per_block()
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        blk = dict(mk, attention_impl=attention_impl)
        self.dtype = dtype
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        if cfg.projection_class_embeddings_input_dim != 3 * cfg.addition_time_embed_dim:
            # diffusers would fail at call time; fail at construction with the keys named
            raise ValueError(f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim} "
                             f"must be 3 * addition_time_embed_dim={cfg.addition_time_embed_dim}")

        self.conv_in = nn.conv(cfg.in_channels, ch[0], 3, padding=(_pad(3),) * 2, **mk)
        self.time_proj = Timesteps(ch[0], True, 0)
        self.time_embedding = TimestepEmbedding(ch[0], temb, **mk)
        self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, True, 0)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb, **mk)

        down, out_c = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_c, out_c = out_c, ch[i]
            down.append(DownBlockSpatioTemporal(
                in_c, out_c, temb, pb["layers"][i], i < len(ch) - 1, cross=kind.startswith("CrossAttn"),
                heads=pb["heads"][i], cross_attention_dim=pb["cross"][i], transformer_layers=pb["tlayers"][i], **blk))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlockSpatioTemporal(ch[-1], temb, 1, pb["tlayers"][-1], pb["heads"][-1],
                                                    pb["cross"][-1], **blk)

        rch = list(reversed(ch))
        rev = {k: list(reversed(v)) for k, v in pb.items()}
        up, out_c = [], rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_c = out_c, rch[i]
            in_c = rch[min(i + 1, len(ch) - 1)]
            up.append(UpBlockSpatioTemporal(
                in_c, prev, out_c, temb, rev["layers"][i] + 1, i < len(ch) - 1, cross=kind.startswith("CrossAttn"),
                heads=rev["heads"][i], cross_attention_dim=rev["cross"][i], transformer_layers=rev["tlayers"][i],
                **blk))
        self.up_blocks = nnx.List(up)

        for block in (*self.down_blocks, self.mid_block, *self.up_blocks):
            block.remat = remat
        self.conv_norm_out = nn.group_norm(ch[0], 32, epsilon=1e-5, **mk)
        self.conv_out = nn.conv(ch[0], cfg.out_channels, 3, padding=(_pad(3),) * 2, **mk)

    def __call__(self, sample_BTHWC: jax.Array, timestep, encoder_hidden_states_BLD: jax.Array,
                 added_time_ids_B3: jax.Array, *, num_up_blocks: int | None = None):
        b, t, hh, ww, c = sample_BTHWC.shape
        if num_up_blocks is not None and not 1 <= num_up_blocks <= len(self.up_blocks):
            raise ValueError(f"num_up_blocks={num_up_blocks} must be in [1, {len(self.up_blocks)}]")
        if encoder_hidden_states_BLD.shape[0] != b or added_time_ids_B3.shape[0] != b:
            raise ValueError(f"encoder_hidden_states {encoder_hidden_states_BLD.shape} and added_time_ids "
                             f"{added_time_ids_B3.shape} need one row per video (batch {b}), not per frame")
        dtype = self.dtype or sample_BTHWC.dtype
        ts_B = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))

        emb = self.time_embedding(self.time_proj(ts_B).astype(dtype))
        add_emb = self.add_time_proj(added_time_ids_B3.reshape(-1)).reshape(b, -1).astype(emb.dtype)
        emb = emb + self.add_embedding(add_emb)
        emb_ND = jnp.repeat(emb, t, axis=0)  # one row per frame, frames contiguous per video
        ctx = encoder_hidden_states_BLD.astype(dtype)

        h = self.conv_in(sample_BTHWC.reshape(b * t, hh, ww, c).astype(dtype))
        skips = [h]
        for block in self.down_blocks:
            h, res = block(h, emb_ND, ctx, t)
            skips.extend(res)
        h = self.mid_block(h, emb_ND, ctx, t)

        factor = 2 ** (len(self.up_blocks) - 1)
        forward_size = hh % factor != 0 or ww % factor != 0
        feats = []
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            is_final = i == len(self.up_blocks) - 1
            size = tuple(skips[-1].shape[1:3]) if forward_size and not is_final else None
            h = block(h, res, emb_ND, ctx, t, size)
            if num_up_blocks is not None:
                feats.append(h.reshape(b, t, *h.shape[1:]))
                if len(feats) == num_up_blocks:
                    return feats

        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        return h.reshape(b, t, *h.shape[1:])

    def up_block_features(self, sample_BTHWC, timestep, encoder_hidden_states_BLD, added_time_ids_B3,
                          num_up_blocks: int = 2) -> list[jax.Array]:
        """Outputs of ``up_blocks[0..k-1]`` (DeFI's one-step features use k=2); runs nothing after them."""
        return self(sample_BTHWC, timestep, encoder_hidden_states_BLD, added_time_ids_B3,
                    num_up_blocks=num_up_blocks)


def count_params(module: nnx.Module) -> int:
    """Number of parameter scalars (works on ``nnx.eval_shape`` abstract modules too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


__all__ = ["UNetConfig", "UNetSpatioTemporal", "count_params"]
