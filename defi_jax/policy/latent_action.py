"""The GIDM at fine-tuning: latent-action tokens from the GFDM's predicted frames.

In stage 3 the GIDM's DINOv2 encoder and its decoder are removed. The static view's one-step GFDM
features of two predicted frames (0 and 5) take DINO's place, through the policy's own MLP and a learned
2-frame time embedding; the stage-2 encoder, bottleneck and ``action_up`` then produce 4 tokens:

    feats_BTNC    [B, 16, 256, 2560]   static-view GFDM features (all predicted frames)
    frames        (0, 5)               -> [B, 2, 256, 2560]
    goal_emb      2560 -> 768 -> GELU -> 768, + time_pos_emb [2, 1, 768]   (widths fixed in the reference)
    lam           the stage-2 latent action encoder (``defi_jax.gidm.model.LatentActionModel``'s
                  ``latent_actions``): 4 action queries + 256 tokens + projected T5 tokens, 12
                  spatio-temporal blocks, causal in time; frame 1's 4 query outputs -> to_codebook 768 -> 128
                  -> VQ (16 x 128) -> action_up 128 -> 768
    tokens_BQE    [B, 4, 768]          (the LAM's model_dim) what the action head's ``tok_emb_token`` reads

The frozen T5 tower is not part of this module: ``__call__`` takes its ``last_hidden_state`` and mask
(the policy keeps its frozen text towers together). The VQ losses stay in the stage-3 loss
(``codebook_loss + 0.25 * commitment_loss``). Parameter names are the reference's ``goal_emb.{0,2}``,
``time_pos_emb`` and ``lam.*`` (stage-2 names, without decoder / patch_up / dino_encoder / text_encoder).
Imported reference checkpoints need ``reference_mask_order=True`` in the LAM config (the stage-3 copy of
the LAM has the stage-2 language-mask row-order quirk).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn
from defi_jax.gidm.model import NUM_ACTION_QUERIES, LatentActionModel, _Transformer
from defi_jax.gidm.vq import VectorQuantizer


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


class EncoderOnlyLatentActionModel(LatentActionModel):
    """The stage-2 ``LatentActionModel`` without its visual encoder, decoder and text tower.

    Builds only the parts stage 3 keeps (``action_latent``, ``encoder``, ``to_codebook``, ``vq``,
    ``action_up``, ``lang_proj``) and reuses the stage-2 ``latent_actions`` / masking code unchanged.
    ``config`` is a GIDM ``config.model`` (``configs/gidm.py``); its encoder / decoder / target keys are
    ignored. ``dtype``: the compute dtype of its layers (None: the parameters'), the policy's
    ``config.train.compute_dtype`` as for the GFDM.
    """

    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=None):   # noqa: D107 - not super().__init__
        c = config
        self.visual_encoder_kind = "none"
        self.text_encoder_kind = "none"
        self.latent_dim = c.latent_dim
        self.reference_mask_order = bool(c.get("reference_mask_order", False))
        self.attention_impl = c.get("attention_impl", None) or None
        self.action_latent = nn.param(rngs, lambda k, s, t: jax.random.uniform(k, s, t, -1.0, 1.0),
                                      (1, 1, NUM_ACTION_QUERIES, c.feature_dim), (None, None, None, "embed"))
        self.encoder = _Transformer(c.feature_dim, c.model_dim, None, c.enc_blocks, c.num_heads, rngs=rngs,
                                    temporal=True, dtype=dtype, remat=c.get("remat", False))
        self.to_codebook = nn.linear(c.model_dim, c.latent_dim, rngs=rngs, axes=("embed", None), dtype=dtype)
        self.vq = VectorQuantizer(c.num_latents, c.latent_dim, rngs=rngs, restart_every=c.vq_restart_every,
                                  restart_from=c.vq_restart_from)
        self.action_up = nn.linear(c.latent_dim, c.model_dim, rngs=rngs, axes=(None, "embed"), dtype=dtype)
        self.lang_proj = nn.linear(c.text_dim, c.model_dim, rngs=rngs, axes=("embed", "mlp"), dtype=dtype)


class PolicyLatentActions(nnx.Module):
    """GFDM features of the static view -> 4 latent-action tokens (+ the VQ losses).

    ``lam_config``: a GIDM ``config.model``; its ``feature_dim`` (768 in the reference) is the width of
    ``goal_emb``'s hidden and output layers and of ``time_pos_emb``.
    """

    def __init__(self, lam_config: Any, *, condition_dim: int = 2560, frames: tuple[int, int] = (0, 5),
                 rngs: nnx.Rngs, dtype=None):
        if len(frames) != 2:
            raise ValueError(f"latent actions read a frame pair, got frames={frames}")
        width = lam_config.feature_dim
        self.frames = tuple(int(f) for f in frames)
        self.goal_emb = nnx.Sequential(nn.linear(condition_dim, width, rngs=rngs, axes=(None, "mlp")), _gelu,
                                       nn.linear(width, width, rngs=rngs, axes=("mlp", "embed")))
        self.time_pos_emb = nn.param(rngs, jax.random.normal, (2, 1, width), (None, None, "embed"))
        self.lam = EncoderOnlyLatentActionModel(lam_config, rngs=rngs, dtype=dtype)

    def __call__(self, feats_BTNC: jax.Array, text_BLC: jax.Array, text_mask_BL: jax.Array, *,
                 train: bool = False, rng: jax.Array | None = None) -> dict:
        """``feats_BTNC``: static-view GFDM features (every predicted frame); ``text_BLC``: frozen T5
        ``last_hidden_state``. Returns ``tokens`` [B, 4, lam model_dim] and the VQ outputs (``z_q``, ``z_e``,
        ``indices``, ``codebook_loss``, ``commitment_loss``, ``perplexity``, ``codes_used``)."""
        T = feats_BTNC.shape[1]
        if max(self.frames) >= T:
            raise ValueError(f"latent actions read frames {self.frames} but the features have {T} frames")
        pair_B2NC = feats_BTNC[:, jnp.asarray(self.frames)]
        pair_B2NE = self.goal_emb(pair_B2NC) + self.time_pos_emb[...][None]   # [1, 2, 1, E] per frame
        lang_BLE = self.lam.lang_proj(text_BLC)
        z_e_BQK = self.lam.latent_actions(pair_B2NE, lang_BLE, text_mask_BL)[:, 0]
        vq = self.lam.vq(z_e_BQK, train=train, rng=rng)
        return dict(vq, z_e=z_e_BQK, tokens=self.lam.action_up(vq["z_q"]))
