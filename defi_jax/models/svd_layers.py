"""Building blocks shared by the Stable Video Diffusion UNet and VAE (diffusers' layer names).

Every class mirrors one diffusers module and keeps its attribute names (``norm1``, ``conv1``,
``time_emb_proj``, ``to_q``, ``to_out[0]``, ``ff.net[0].proj``, ...), so that the interop table in
``defi_jax.interop.diffusers_svd`` is a handful of generic rename / transpose rules. Where diffusers keeps
a parameter-free module inside a ``ModuleList`` (``to_out[1]``, ``ff.net[1]`` dropouts), we keep an
``nnx.Dropout(0.0)`` placeholder at the same index for the same reason.

Layout: images ``[N, H, W, C]`` with ``N = B * T`` frames (frame-major within a video, as diffusers'
``sample.flatten(0, 1)``), videos ``[B, T, H, W, C]``, token sequences ``[B, L, C]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn


class _KeySequence:
    """Keys ``fold_in(key, 1), fold_in(key, 2), ...`` counted in Python, so nothing is written to a Variable."""

    def __init__(self, key: jax.Array):
        self.key, self.calls = key, 0

    def __call__(self) -> jax.Array:
        self.calls += 1
        return jax.random.fold_in(self.key, self.calls)


def trace_rngs(seed: int = 0) -> nnx.Rngs:
    """``nnx.Rngs`` for building a model INSIDE a trace (``nnx.eval_shape``, a jitted init).

    flax 0.12's ``RngStream`` writes its counter to a Variable on every key; under a trace each write asks
    the tracer for ``.sharding``, and jax answers with an error message whose provenance search walks the
    whole jaxpr: quadratic, 34 s for the 1.5 B UNet's 1,390 parameters, 5 s with this. Create it inside the
    traced function: ``nnx.eval_shape(lambda: UNetSpatioTemporal(cfg, rngs=trace_rngs(0)))``.
    """
    rngs = nnx.Rngs(seed)
    setattr(rngs, "default", _KeySequence(jax.random.key(seed)))  # every stream name falls back to default
    return rngs


def _pad(k: int) -> tuple[int, int]:
    return (k // 2, k // 2)


def timestep_embedding(t_N: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, diffusers' ``get_timestep_embedding``; float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args_NH = t_N.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args_NH), jnp.cos(args_NH)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection (diffusers ``Timesteps``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def __call__(self, t_N: jax.Array) -> jax.Array:
        return timestep_embedding(t_N, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None, *, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = nn.linear(in_channels, time_embed_dim, axes=("embed", "mlp"), **mk)
        self.linear_2 = nn.linear(time_embed_dim, out_dim or time_embed_dim, axes=("mlp", "embed"), **mk)

    def __call__(self, x_ND: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x_ND)))


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=1`` pads both sides; ``padding=0`` pads right/bottom only (VAE encoder)."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1, *, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        pad = ((padding, padding),) * 2 if padding else ((0, 1),) * 2
        self.conv = nn.conv(channels, out_channels or channels, 3, strides=2, padding=pad, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        return self.conv(x_NHWC)


def nearest_resize(x_NHWC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch ``F.interpolate(mode="nearest")`` to an explicit size: source index floor(dst * in / out)."""
    h, w = x_NHWC.shape[1:3]
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x_NHWC, 2, axis=1), 2, axis=2)
    rows = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x_NHWC[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest x2 (or to ``output_size``) then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.conv = nn.conv(channels, out_channels or channels, 3, padding=(_pad(3),) * 2, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x_NHWC: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        h, w = x_NHWC.shape[1:3]
        x_NHWC = nearest_resize(x_NHWC, output_size or (2 * h, 2 * w))
        return self.conv(x_NHWC)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, time embedding added between; 1x1 conv shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int | None, temb_channels: int | None, eps: float = 1e-6, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        out_channels = out_channels or in_channels
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = nn.group_norm(in_channels, 32, epsilon=eps, **mk)
        self.conv1 = nn.conv(in_channels, out_channels, 3, padding=(_pad(3),) * 2, **mk)
        self.time_emb_proj = (nn.linear(temb_channels, out_channels, axes=("embed", "conv_out"), **mk)
                              if temb_channels else None)
        self.norm2 = nn.group_norm(out_channels, 32, epsilon=eps, **mk)
        self.conv2 = nn.conv(out_channels, out_channels, 3, padding=(_pad(3),) * 2, **mk)
        self.conv_shortcut = (nn.conv(in_channels, out_channels, 1, padding="VALID", **mk)
                              if in_channels != out_channels else None)

    def __call__(self, x_NHWC: jax.Array, temb_ND: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_NHWC)))
        if self.time_emb_proj is not None and temb_ND is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb_ND))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x_NHWC = self.conv_shortcut(x_NHWC)
        return x_NHWC + h


