"""The DeFI policy (stage 3): frozen GFDM features -> Video Former + GIDM latent actions + CLIP goal -> action head.

    policy = DeFIPolicyModel(config.model, rngs=nnx.Rngs(0))
    text = policy.encode_instruction(gfdm_ids, gfdm_mask, goal_ids, goal_mask, gidm_ids, gidm_mask)
    feats = policy.features(frames_BVHW3, text["gfdm"], rng)                  # GFDM one step, per view
    context_BSD, aux = policy.context(feats, text)                             # once per observation
    actions_BAC = policy.head.sample(context_BSD, policy.head.initial_noise(rng, B))   # normalized actions

Shapes with the reference's numbers (``configs/policy.py:defi``; every size is a config value):

    frames_BVHW3      uint8 [B, V=2, 256, 256, 3]   static view first, then the wrist view
    gfdm features     [B, V, 16, 256, 2560]           one denoising step per view (``model.gfdm_steps``)
    video_former      per frame: V x 256 tokens of 2560 -> 16 frames x 14 queries -> [B, 224, 384]
    latent_actions    static view, predicted frames (0, 5) -> GIDM encoder -> [B, 4, 768] (+ VQ losses)
    goal              CLIP text (with projection) of the instruction -> [B, 1, 512]
    head              [goal ; video tokens ; latent actions] = 229 context tokens -> [B, 10, 7] actions

Parameter tree: ``gfdm/`` (UNet, VAE, CLIP text of stage 1), ``goal_text/`` (CLIP text with projection),
``latent_actions/`` (``goal_emb``, ``time_pos_emb``, ``lam/``: the stage-2 encoder, VQ, ``action_up``,
``lang_proj`` and ``text_encoder``, the GIDM's instruction tower: frozen T5 or the tiny byte embedding),
``video_former/``, ``head/inner_model/``; with ``model.center_features``, ``feature_stats/mean`` (frozen: the GFDM
features' per-channel mean, subtracted before the adapter reads them; with ``model.scale_features`` also
``feature_stats/std``, divided by; see :class:`FeatureStats`).

Latent-action bottlenecks (``model.latent_action``, the paper's ablation): ``vq`` (the reference),
``continuous`` (the pre-quantization latents, no VQ losses), ``binning`` (each latent dimension squashed by
tanh and rounded to ``latent_bins`` levels, straight-through), ``gmm`` (a soft, differentiable assignment to the
codebook: the mixture mean under a softmax of negative squared distances, temperature ``latent_gmm_temperature``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax.gfdm.model import GFDM, GFDMOptions
from defi_jax.policy.action_head import ActionHead
from defi_jax.policy.latent_action import PolicyLatentActions
from defi_jax.policy.video_former import VideoFormer

LATENT_ACTIONS = ("vq", "continuous", "binning", "gmm")
# The key of the GFDM's random initial weights, whatever the model's ``rngs``: where no published weights are
# loaded (the demo's ``policy.gfdm_init=initial``) they stand in for them, one draw for every fine-tuning seed.
INITIAL_GFDM_SEED = 0


def _gidm_text_tower(gidm_cfg, rngs: nnx.Rngs):
    """The GIDM's instruction tower, outside the latent action model (the policy keeps its text towers apart)."""
    if gidm_cfg.text_encoder == "bytes":
        from defi_jax.gidm.model import ByteTextEncoder
        return ByteTextEncoder(gidm_cfg.text_dim, rngs=rngs)
    from defi_jax.models.t5 import T5Config, T5Encoder
    return T5Encoder(T5Config(**dict(gidm_cfg.get("t5", {}))), rngs=rngs)


