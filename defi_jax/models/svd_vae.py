"""SVD's VAE (diffusers ``AutoencoderKLTemporalDecoder``) in Flax NNX: a per-frame image encoder and a decoder
with temporal layers. Same structure and attribute names as diffusers, channels-last::

    vae = AutoencoderKLTemporalDecoder(VAEConfig.svd(), rngs=nnx.Rngs(0))     # 97,742,847 parameters
    z_Nhw4 = vae.encode(x_NHW3)                    # distribution mode (mean), NOT scaled by 0.18215
    mean, logvar = vae.encode_moments(x_NHW3)      # logvar clipped to [-30, 20] as diffusers
    z = vae.sample(mean, logvar, key)              # a posterior sample
    x_NHW3 = vae.decode(z_Nhw4, num_frames=T)      # N = B * T frames, frames contiguous per video

Images are in [-1, 1]; ``config.scaling_factor`` (0.18215) is for the diffusion model's latent space and
is not applied here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn
from defi_jax.models.svd_layers import Attention, Downsample2D, ResnetBlock2D, SpatioTemporalResBlock, Upsample2D, _pad


@dataclasses.dataclass
class VAEConfig:
    """diffusers ``AutoencoderKLTemporalDecoder`` config, same field names and defaults (its defaults are a
    one-block toy); ``VAEConfig.svd()`` is Stable Video Diffusion's."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @classmethod
    def svd(cls) -> "VAEConfig":
        return cls(down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, sample_size=768)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers ``config.json`` dict; private keys (``_class_name``, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"VAEConfig: unknown config keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_downsample, *, rngs, dtype, param_dtype):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, 1e-6, **mk)
                                 for i in range(num_layers)])
        # padding 0: diffusers pads right / bottom by one, then a valid stride-2 conv
        self.downsamplers = nnx.List([Downsample2D(out_channels, out_channels, padding=0, **mk)]) \
            if add_downsample else None

    def __call__(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return h if self.downsamplers is None else self.downsamplers[0](h)


class UNetMidBlock2D(nnx.Module):
    """resnet, single-head self-attention over H*W (GroupNorm inside, residual), resnet."""

    def __init__(self, channels, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, 1e-6, **mk) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, None, 1, channels, bias=True, norm_num_groups=32, eps=1e-6,
                                              residual_connection=True, implementation=attention_impl, **mk)])

    def __call__(self, h):
        h = self.resnets[0](h)
        return self.resnets[1](self.attentions[0](h))


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch = cfg.block_out_channels
        for t in cfg.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"VAE down block type {t!r} is not supported (DownEncoderBlock2D)")
        if len(cfg.down_block_types) != len(ch):
            raise ValueError(f"down_block_types {cfg.down_block_types} and block_out_channels {ch} differ in length")
        self.conv_in = nn.conv(cfg.in_channels, ch[0], 3, padding=(_pad(3),) * 2, **mk)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, **mk)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], attention_impl=attention_impl, **mk)
        self.conv_norm_out = nn.group_norm(ch[-1], 32, epsilon=1e-6, **mk)
        self.conv_out = nn.conv(ch[-1], 2 * cfg.latent_channels, 3, padding=(_pad(3),) * 2, **mk)

    def __call__(self, x_NHWC):
        h = self.conv_in(x_NHWC)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


def _decoder_resblock(cin, cout, mk):
    # Decoder res-blocks: no time embedding, temporal eps 1e-5, mix factor starts at 0, "1 - alpha" mixing.
    return SpatioTemporalResBlock(cin, cout, None, eps=1e-6, temporal_eps=1e-5, merge_factor=0.0,
                                  merge_strategy="learned", switch_spatial_to_temporal_mix=True, **mk)


