"""GIDM: the latent action model of DeFI stage 2 (UniVLA-style, ``UncontrolledDINOLatentActionModel``).

A frame pair (o_t, o_{t+n}) goes through a frozen visual encoder (DINOv2-B/14-reg patch tokens). Four
learnable action queries are prepended to each frame's patches, the projected instruction tokens are
appended, and a spatio-temporal transformer (spatial attention within a frame, causal temporal attention
across the two frames) encodes them. The second frame's four query outputs are projected to the latent
size and vector-quantized: these are the latent actions. A spatial transformer decoder sees
[latent actions ; current frame's patches ; instruction] and predicts the future frame's patch features.

Module and parameter names mirror the reference (``encoder.transformer_blocks.3.spatial_attn.to_q``,
``decoder.ffn.1``, ``vq.codebook``, ...) so that ``defi_jax.interop.defi_torch.load_gidm`` is a table.
``nnx.Sequential`` keeps the reference's ``nn.Sequential`` indices (``ffn.0``/``ffn.3``, ``to_out.0``).

The tiny CPU configuration swaps the frozen encoders for a patch embedding trained from scratch and a
byte-level token embedding, and predicts normalized pixel patches of the future frame instead of its
DINO features (a from-scratch encoder predicting its own features would collapse); with
``residual_target`` the decoder output is added to the current frame's target, so from the first step it
only has to model what changed, and its output layer starts at zero so that training starts from "copy
the current frame" (the reference has no such residual: off in ``defi``). With ``action_to_patches``
(tiny only) the latent actions are also projected and added to every decoder patch token: through
attention alone a small decoder learns what the current frame predicts long before it reads the tokens.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import nn
from defi_jax.gidm.vq import VectorQuantizer
from defi_jax.models.byte_tokenizer import GIDM_BYTES_VOCAB_SIZE
from defi_jax.sharding import constrain

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_ACTION_QUERIES = 4


def sinusoid_table(length: int, dim: int) -> np.ndarray:
    """The reference's ``PositionalEncoding``: sin on even channels, cos on odd ones, [length, dim]."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * -(math.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(position * div)
    table[:, 1::2] = np.cos(position * div)
    return table


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)   # torch nn.GELU() is the erf form


def _identity(x):
    return x


class SelfAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None):
        if dim % num_heads:
            raise ValueError(f"model width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.linear(dim, dim, rngs=rngs, axes=("embed", "heads"), use_bias=False, dtype=dtype)
        self.to_k = nn.linear(dim, dim, rngs=rngs, axes=("embed", "heads"), use_bias=False, dtype=dtype)
        self.to_v = nn.linear(dim, dim, rngs=rngs, axes=("embed", "heads"), use_bias=False, dtype=dtype)
        # Sequential keeps the reference's ``to_out.0`` name (its index 1 is a rate-0 dropout).
        self.to_out = nnx.Sequential(nn.linear(dim, dim, rngs=rngs, axes=("heads", "embed"), dtype=dtype))

    def __call__(self, x_BLC: jax.Array, *, mask_BS: jax.Array | None = None, is_causal: bool = False,
                 implementation: str | None = None) -> jax.Array:
        B, L, C = x_BLC.shape
        H = self.num_heads
        q_BLNH, k_BLNH, v_BLNH = (f(x_BLC).reshape(B, L, H, C // H) for f in (self.to_q, self.to_k, self.to_v))
        mask = None if mask_BS is None else mask_BS[:, None, None, :]   # keys only, like the reference
        out_BLNH = nn.attention(q_BLNH, k_BLNH, v_BLNH, mask=mask, is_causal=is_causal,
                                implementation=implementation)
        return self.to_out(out_BLNH.reshape(B, L, C))


def _feed_forward(dim: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.Sequential:
    # Indices 0 and 3 as in the reference's Sequential(Linear, GELU, Dropout, Linear).
    return nnx.Sequential(nn.linear(dim, 4 * dim, rngs=rngs, axes=("embed", "mlp"), dtype=dtype), _gelu,
                          _identity, nn.linear(4 * dim, dim, rngs=rngs, axes=("mlp", "embed"), dtype=dtype))


class SpatioTemporalBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None):
        self.spatial_attn = SelfAttention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.temporal_attn = SelfAttention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.ffn = _feed_forward(dim, rngs=rngs, dtype=dtype)
        self.norm1 = nn.layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm2 = nn.layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm3 = nn.layer_norm(dim, rngs=rngs, dtype=dtype)

    def __call__(self, x_BTSC, *, mask_bS=None, causal_temporal: bool = True, implementation=None):
        B, T, S, C = x_BTSC.shape
        x_bSC = x_BTSC.reshape(B * T, S, C)   # b = (B T): attention within each frame
        x_bSC = x_bSC + self.spatial_attn(self.norm1(x_bSC), mask_BS=mask_bS, implementation=implementation)
        x_bTC = x_bSC.reshape(B, T, S, C).transpose(0, 2, 1, 3).reshape(B * S, T, C)   # b = (B S): across time
        x_bTC = x_bTC + self.temporal_attn(self.norm2(x_bTC), is_causal=causal_temporal,
                                           implementation=implementation)
        x_BTSC = x_bTC.reshape(B, S, T, C).transpose(0, 2, 1, 3)
        x_BTSC = constrain(x_BTSC + self.ffn(self.norm3(x_BTSC)), ("batch", None, None, "embed"))
        return x_BTSC


class SpatioBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None):
        self.spatial_attn = SelfAttention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.ffn = _feed_forward(dim, rngs=rngs, dtype=dtype)
        self.norm1 = nn.layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm2 = nn.layer_norm(dim, rngs=rngs, dtype=dtype)

    def __call__(self, x_BTSC, *, mask_bS=None, implementation=None):
        B, T, S, C = x_BTSC.shape
        x_bSC = x_BTSC.reshape(B * T, S, C)
        x_bSC = x_bSC + self.spatial_attn(self.norm1(x_bSC), mask_BS=mask_bS, implementation=implementation)
        x_BTSC = x_bSC.reshape(B, T, S, C)
        return constrain(x_BTSC + self.ffn(self.norm2(x_BTSC)), ("batch", None, None, "embed"))


class _Transformer(nnx.Module):
    """Shared body of the reference's SpatioTemporalTransformer / SpatioTransformer."""

    def __init__(self, in_dim: int, dim: int, out_dim: int | None, num_blocks: int, num_heads: int, *,
                 rngs: nnx.Rngs, temporal: bool, dtype=None, remat: bool = False):
        self.ffn = nnx.Sequential(nn.layer_norm(in_dim, rngs=rngs, dtype=dtype),
                                  nn.linear(in_dim, dim, rngs=rngs, axes=("embed", "mlp"), dtype=dtype),
                                  nn.layer_norm(dim, rngs=rngs, dtype=dtype))
        block = SpatioTemporalBlock if temporal else SpatioBlock
        self.transformer_blocks = nnx.List([block(dim, num_heads, rngs=rngs, dtype=dtype)
                                            for _ in range(num_blocks)])
        # The encoder has ``to_out=False`` in the reference (nn.Identity): no ``out`` parameters.
        self.out = None if out_dim is None else nn.linear(dim, out_dim, rngs=rngs, axes=("embed", "mlp"),
                                                          dtype=dtype)
        self.temporal = temporal
        self.remat = remat

    def __call__(self, x_BTSC, lang_BTLC=None, *, mask_bS=None, implementation=None):
        x_BTSC = self.ffn(x_BTSC)
        # Positions index tokens within a frame; the same table for every frame (time order comes from
        # the causal mask). Instruction tokens get none, as in the reference.
        x_BTSC = x_BTSC + jnp.asarray(sinusoid_table(x_BTSC.shape[2], x_BTSC.shape[3]), x_BTSC.dtype)
        if lang_BTLC is not None:
            x_BTSC = jnp.concatenate([x_BTSC, lang_BTLC.astype(x_BTSC.dtype)], axis=2)
        x_BTSC = constrain(x_BTSC, ("batch", None, None, "embed"))
        for block in self.transformer_blocks:
            kwargs = {"mask_bS": mask_bS, "implementation": implementation}
            if self.remat:
                x_BTSC = nnx.remat(lambda blk, x: blk(x, **kwargs))(block, x_BTSC)
            else:
                x_BTSC = block(x_BTSC, **kwargs)
        return x_BTSC if self.out is None else self.out(x_BTSC)


class PatchEncoder(nnx.Module):
    """Tiny-config visual encoder trained from scratch: one strided conv, ``[B,H,W,3] -> [B,N,D]``."""

    def __init__(self, patch_size: int, dim: int, *, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nn.conv(3, dim, patch_size, strides=patch_size, padding="VALID", rngs=rngs)
        self.norm = nn.layer_norm(dim, rngs=rngs)

    def __call__(self, pixels_BHWC):
        x_BhwD = self.proj(pixels_BHWC)
        B, h, w, D = x_BhwD.shape
        return self.norm(x_BhwD.reshape(B, h * w, D))


class ByteTextEncoder(nnx.Module):
    """Tiny-config instruction encoder: a trainable embedding over UTF-8 bytes (id = byte + 1, 0 = pad; the ids of
    ``defi_jax.models.byte_tokenizer.gidm_bytes``)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(GIDM_BYTES_VOCAB_SIZE, dim, rngs=rngs,
                               # unsplit: a 257-row table; splitting it made XLA fully rematerialize the
                               # looked-up tokens on tensor-parallel meshes
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None)))

    def __call__(self, input_ids_BL, attention_mask_BL):
        return self.embed(input_ids_BL)


def patchify(pixels_BHWC: jax.Array, patch: int) -> jax.Array:
    B, H, W, C = pixels_BHWC.shape
    h, w = H // patch, W // patch
    x = pixels_BHWC[:, :h * patch, :w * patch].reshape(B, h, patch, w, patch, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, h * w, patch * patch * C)   # [B, N, (p p C)]


class LatentActionModel(nnx.Module):
    """The GIDM. ``config`` is ``config.model`` of ``configs/gidm.py`` (see its docstring for keys); ``dtype`` the
    compute dtype of its layers (None: the parameters'; the stage passes ``config.train.compute_dtype``)."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=None):
        c = config
        self.visual_encoder_kind = c.visual_encoder
        self.text_encoder_kind = c.text_encoder
        self.target_kind = c.target
        self.patch_size = c.patch_size
        self.latent_dim = c.latent_dim
        self.reference_mask_order = bool(c.get("reference_mask_order", False))
        self.residual_target = bool(c.get("residual_target", False))
        self.attention_impl = c.get("attention_impl", None) or None

        if c.visual_encoder == "dinov2":
            from defi_jax.models.dinov2 import Dinov2, Dinov2Config
            dcfg = Dinov2Config(**dict(c.get("dino", {})))
            self.dino_encoder = Dinov2(dcfg, rngs=rngs)
            self.num_skip_tokens = 1 + int(getattr(dcfg, "num_register_tokens", 4))
            feature_dim = int(getattr(dcfg, "hidden_size", c.feature_dim))
        elif c.visual_encoder == "patch":
            self.dino_encoder = PatchEncoder(c.patch_size, c.feature_dim, rngs=rngs)
            self.num_skip_tokens = 0
            feature_dim = c.feature_dim
        else:
            raise ValueError(f"model.visual_encoder={c.visual_encoder!r} must be 'dinov2' or 'patch'")
        if feature_dim != c.feature_dim:
            raise ValueError(f"model.feature_dim={c.feature_dim} but the visual encoder is {feature_dim} wide")

        if c.text_encoder == "t5":
            from defi_jax.models.t5 import T5Config, T5Encoder
            tcfg = T5Config(**dict(c.get("t5", {})))
            self.text_encoder = T5Encoder(tcfg, rngs=rngs)
        elif c.text_encoder == "bytes":
            self.text_encoder = ByteTextEncoder(c.text_dim, rngs=rngs)
        else:
            raise ValueError(f"model.text_encoder={c.text_encoder!r} must be 't5' or 'bytes'")

        if c.target == "features":
            target_dim = c.feature_dim
        elif c.target == "pixels":
            target_dim = c.patch_size * c.patch_size * 3
        else:
            raise ValueError(f"model.target={c.target!r} must be 'features' or 'pixels'")
        self.target_dim = target_dim

        d, q = c.model_dim, NUM_ACTION_QUERIES
        self.action_latent = nn.param(rngs, lambda k, s, t: jax.random.uniform(k, s, t, -1.0, 1.0),
                                      (1, 1, q, c.feature_dim), (None, None, None, "embed"))
        self.encoder = _Transformer(c.feature_dim, d, None, c.enc_blocks, c.num_heads, rngs=rngs, temporal=True,
                                    dtype=dtype, remat=c.get("remat", False))
        self.to_codebook = nn.linear(d, c.latent_dim, rngs=rngs, axes=("embed", None), dtype=dtype)
        self.vq = VectorQuantizer(c.num_latents, c.latent_dim, rngs=rngs, restart_every=c.vq_restart_every,
                                  restart_from=c.vq_restart_from)
        self.patch_up = nn.linear(c.feature_dim, d, rngs=rngs, axes=("embed", "mlp"), dtype=dtype)
        self.action_up = nn.linear(c.latent_dim, d, rngs=rngs, axes=(None, "embed"), dtype=dtype)
        self.decoder = _Transformer(d, d, target_dim, c.dec_blocks, c.num_heads, rngs=rngs, temporal=False,
                                    dtype=dtype, remat=c.get("remat", False))
        if self.residual_target:
            # The residual decoder starts at "copy the current frame" (zero output) instead of spending its
            # first steps unlearning a random output of the size of the target.
            self.decoder.out.kernel[...] = jnp.zeros_like(self.decoder.out.kernel[...])
        self.lang_proj = nn.linear(c.text_dim, d, rngs=rngs, axes=("embed", "mlp"), dtype=dtype)
        # Tiny (not in the reference): every patch token of the decoder also gets the latent actions added,
        # a direct path from the tokens to each predicted patch (see ``decode``).
        self.action_to_patches = (nn.linear(q * c.latent_dim, d, rngs=rngs, axes=(None, "embed"), dtype=dtype)
                                  if c.get("action_to_patches", False) else None)

    # -- inputs -------------------------------------------------------------------------------------
    def encode_frames(self, frames_BTHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """uint8 frames -> (encoder inputs [B,T,N,Dv], targets [B,T,N,Dt]); DINO outputs carry no grads."""
        B, T, H, W, C = frames_BTHWC.shape
        x = frames_BTHWC.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x_bHWC = x.reshape(B * T, H, W, C)
        if self.visual_encoder_kind == "dinov2":
            hidden = self.dino_encoder(x_bHWC)
            feats_bNC = jax.lax.stop_gradient(hidden[:, self.num_skip_tokens:])   # normalized patch tokens
        else:
            feats_bNC = self.dino_encoder(x_bHWC)
        feats_BTNC = feats_bNC.reshape(B, T, *feats_bNC.shape[1:])
        if self.target_kind == "features":
            target = jax.lax.stop_gradient(feats_BTNC)
        else:
            p = patchify(x_bHWC, self.patch_size)
            target = p.reshape(B, T, *p.shape[1:])
        return feats_BTNC, target

    def encode_text(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array) -> jax.Array:
        """Raw instruction encoder output [B,L,text_dim] (frozen T5 in the full model)."""
        out = self.text_encoder(input_ids_BL, attention_mask_BL)
        out = getattr(out, "last_hidden_state", out)
        return jax.lax.stop_gradient(out) if self.text_encoder_kind == "t5" else out

    # -- the latent action model on features ---------------------------------------------------------
    def _masks(self, text_mask_BL: jax.Array, num_tokens: int, T: int) -> tuple[jax.Array, jax.Array]:
        B = text_mask_BL.shape[0]
        full_BS = jnp.concatenate([jnp.ones((B, num_tokens), bool), text_mask_BL > 0], axis=1)
        if self.reference_mask_order:
            # The reference builds the encoder mask with ``mask.repeat(T, 1)`` ([(T B), S]) but applies it
            # to ``(B T)``-ordered frames: row b*T + t gets the mask of sample (b*T + t) % B.
            rows = (jnp.arange(B)[:, None] * T + jnp.arange(T)[None, :]) % B
            enc_bS = full_BS[rows.reshape(-1)]
        else:
            enc_bS = jnp.repeat(full_BS, T, axis=0)   # [(B T), S]
        return enc_bS, full_BS

    def latent_actions(self, feats_BTNC, lang_BLD, text_mask_BL) -> jax.Array:
        """Pre-quantization latent actions of frames 1..T-1: [B, T-1, 4, latent_dim]."""
        B, T, N, _ = feats_BTNC.shape
        q = NUM_ACTION_QUERIES
        queries_BTQC = jnp.broadcast_to(self.action_latent[...].astype(feats_BTNC.dtype),
                                        (B, T, q, feats_BTNC.shape[-1]))
        tokens_BTSC = jnp.concatenate([queries_BTQC, feats_BTNC], axis=2)
        enc_mask_bS, _ = self._masks(text_mask_BL, q + N, T)
        lang_BTLD = jnp.broadcast_to(lang_BLD[:, None], (B, T, *lang_BLD.shape[1:]))
        z_BTSD = self.encoder(tokens_BTSC, lang_BTLD, mask_bS=enc_mask_bS, implementation=self.attention_impl)
        return self.to_codebook(z_BTSD[:, 1:, :q])

    def decode(self, feats_BNC, z_q_BQC, lang_BLD, text_mask_BL) -> jax.Array:
        """Predicted future-frame targets [B, N, target_dim] from the current frame and latent actions."""
        q, N = z_q_BQC.shape[1], feats_BNC.shape[1]
        patches_BND = self.patch_up(feats_BNC)
        if self.action_to_patches is not None:
            B = z_q_BQC.shape[0]
            patches_BND = patches_BND + self.action_to_patches(z_q_BQC.reshape(B, -1))[:, None]   # [B, 1, D]
        tokens_BSD = jnp.concatenate([self.action_up(z_q_BQC), patches_BND], axis=1)
        _, mask_BS = self._masks(text_mask_BL, q + N, 1)
        out_B1SD = self.decoder(tokens_BSD[:, None], lang_BLD[:, None], mask_bS=mask_BS,
                                implementation=self.attention_impl)
        return out_B1SD[:, 0, q:q + N]

    def forward_features(self, feats_BTNC, text_BLC, text_mask_BL, *, train: bool = False,
                         rng: jax.Array | None = None, shuffle_rng: jax.Array | None = None) -> dict:
        """Everything after the frozen encoders (what the parity test compares with the reference).

        ``shuffle_rng``: also decode with the latent actions permuted across the batch
        (``recon_shuffled``, no gradients) for the ``action_info_gap`` metric.
        """
        B, T = feats_BTNC.shape[:2]
        if T != 2:
            raise ValueError(f"GIDM takes frame pairs: got {T} frames")
        lang_BLD = self.lang_proj(text_BLC)
        z_e_BQC = self.latent_actions(feats_BTNC, lang_BLD, text_mask_BL)[:, 0]
        vq = self.vq(z_e_BQC, train=train, rng=rng)
        recon_BNC = self.decode(feats_BTNC[:, 0], vq["z_q"], lang_BLD, text_mask_BL)
        out = dict(vq, z_e=z_e_BQC, recon=recon_BNC)
        if shuffle_rng is not None:
            # A cyclic shift by a random offset in [1, B): no sample keeps its own latent action.
            perm = (jnp.arange(B) + jax.random.randint(shuffle_rng, (), 1, max(B, 2))) % B
            shuffled = self.decode(feats_BTNC[:, 0], jax.lax.stop_gradient(vq["z_q"])[perm], lang_BLD,
                                   text_mask_BL)
            out["recon_shuffled"] = jax.lax.stop_gradient(shuffled)
        return out

    def __call__(self, frames_BTHWC, input_ids_BL, attention_mask_BL, *, train: bool = False,
                 rng: jax.Array | None = None, shuffle_rng: jax.Array | None = None) -> dict:
        """uint8 frame pairs [B,2,H,W,3] + tokenized instructions -> dict with ``recon``, ``target``
        ([B,N,target_dim]), ``z_q``/``z_e`` ([B,4,latent_dim]), ``indices`` and the VQ losses/statistics."""
        feats_BTNC, target_BTNC = self.encode_frames(frames_BTHWC)
        text_BLC = self.encode_text(input_ids_BL, attention_mask_BL)
        out = self.forward_features(feats_BTNC, text_BLC, attention_mask_BL, train=train, rng=rng,
                                    shuffle_rng=shuffle_rng)
        out["target"] = target_BTNC[:, -1]
        if self.residual_target:
            # The decoder predicts the change: recon = current frame's target + decoder output.
            base = jax.lax.stop_gradient(target_BTNC[:, 0]).astype(out["recon"].dtype)
            out["recon"] = out["recon"] + base
            if "recon_shuffled" in out:
                out["recon_shuffled"] = out["recon_shuffled"] + base
        return out