class FeatureStats(nnx.Module):
    """The GFDM features' per-channel mean (``model.center_features``) and standard deviation
    (``model.scale_features``) over training windows, frozen.

    The features are centred (and scaled) before the Video Former and the latent actions read them: the adapter then
    learns from centred inputs (it reads the scene with about a third fewer training windows in the demo,
    BENCHMARKS.md) of one scale whichever GFDM made them (a pretrained GFDM's features are about twice as large as an
    initial one's), while the checkpoint keeps taking raw features, so inference needs nothing else. Filled from
    ``config.init.sources.feature_stats`` (a ``launch.precompute_features`` folder). An export folds it into the two
    input layers' weights (:meth:`DeFIPolicyModel.fold_feature_stats`)."""

    def __init__(self, dim: int, *, scale: bool = False):
        self.mean = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=(None,))
        self.std = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=(None,)) if scale else None

    def __call__(self, x):
        x = x - self.mean[...].astype(x.dtype)
        return x if self.std is None else x / self.std[...].astype(x.dtype)


class DeFIPolicyModel(nnx.Module):
    """Every network of the policy; ``config`` is ``config.model`` of ``configs/policy.py``."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 frozen_gfdm: bool = True):
        from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

        c = config
        self.frozen_gfdm = frozen_gfdm   # features get no backward pass (config.policy.finetune != "all")
        if c.latent_action not in LATENT_ACTIONS:
            raise ValueError(f"config.model.latent_action={c.latent_action!r} must be one of {LATENT_ACTIONS}")
        self.num_views = int(c.num_views)
        self.gfdm_steps = int(c.gfdm_steps)
        self.latent_action = c.latent_action
        self.latent_bins = int(c.latent_bins)
        self.latent_gmm_temperature = float(c.latent_gmm_temperature)
        self.gidm_text_kind = c.gidm.text_encoder
        # The GFDM draws from INITIAL_GFDM_SEED, not ``rngs``: a frozen random GFDM is then the same function for
        # every config.seed, so one features store / statistics file (defi_jax.policy.features) serves all of
        # them. ``rngs`` advances as if it had made those draws: the other networks' weights do not change (and
        # with seed 0, whose stream starts with the GFDM, nothing does).
        gfdm_rngs = nnx.Rngs(**{name: INITIAL_GFDM_SEED for name, _ in rngs.items()})
        self.gfdm = GFDM(GFDMOptions.from_config(c.gfdm), rngs=gfdm_rngs, dtype=dtype, param_dtype=param_dtype,
                         attention_impl=c.get("attention_impl", None) or None)
        for name, stream in gfdm_rngs.items():
            getattr(rngs, name).count[...] += stream.count[...]
        self.goal_text = CLIPTextEncoder(CLIPTextConfig(**dict(c.goal_text)), rngs=rngs, with_projection=True)
        # GFDM feature width: up_blocks[0..k-1] outputs concatenated (2560 for SVD, k = 2).
        unet = dict(c.gfdm.unet)
        feat_dim = sum(list(reversed(unet["block_out_channels"]))[:c.gfdm.feature_up_blocks])
        self.feature_dim = feat_dim
        self.latent_actions = PolicyLatentActions(c.gidm, condition_dim=feat_dim,
                                                  frames=tuple(c.latent_action_frames), rngs=rngs, dtype=dtype)
        # The GIDM's instruction tower sits where the reference's stage-3 checkpoint keeps it
        # (``lam.text_encoder``), so a GIDM workdir loads into ``latent_actions/lam/`` in one piece.
        self.latent_actions.lam.text_encoder = _gidm_text_tower(c.gidm, rngs)
        vf = dict(c.video_former)
        self.video_former = VideoFormer(condition_dim=feat_dim, num_frames=c.gfdm.num_frames, rngs=rngs, **vf)
        self.head = ActionHead(rngs=rngs, goal_dim=int(dict(c.goal_text).get("projection_dim", 512)),
                               video_dim=vf.get("dim", 384), latent_action_dim=c.gidm.model_dim,
                               action_dim=c.action_dim, horizon=c.horizon, **dict(c.head))
        if c.get("scale_features", False) and not c.get("center_features", False):
            raise ValueError("config.model.scale_features=True needs config.model.center_features=True")
        self.feature_stats = (FeatureStats(feat_dim, scale=c.get("scale_features", False))
                              if c.get("center_features", False) else None)

    # ---- instruction ------------------------------------------------------------------------------
    def encode_instruction(self, gfdm_ids_BL, gfdm_mask_BL, goal_ids_BL, goal_mask_BL, gidm_ids_BL,
                           gidm_mask_BL) -> dict:
        """The instruction through the three text towers (inference caches this per string):
        ``gfdm`` [B, 20, 2 x 512] (GFDM condition), ``goal`` [B, 1, 512] (CLIP goal token), ``gidm``
        [B, L, text_dim] with ``gidm_mask`` (the GIDM's instruction tokens)."""
        return {"gfdm": self.gfdm.encode_text(gfdm_ids_BL, gfdm_mask_BL),
                "goal": jax.lax.stop_gradient(self.goal_text.text_embeds(goal_ids_BL, goal_mask_BL))[:, None],
                "gidm": self.encode_gidm_text(gidm_ids_BL, gidm_mask_BL), "gidm_mask": gidm_mask_BL}

    def encode_gidm_text(self, input_ids_BL, attention_mask_BL) -> jax.Array:
        """The GIDM's instruction tokens [B, L, text_dim]: the trained byte embedding, or frozen T5."""
        out = self.latent_actions.lam.text_encoder(input_ids_BL, attention_mask_BL)
        if self.gidm_text_kind == "bytes":
            return out
        return jax.lax.stop_gradient(getattr(out, "last_hidden_state", out).astype(jnp.float32))

    # ---- the frozen world model ------------------------------------------------------------------
    def features(self, frames_BVHW3: jax.Array, gfdm_text_BLD: jax.Array, rng: jax.Array | None, *,
                 noise=None) -> jax.Array:
        """GFDM one-step features of every view: [B, V, T, h*w, C], float32.

        The views go through the GFDM stacked on the batch axis with the same instruction, as the reference.
        ``noise`` ([B*V, T, h, w, 4], unit Gaussian) replaces the draw from ``rng``. Without a backward pass
        when the GFDM is frozen.
        """
        B, V = frames_BVHW3.shape[:2]
        if V != self.num_views:
            raise ValueError(f"policy built for config.model.num_views={self.num_views} views, got {V}")
        frames_NHW3 = frames_BVHW3.reshape(B * V, *frames_BVHW3.shape[2:]).astype(jnp.float32) / 127.5 - 1.0
        text_NLD = jnp.repeat(gfdm_text_BLD, V, axis=0)   # row b*V + v: view v of sample b
        feats_NThwC, _ = self.gfdm.one_step_features(frames_NHW3, text_NLD, rng, predict_latents=False,
                                                     noise_BThwc=noise, denoise_steps=self.gfdm_steps)
        N, T, h, w, C = feats_NThwC.shape
        feats = feats_NThwC.reshape(B, V, T, h * w, C)
        return jax.lax.stop_gradient(feats) if self.frozen_gfdm else feats

    # ---- the trained adapter ---------------------------------------------------------------------
    def _latent_tokens(self, feats_BTNC, text_BLC, text_mask_BL, *, train: bool, rng) -> dict:
        la = self.latent_actions
        if self.latent_action == "vq":
            return la(feats_BTNC, text_BLC, text_mask_BL, train=train, rng=rng)
        pair_B2NC = feats_BTNC[:, jnp.asarray(la.frames)]
        pair_B2NE = la.goal_emb(pair_B2NC) + la.time_pos_emb[...][None]
        z_e_BQK = la.lam.latent_actions(pair_B2NE, la.lam.lang_proj(text_BLC), text_mask_BL)[:, 0]
        if self.latent_action == "continuous":
            z_BQK = z_e_BQK
        elif self.latent_action == "binning":
            squashed = jnp.tanh(z_e_BQK)
            levels = (self.latent_bins - 1) / 2.0
            binned = jnp.round((squashed + 1.0) * levels) / levels - 1.0
            z_BQK = squashed + jax.lax.stop_gradient(binned - squashed)   # straight-through
        else:  # gmm
            codebook_KD = la.lam.vq.codebook[...].astype(jnp.float32)
            d_BQK = jnp.sum((z_e_BQK[..., None, :].astype(jnp.float32) - codebook_KD) ** 2, axis=-1)
            z_BQK = jax.nn.softmax(-d_BQK / self.latent_gmm_temperature, axis=-1) @ codebook_KD
        zero = jnp.zeros((), jnp.float32)
        return dict(tokens=la.lam.action_up(z_BQK.astype(z_e_BQK.dtype)), z_e=z_e_BQK, z_q=z_BQK,
                    codebook_loss=zero, commitment_loss=zero)

    def context(self, feats_BVTNC, text: dict, *, train: bool = False, rng: jax.Array | None = None,
                dropout_rng: jax.Array | None = None, latent_rows: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Context tokens [B, 1 + T*Q + 4, D] for the head, and the latent-action outputs (VQ losses).

        ``text``: :meth:`encode_instruction`'s output. Independent of the noisy actions and of sigma, so
        inference computes it once per observation and reuses it at every sampler step. ``latent_rows`` [B]
        (evaluation probes): sample b's head reads the latent-action tokens of sample ``latent_rows[b]``."""
        B, V, T, N, C = feats_BVTNC.shape
        if self.feature_stats is not None:
            feats_BVTNC = self.feature_stats(feats_BVTNC)
        # Video Former input per frame: every view's tokens side by side (static 256 + wrist 256 in the reference).
        vf_in_BTNC = feats_BVTNC.transpose(0, 2, 1, 3, 4).reshape(B, T, V * N, C)
        video_BVD = self.video_former(vf_in_BTNC)
        la = self._latent_tokens(feats_BVTNC[:, 0], text["gidm"], text["gidm_mask"], train=train, rng=rng)
        tokens_BQE = la["tokens"] if latent_rows is None else la["tokens"][latent_rows]
        context_BSD = self.head.encode(text["goal"], video_BVD, tokens_BQE, dropout_rng=dropout_rng)
        return context_BSD, la

    def fold_feature_stats(self) -> None:
        """Moves :class:`FeatureStats` into the two layers that read the features (``W (x - m) / s + b =
        (W / s) x + (b - (m / s) W)``, ``s`` = 1 without ``std``) and removes it: the same function, in the
        reference's parameters (what a PyTorch export writes). In place."""
        if self.feature_stats is None:
            return
        mean_C = self.feature_stats.mean[...].astype(jnp.float32)
        std = self.feature_stats.std
        inv_C = jnp.ones_like(mean_C) if std is None else 1.0 / std[...].astype(jnp.float32)
        for lin in (self.video_former.goal_emb.layers[0], self.latent_actions.goal_emb.layers[0]):
            kernel_CD = lin.kernel[...].astype(jnp.float32) * inv_C[:, None]
            lin.bias[...] = (lin.bias[...] - mean_C @ kernel_CD).astype(lin.bias.dtype)
            lin.kernel[...] = kernel_CD.astype(lin.kernel.dtype)
        self.feature_stats = None

    def act(self, frames_BVHW3, text: dict, rng: jax.Array, *, num_steps: int, sigma_min: float) -> jax.Array:
        """Normalized action chunks [B, horizon, action_dim]: GFDM features, context once, then the sampler."""
        k_feat, k_noise = jax.random.split(rng)
        feats = self.features(frames_BVHW3, text["gfdm"], k_feat)
        context, _ = self.context(feats, text)
        noise = self.head.initial_noise(k_noise, frames_BVHW3.shape[0])
        return self.head.sample(context, noise, num_steps=num_steps, sigma_min=sigma_min)
