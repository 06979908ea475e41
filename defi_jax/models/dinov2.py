"""DINOv2 ViT with registers (transformers ``Dinov2WithRegistersModel``) in Flax NNX, channels-last.

DeFI's GIDM encodes frames with the frozen ``dinov2_vitb14_reg`` (ViT-B/14, 4 registers, trained at 518 px)
on 224 px inputs, whose position table is resized to 16 x 16 patches by antialiased bicubic interpolation
exactly as transformers / torch-hub do. The GIDM consumes the normalized patch tokens
(``x_norm_patchtokens`` in torch-hub terms)::

    dino = hf_dinov2.load("/ckpt/dinov2-with-registers-base")      # or load_torch_hub_state_dict(...)
    x_BHWC = normalize_imagenet(frames_in_0_1)                       # [B, 224, 224, 3]
    tokens = dino(x_BHWC)                                            # [B, 1 + 4 + 256, 768]
    patches_BND = dino.patch_tokens(tokens)                          # [B, 256, 768]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """transformers ``Dinov2WithRegistersConfig`` names; defaults = facebook/dinov2-with-registers-base.

    ``image_size`` is the size the position table was trained for (518 -> 37 x 37 positions); other input
    sizes interpolate it. A tiny CPU config trained from scratch is just a small instance of this class.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    num_register_tokens: int = 4
    use_swiglu_ffn: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.use_swiglu_ffn:
            raise NotImplementedError("use_swiglu_ffn=True (ViT-g) is not implemented")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def normalize_imagenet(x_BHWC):
    """[0, 1] RGB -> ImageNet mean/std normalized input (what DeFI's ``dino_transform`` does)."""
    return (x_BHWC - jnp.asarray(IMAGENET_MEAN, x_BHWC.dtype)) / jnp.asarray(IMAGENET_STD, x_BHWC.dtype)


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.cache
def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch ``interpolate(mode="bicubic", antialias=True, align_corners=False)``.

    Same rule as torch's (PIL-derived) antialiased kernel: the support widens by the scale when
    downsampling, the cubic uses a = -0.5, weights are renormalized over the in-range taps.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic_aa((np.arange(lo, hi) - center + 0.5) * invscale)
        total = taps.sum()
        w[i, lo:hi] = taps / total if total != 0 else taps
    return w.astype(np.float32)


class _Attention(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = nn.linear(d, d, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.linear(d, d, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.linear(d, d, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x_BLD):
        B, L, D = x_BLD.shape
        split = lambda t: t.reshape(B, L, self.num_heads, D // self.num_heads)  # noqa: E731  -> B L N H
        out_BLNH = nn.attention(split(self.q_proj(x_BLD)), split(self.k_proj(x_BLD)), split(self.v_proj(x_BLD)))
        return self.o_proj(out_BLNH.reshape(B, L, D))


class _Layer(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ones = nnx.initializers.constant(cfg.layerscale_value)
        self.norm1 = nn.layer_norm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.attention = _Attention(cfg, **kw)
        self.layer_scale1 = nn.param(rngs, ones, (cfg.hidden_size,), ("norm",), param_dtype)
        self.norm2 = nn.layer_norm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.mlp = nn.Mlp(cfg.hidden_size, cfg.mlp_hidden, _ACTIVATIONS[cfg.hidden_act], **kw)
        self.layer_scale2 = nn.param(rngs, ones, (cfg.hidden_size,), ("norm",), param_dtype)

    def __call__(self, x_BLD):
        x_BLD = x_BLD + self.attention(self.norm1(x_BLD)) * self.layer_scale1[...]
        return x_BLD + self.mlp(self.norm2(x_BLD)) * self.layer_scale2[...]


class Dinov2(nnx.Module):
    """``dino(pixel_values[B, H, W, C]) -> last_hidden_state[B, 1 + registers + patches, hidden_size]``.

    Token order as transformers: [CLS, register_1..R, patch_1..P] (patches row-major), final layer norm
    applied to all tokens. ``pixel_values`` are already normalized (see :func:`normalize_imagenet`);
    H and W are cut down to multiples of ``patch_size`` by the patch convolution, as in torch.
    Inference only (no drop-path / dropout; DeFI keeps DINOv2 frozen).
    """

    def __init__(self, config: Dinov2Config = Dinov2Config(), *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        c = self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = c.hidden_size
        tn = nnx.initializers.truncated_normal(0.02)
        zeros = nnx.initializers.zeros_init()
        self.cls_token = nn.param(rngs, tn, (1, 1, d), (None, None, "embed"), param_dtype)
        self.mask_token = nn.param(rngs, zeros, (1, d), (None, "embed"), param_dtype)
        self.register_tokens = nn.param(rngs, zeros, (1, c.num_register_tokens, d), (None, None, "embed"),
                                        param_dtype)
        self.position_embeddings = nn.param(rngs, tn, (1, c.grid * c.grid + 1, d), (None, None, "embed"),
                                            param_dtype)
        self.patch_embeddings = nn.conv(c.num_channels, d, c.patch_size, strides=c.patch_size, padding="VALID",
                                        kernel_init=tn, **kw)
        self.layers = nnx.List([_Layer(c, **kw) for _ in range(c.num_hidden_layers)])
        self.layernorm = nn.layer_norm(d, epsilon=c.layer_norm_eps, **kw)
        self.dtype = dtype

    def _positions(self, gh: int, gw: int):
        """Position table for a gh x gw patch grid: [1, 1 + gh * gw, D]."""
        pos = self.position_embeddings[...]
        n = self.config.grid
        if (gh, gw) == (n, n):
            return pos
        grid_HWD = pos[0, 1:].reshape(n, n, -1).astype(jnp.float32)
        grid_HWD = jnp.einsum("oh,hwd->owd", bicubic_aa_matrix(n, gh), grid_HWD,
                              precision=jax.lax.Precision.HIGHEST)
        grid_HWD = jnp.einsum("pw,owd->opd", bicubic_aa_matrix(n, gw), grid_HWD,
                              precision=jax.lax.Precision.HIGHEST)
        return jnp.concatenate([pos[:, :1], grid_HWD.reshape(1, gh * gw, -1).astype(pos.dtype)], axis=1)

    def __call__(self, pixel_values):
        c = self.config
        if pixel_values.shape[-1] != c.num_channels:
            raise ValueError(f"pixel_values must be channels-last with {c.num_channels} channels, "
                             f"got shape {pixel_values.shape}")
        B, H, W, _ = pixel_values.shape
        x = pixel_values if self.dtype is None else pixel_values.astype(self.dtype)
        patches_BhwD = self.patch_embeddings(x)
        gh, gw = patches_BhwD.shape[1:3]
        x_BLD = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (B, 1, c.hidden_size)).astype(x.dtype),
                                 patches_BhwD.reshape(B, gh * gw, -1)], axis=1)
        x_BLD = x_BLD + self._positions(gh, gw).astype(x_BLD.dtype)
        regs = jnp.broadcast_to(self.register_tokens[...], (B, c.num_register_tokens, c.hidden_size))
        # registers go after CLS and carry no position embedding
        x_BLD = jnp.concatenate([x_BLD[:, :1], regs.astype(x_BLD.dtype), x_BLD[:, 1:]], axis=1)
        for layer in self.layers:
            x_BLD = layer(x_BLD)
        return self.layernorm(x_BLD)

    def patch_tokens(self, last_hidden_BLD):
        """The normalized patch tokens (torch-hub ``x_norm_patchtokens``): [B, patches, D]."""
        return last_hidden_BLD[:, 1 + self.config.num_register_tokens:]