class MidBlockTemporalDecoder(nnx.Module):
    def __init__(self, channels, num_layers, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([_decoder_resblock(channels, channels, mk) for _ in range(num_layers)])
        self.attentions = nnx.List([Attention(channels, None, 1, channels, bias=True, norm_num_groups=32, eps=1e-6,
                                              residual_connection=True, implementation=attention_impl, **mk)])

    def __call__(self, h, num_frames):
        h = self.resnets[0](h, None, num_frames)
        for resnet, attn in zip(self.resnets[1:], self.attentions):
            h = resnet(attn(h), None, num_frames)
        return h


class UpBlockTemporalDecoder(nnx.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_upsample, *, rngs, dtype, param_dtype):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([_decoder_resblock(in_channels if i == 0 else out_channels, out_channels, mk)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **mk)]) if add_upsample else None

    def __call__(self, h, num_frames):
        for resnet in self.resnets:
            h = resnet(h, None, num_frames)
        return h if self.upsamplers is None else self.upsamplers[0](h)


class TemporalDecoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype, attention_impl):
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch = cfg.block_out_channels
        self.conv_in = nn.conv(cfg.latent_channels, ch[-1], 3, padding=(_pad(3),) * 2, **mk)
        self.mid_block = MidBlockTemporalDecoder(ch[-1], cfg.layers_per_block, attention_impl=attention_impl, **mk)
        rch = list(reversed(ch))
        self.up_blocks = nnx.List([
            UpBlockTemporalDecoder(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, i < len(ch) - 1, **mk)
            for i in range(len(ch))])
        self.conv_norm_out = nn.group_norm(ch[0], 32, epsilon=1e-6, **mk)
        self.conv_out = nn.conv(ch[0], cfg.out_channels, 3, padding=(_pad(3),) * 2, **mk)
        self.time_conv_out = nn.conv(cfg.out_channels, cfg.out_channels, (3, 1, 1),
                                     padding=((1, 1), (0, 0), (0, 0)), **mk)

    def __call__(self, z_NHWC, num_frames):
        h = self.mid_block(self.conv_in(z_NHWC), num_frames)
        for block in self.up_blocks:
            h = block(h, num_frames)
        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        n, hh, ww, c = h.shape
        h = self.time_conv_out(h.reshape(n // num_frames, num_frames, hh, ww, c))  # conv across frames
        return h.reshape(n, hh, ww, c)


class AutoencoderKLTemporalDecoder(nnx.Module):
    """See the module docstring for the calling convention."""

    def __init__(self, config: VAEConfig | None = None, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_impl: str | None = None):
        cfg = self.config = config or VAEConfig()
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.encoder = Encoder(cfg, attention_impl=attention_impl, **mk)
        self.decoder = TemporalDecoder(cfg, attention_impl=attention_impl, **mk)
        self.quant_conv = nn.conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, padding="VALID", **mk)

    def encode_moments(self, x_NHW3: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior mean and log-variance (clipped to [-30, 20]), each [N, h, w, latent_channels]."""
        moments = self.quant_conv(self.encoder(x_NHW3.astype(self.dtype or x_NHW3.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x_NHW3: jax.Array) -> jax.Array:
        """Mode (= mean) of the posterior, unscaled: [N, H/8, W/8, 4] for the SVD config."""
        return self.encode_moments(x_NHW3)[0]

    @staticmethod
    def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A posterior sample ``mean + exp(logvar / 2) * eps``."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z_Nhw4: jax.Array, num_frames: int) -> jax.Array:
        """Frames [N, H, W, 3] from latents [N, h, w, 4]; N must be a multiple of ``num_frames``."""
        if z_Nhw4.shape[0] % num_frames:
            raise ValueError(f"{z_Nhw4.shape[0]} latents do not split into videos of num_frames={num_frames}")
        return self.decoder(z_Nhw4.astype(self.dtype or z_Nhw4.dtype), num_frames)

    def __call__(self, x_NHW3: jax.Array, num_frames: int = 1) -> jax.Array:
        """Reconstruction through the posterior mode (diffusers' ``forward`` with sample_posterior=False)."""
        return self.decode(self.encode(x_NHW3), num_frames)