class TemporalResnetBlock(nnx.Module):
    """ResnetBlock2D's temporal twin: (3, 1, 1) convs over frames; GroupNorm statistics span T, H, W."""

    def __init__(self, in_channels: int, out_channels: int | None, temb_channels: int | None, eps: float = 1e-6, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        out_channels = out_channels or in_channels
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        tpad = ((1, 1), (0, 0), (0, 0))
        self.norm1 = nn.group_norm(in_channels, 32, epsilon=eps, **mk)
        self.conv1 = nn.conv(in_channels, out_channels, (3, 1, 1), padding=tpad, **mk)
        self.time_emb_proj = (nn.linear(temb_channels, out_channels, axes=("embed", "conv_out"), **mk)
                              if temb_channels else None)
        self.norm2 = nn.group_norm(out_channels, 32, epsilon=eps, **mk)
        self.conv2 = nn.conv(out_channels, out_channels, (3, 1, 1), padding=tpad, **mk)
        self.conv_shortcut = (nn.conv(in_channels, out_channels, (1, 1, 1), padding="VALID", **mk)
                              if in_channels != out_channels else None)

    def __call__(self, x_BTHWC: jax.Array, temb_BTD: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BTHWC)))
        if self.time_emb_proj is not None and temb_BTD is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb_BTD))[:, :, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x_BTHWC = self.conv_shortcut(x_BTHWC)
        return x_BTHWC + h


class AlphaBlender(nnx.Module):
    """Learned mix of a spatial and a temporal branch: ``a * spatial + (1 - a) * temporal``, a = sigmoid(mix_factor).

    ``switch_spatial_to_temporal_mix`` (the temporal VAE decoder) uses ``1 - a`` instead. Our models always
    run on videos (diffusers' ``image_only_indicator`` is all zeros), where "learned" and
    "learned_with_images" coincide.
    """

    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images",
                 switch_spatial_to_temporal_mix: bool = False, *, param_dtype=jnp.float32):
        if merge_strategy not in ("learned", "learned_with_images"):
            raise ValueError(f"merge_strategy {merge_strategy!r} is not supported (learned, learned_with_images)")
        self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
        self.mix_factor = nnx.Param(jnp.full((1,), alpha, param_dtype), out_sharding=("norm",))

    def __call__(self, x_spatial: jax.Array, x_temporal: jax.Array) -> jax.Array:
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32)).astype(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class SpatioTemporalResBlock(nnx.Module):
    """Per-frame ResnetBlock2D, then a TemporalResnetBlock across frames, blended by a learned AlphaBlender."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 eps: float = 1e-6, temporal_eps: float | None = None, merge_factor: float = 0.5,
                 merge_strategy: str = "learned_with_images", switch_spatial_to_temporal_mix: bool = False, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        cout = out_channels or in_channels
        self.spatial_res_block = ResnetBlock2D(in_channels, cout, temb_channels, eps, **mk)
        self.temporal_res_block = TemporalResnetBlock(cout, cout, temb_channels,
                                                      eps if temporal_eps is None else temporal_eps, **mk)
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy, switch_spatial_to_temporal_mix,
                                       param_dtype=param_dtype)

    def __call__(self, x_NHWC: jax.Array, temb_ND: jax.Array | None, num_frames: int) -> jax.Array:
        h_NHWC = self.spatial_res_block(x_NHWC, temb_ND)
        n, hh, ww, c = h_NHWC.shape
        h_BTHWC = h_NHWC.reshape(n // num_frames, num_frames, hh, ww, c)  # frames are contiguous per video
        temb_BTD = None if temb_ND is None else temb_ND.reshape(n // num_frames, num_frames, -1)
        t_BTHWC = self.temporal_res_block(h_BTHWC, temb_BTD)
        return self.time_mixer(h_BTHWC, t_BTHWC).reshape(n, hh, ww, c)


class Attention(nnx.Module):
    """Multi-head (cross-)attention, diffusers ``Attention`` with the default processor.

    Inputs ``[N, L, C]`` or images ``[N, H, W, C]`` (flattened to H*W tokens). ``context`` may have a
    smaller batch than the queries when every group of ``N // context_batch`` consecutive query rows shares
    one context (frames of a video sharing a text embedding): the rows are then folded into the sequence,
    which is exactly diffusers' per-frame ``repeat_interleave`` of the context without repeating it.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, out_bias: bool = True, norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 implementation: str | None = None):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.residual_connection = residual_connection
        self.implementation = implementation
        self.group_norm = nn.group_norm(query_dim, norm_num_groups, epsilon=eps, **mk) if norm_num_groups else None
        self.to_q = nn.linear(query_dim, inner, use_bias=bias, axes=("embed", "heads"), **mk)
        kv_dim = cross_attention_dim or query_dim
        self.to_k = nn.linear(kv_dim, inner, use_bias=bias, axes=("embed", "heads"), **mk)
        self.to_v = nn.linear(kv_dim, inner, use_bias=bias, axes=("embed", "heads"), **mk)
        # [1] is diffusers' dropout, kept so parameter paths match ``to_out.0``.
        self.to_out = nnx.List([nn.linear(inner, query_dim, use_bias=out_bias, axes=("heads", "embed"), **mk),
                                nnx.Dropout(0.0)])

    def __call__(self, x: jax.Array, context_BSD: jax.Array | None = None) -> jax.Array:
        residual = x
        shape = x.shape
        x_NLC = x.reshape(shape[0], -1, shape[-1])
        if self.group_norm is not None:
            x_NLC = self.group_norm(x_NLC)
        n, length, _ = x_NLC.shape
        if context_BSD is not None and context_BSD.shape[0] != n:
            b = context_BSD.shape[0]
            if n % b:
                raise ValueError(f"query batch {n} is not a multiple of the context batch {b}")
            x_NLC = x_NLC.reshape(b, (n // b) * length, -1)  # fold frame rows into the query sequence
        kv = x_NLC if context_BSD is None else context_BSD
        q = self.to_q(x_NLC)
        k, v = self.to_k(kv), self.to_v(kv)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)  # noqa: E731  [B, L, N, H]
        impl = self.implementation
        if impl == "cudnn" and (self.dim_head > 128 or q.dtype not in (jnp.float16, jnp.bfloat16)):
            impl = None  # cuDNN flash attention takes half precision and head_dim <= 128 (the VAE's is 512)
        o = nn.attention(split(q), split(k), split(v), implementation=impl)
        o = self.to_out[0](o.reshape(*o.shape[:2], -1))
        o = o.reshape(shape)
        return o + residual if self.residual_connection else o


class GEGLU(nnx.Module):
    """proj to 2x width; first half times exact GELU of the second half."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.proj = nn.linear(dim_in, 2 * dim_out, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU feed-forward, ``net = [GEGLU, dropout placeholder, Linear]`` as in diffusers."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = int(dim * mult)
        self.net = nnx.List([GEGLU(dim, inner, **mk), nnx.Dropout(0.0),
                             nn.linear(inner, dim_out or dim, axes=("mlp", "embed"), **mk)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))
