"""The GFDM (generalist forward dynamics model): Stable Video Diffusion conditioned on language, as DeFI.

    gfdm = GFDM(GFDMOptions.from_config(config.model), rngs=nnx.Rngs(0))
    text_BLD = gfdm.encode_text(input_ids_BL, attention_mask_BL)        # 20 CLIP tokens, 512 -> 1024 wide
    feats, latents = gfdm.one_step_features(frame_BHW3, text_BLD, rng)    # what the DeFI policy consumes

Conditioning (DeFI's ``finetune_unet``): the current frame's VAE latent (distribution mode, *not* scaled
by 0.18215) is repeated over the T predicted frames and concatenated on channels with the c_in-scaled
noisy latents (4 + 4 = 8 UNet input channels); the CLIP text tokens replace SVD's image embedding as
``encoder_hidden_states``; ``added_time_ids = (fps, motion_bucket_id, noise_aug_strength)``. The
predicted frames include the current one (frame 0 of the clip), as in the reference.

Latents the diffusion runs on are VAE latents multiplied by ``scaling_factor``; the condition latent is
not. The VAE and text encoder are frozen (``stop_gradient`` here; no optimizer state via
``config.train.frozen``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax.gfdm import edm


@dataclasses.dataclass(frozen=True)
class GFDMOptions:
    """Everything the GFDM needs besides its three networks' configs (all from ``config.model``)."""

    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    num_frames: int = 16
    text_tokens: int = 20                  # CLIP tokens fed to the UNet (DeFI: clip_token_length 20)
    text_position_encoding: bool = False   # DeFI's optional sincos positions on the text tokens (off in the release)
    text_drop_prob: float = 0.05           # classifier-free guidance: text zeroed in training
    fps: int = 7                           # training / sampling micro-conditioning (used as is, not fps - 1)
    motion_bucket_id: int = 127
    noise_aug_log_mean: float = -3.0       # noise_aug_strength ~ exp(N(-3, 0.5^2)) in training from frames
    noise_aug_log_std: float = 0.5
    p_mean: float = edm.P_MEAN
    p_std: float = edm.P_STD
    feature_fps: int = 4                   # one-step features (policy)
    feature_steps: int = 20                # features come from the noisiest sigma of this schedule
    feature_up_blocks: int = 2             # UNet cut after up_blocks[feature_up_blocks - 1]
    sample_steps: int = 30                 # video generation (evaluation)
    guidance_min: float = 1.0
    guidance_max: float = 7.5
    sample_noise_aug: float = 0.02         # the pipeline's time id at sampling (no noise is added to the image)
    decode_chunk_size: int = 0             # frames decoded together by the temporal VAE decoder; 0 = all
    remat: bool = False                    # recompute each UNet block in the backward pass (memory)
    attention_impl: str | None = None      # jax.nn.dot_product_attention's: None = XLA, "cudnn" on GPU

    @classmethod
    def from_config(cls, model_cfg) -> GFDMOptions:
        d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
        if "unet_remat" in d:   # the key's name in configs saved with checkpoints before it became model.remat
            d["remat"] = d.pop("unet_remat")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config.model has unknown GFDM keys {unknown}; known: {sorted(known)}")
        for key in ("unet", "vae", "text_encoder"):
            if key not in d:
                raise ValueError(f"config.model.{key} is missing (a dict of that network's config fields)")
            d[key] = _freeze(d[key])
        return cls(**d)


def _freeze(d) -> tuple:
    """Dict -> sorted tuple of items (hashable, so the module's static attributes stay hashable)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items()))


def upsample_nearest(x_BTHWC: jax.Array, factor: int) -> jax.Array:
    """torch ``interpolate(scale_factor=factor)`` (default mode ``nearest``) on the spatial dims."""
    return jnp.repeat(jnp.repeat(x_BTHWC, factor, axis=2), factor, axis=3)


class _FoldInKeys:
    """Keys ``fold_in(key, 1), fold_in(key, 2), ...`` with a Python counter (nothing written to a Variable)."""

    def __init__(self, key: jax.Array):
        self.key, self.calls = key, 0

    def __call__(self) -> jax.Array:
        self.calls += 1
        return jax.random.fold_in(self.key, self.calls)


def _traceable_rngs(rngs: nnx.Rngs) -> nnx.Rngs:
    """Rngs drawing from one key of ``rngs`` with a Python counter.

    flax's streams write their counter to a Variable on each key, which under a trace (the trainer's
    ``nnx.eval_shape`` and jitted init) costs time quadratic in the number of parameters (see
    ``defi_jax.models.svd_layers.trace_rngs``); every stream name falls back to ``default``.
    """
    out = nnx.Rngs(0)
    setattr(out, "default", _FoldInKeys(rngs.params()))
    return out


class GFDM(nnx.Module):
    """UNet + VAE + CLIP text encoder; training loss, sampling and one-step features (see module doc)."""

    def __init__(self, opts: GFDMOptions, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_impl: str | None = None):
        """``attention_impl`` overrides ``opts.attention_impl`` when given."""
        from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
        from defi_jax.models.svd_unet import UNetConfig, UNetSpatioTemporal
        from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig

        self.opts = opts
        rngs = _traceable_rngs(rngs)
        mk = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attention_impl = attention_impl or opts.attention_impl
        self.unet = UNetSpatioTemporal(UNetConfig.from_dict(dict(opts.unet)), attention_impl=attention_impl,
                                       remat=opts.remat, **mk)
        self.vae = AutoencoderKLTemporalDecoder(VAEConfig.from_dict(dict(opts.vae)), attention_impl=attention_impl,
                                                **mk)
        self.text_encoder = CLIPTextEncoder(CLIPTextConfig(**dict(opts.text_encoder)), **mk)
        self.scaling_factor = float(dict(opts.vae).get("scaling_factor", 0.18215))
        self.latent_channels = int(dict(opts.unet).get("out_channels", 4))

    # ---- conditioning ---------------------------------------------------------------------------
    def encode_text(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        """CLIP ``last_hidden_state`` of the first ``text_tokens`` tokens, duplicated to 2 x 512 wide."""
        from defi_jax.models.clip_text import defi_text_condition

        hidden_BLD = self.text_encoder(input_ids_BL, attention_mask_BL).astype(jnp.float32)
        cond = defi_text_condition(hidden_BLD, num_tokens=self.opts.text_tokens,
                                   position_encode=self.opts.text_position_encoding)
        return jax.lax.stop_gradient(cond)

    def encode_frames(self, frames_NHW3: jax.Array) -> jax.Array:
        """VAE posterior mode of frames in [-1, 1]: *unscaled* latents [N, h, w, 4], float32."""
        return jax.lax.stop_gradient(self.vae.encode(frames_NHW3).astype(jnp.float32))

    def added_time_ids(self, batch: int, fps: float, noise_aug_B: jax.Array | float) -> jax.Array:
        noise_aug_B = jnp.broadcast_to(jnp.asarray(noise_aug_B, jnp.float32), (batch,))
        return jnp.stack([jnp.full((batch,), fps, jnp.float32),
                          jnp.full((batch,), self.opts.motion_bucket_id, jnp.float32), noise_aug_B], axis=-1)

    def v_prediction(self, x_in_BThwc: jax.Array, c_noise_B: jax.Array, cond_Bhwc: jax.Array, text_BLD: jax.Array,
                     time_ids_B3: jax.Array) -> jax.Array:
        """The UNet on [c_in * x_noisy ; condition latent repeated over T]; predicts v [B, T, h, w, 4]."""
        sample = self._unet_input(x_in_BThwc, cond_Bhwc)
        return self.unet(sample, c_noise_B, text_BLD, time_ids_B3).astype(jnp.float32)

    def _unet_input(self, x_in_BThwc, cond_Bhwc):
        t = x_in_BThwc.shape[1]
        cond_BThwc = jnp.broadcast_to(cond_Bhwc[:, None], (cond_Bhwc.shape[0], t, *cond_Bhwc.shape[1:]))
        return jnp.concatenate([x_in_BThwc, cond_BThwc.astype(x_in_BThwc.dtype)], axis=-1)

    # ---- training ---------------------------------------------------------------------------------
    def conditioning_from_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array, *, train: bool):
        """(target latents [B,T,h,w,4] scaled, condition latent [B,h,w,4] unscaled, noise_aug [B]).

        ``batch["frames"]`` uint8 [B, T, H, W, 3] (raw) or ``batch["latents"]`` [B, T, h, w, 4] (precomputed,
        scaled). From frames, the condition frame gets noise augmentation ``exp(N(-3, 0.5^2))`` in pixel
        space (training only); from latents the condition is frame 0's latent and noise_aug is 0, as in
        the reference's pre-encoded path.
        """
        if "latents" in batch:
            latents = batch["latents"].astype(jnp.float32)
            return latents, latents[:, 0] / self.scaling_factor, jnp.zeros((latents.shape[0],), jnp.float32)
        if "frames" not in batch:
            raise KeyError(f"GFDM batch needs 'frames' or 'latents'; got keys {sorted(batch)}")
        frames = batch["frames"].astype(jnp.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        b, t, h, w, _ = frames.shape
        latents = self.encode_frames(frames.reshape(b * t, h, w, 3)) * self.scaling_factor
        latents = latents.reshape(b, t, *latents.shape[1:])
        if train:
            k_aug, k_noise = jax.random.split(rng)
            noise_aug = jnp.exp(self.opts.noise_aug_log_mean
                                + self.opts.noise_aug_log_std * jax.random.normal(k_aug, (b,)))
            image = frames[:, 0] + noise_aug[:, None, None, None] * jax.random.normal(k_noise, frames[:, 0].shape)
            cond = self.encode_frames(image)
        else:
            noise_aug = jnp.zeros((b,), jnp.float32)
            cond = latents[:, 0] / self.scaling_factor
        return latents, cond, noise_aug

    def loss(self, latents_BThwc: jax.Array, cond_Bhwc: jax.Array, text_BLD: jax.Array, noise_aug_B: jax.Array,
             rng: jax.Array, *, train: bool = True) -> tuple[jax.Array, dict]:
        """EDM v-parameterized loss: weighted x0 squared error (DeFI ``finetune_unet``)."""
        b = latents_BThwc.shape[0]
        k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
        if train and self.opts.text_drop_prob > 0:
            keep_B = jax.random.uniform(k_drop, (b,)) > self.opts.text_drop_prob
            text_BLD = jnp.where(keep_B[:, None, None], text_BLD, 0.0)
        sigma_B = edm.sample_sigma(k_sigma, (b,), self.opts.p_mean, self.opts.p_std)
        sigma = sigma_B[:, None, None, None, None]
        pc = edm.precondition(sigma)
        noisy = latents_BThwc + jax.random.normal(k_noise, latents_BThwc.shape) * sigma
        time_ids = self.added_time_ids(b, self.opts.fps, noise_aug_B)
        v = self.v_prediction(pc.c_in * noisy, pc.c_noise.reshape(b), cond_Bhwc, text_BLD, time_ids)
        x0 = pc.c_skip * noisy + pc.c_out * v
        per_sample = jnp.mean((x0 - latents_BThwc) ** 2 * edm.loss_weight(sigma), axis=(1, 2, 3, 4))
        loss = per_sample.mean()
        x0_mse = jnp.mean((x0 - latents_BThwc) ** 2)
        return loss, {"edm_loss": loss, "x0_mse": x0_mse, "sigma_mean": sigma_B.mean()}

    # ---- generation -------------------------------------------------------------------------------
    def sample(self, cond_Bhwc: jax.Array, text_BLD: jax.Array, rng: jax.Array, *, num_frames: int | None = None,
               num_steps: int | None = None) -> jax.Array:
        """Video latents (scaled) [B, T, h, w, 4] by Euler sampling with frame-ramped text guidance."""
        o = self.opts
        b, t = cond_Bhwc.shape[0], num_frames or o.num_frames
        sigmas = edm.karras_sigmas(num_steps or o.sample_steps)
        time_ids = self.added_time_ids(b, o.fps, o.sample_noise_aug)
        noise = jax.random.normal(rng, (b, t, *cond_Bhwc.shape[1:3], self.latent_channels))
        if o.guidance_max > 1.0:
            # one batched UNet call: [uncond (text zeroed) ; cond], as the pipeline does
            text2 = jnp.concatenate([jnp.zeros_like(text_BLD), text_BLD])
            cond2, ids2 = jnp.concatenate([cond_Bhwc] * 2), jnp.concatenate([time_ids] * 2)

            def v_pair(x_in, c_noise):
                v = self.v_prediction(jnp.concatenate([x_in] * 2), jnp.concatenate([c_noise] * 2), cond2, text2, ids2)
                return v[:b], v[b:]

            guidance_BT = jnp.tile(edm.frame_guidance(t, o.guidance_min, o.guidance_max)[None], (b, 1))
            v_model = edm.guided(v_pair, guidance_BT)
        else:
            def v_model(x_in, c_noise):
                return self.v_prediction(x_in, c_noise, cond_Bhwc, text_BLD, time_ids)
        return edm.euler_sample(v_model, noise, sigmas)

    def decode(self, latents_BThwc: jax.Array) -> jax.Array:
        """Scaled latents -> frames in [-1, 1], [B, T, H, W, 3], decoding ``decode_chunk_size`` frames at once."""
        b, t = latents_BThwc.shape[:2]
        z = latents_BThwc.reshape(b * t, *latents_BThwc.shape[2:]) / self.scaling_factor
        chunk = self.opts.decode_chunk_size or t
        # Chunks run along the flattened B*T axis, as the pipeline's decode_latents does.
        outs = [self.vae.decode(z[i:i + chunk], num_frames=min(chunk, b * t - i)) for i in range(0, b * t, chunk)]
        frames = jnp.concatenate(outs).astype(jnp.float32)
        return frames.reshape(b, t, *frames.shape[1:])

    # ---- features for the policy ------------------------------------------------------------------
    def one_step_features(self, frame_BHW3: jax.Array, text_BLD: jax.Array, rng: jax.Array | None, *,
                          predict_latents: bool = True, num_frames: int | None = None,
                          noise_BThwc: jax.Array | None = None,
                          denoise_steps: int = 1) -> tuple[jax.Array, jax.Array | None]:
        """One denoising step from pure noise at the noisiest sigma of a ``feature_steps`` schedule.

        ``frame_BHW3``: current frame in [-1, 1]; ``text_BLD``: ``encode_text(...)`` (zeros = no text).
        Returns ``features [B, T, h/2, w/2, C]`` (full config at 256 px: ``[B, 16, 16, 16, 2560]``): the
        outputs of ``up_blocks[0..k-1]`` (k = ``feature_up_blocks``), each earlier one upsampled (nearest)
        to the last one's resolution and concatenated on channels in block order; and, when
        ``predict_latents``, the one-step x0 estimate of the future latents (scaled) [B, T, h, w, 4] (this
        runs the rest of the UNet; without it the UNet stops after ``up_blocks[k-1]``). ``noise_BThwc``
        (unit Gaussian) replaces the draw from ``rng``. ``denoise_steps`` > 1 (the paper's multi-step
        ablation) first runs ``denoise_steps - 1`` Euler steps of the same schedule (no guidance) and takes the
        features at the next sigma.
        """
        o = self.opts
        b, t = frame_BHW3.shape[0], num_frames or o.num_frames
        cond = self.encode_frames(frame_BHW3)
        sigmas = edm.karras_sigmas(o.feature_steps)
        if not 1 <= denoise_steps <= o.feature_steps:
            raise ValueError(f"denoise_steps={denoise_steps} must be in [1, feature_steps={o.feature_steps}]")
        # diffusers draws latents * init_noise_sigma and scales them by c_in before the UNet.
        if noise_BThwc is None:
            noise_BThwc = jax.random.normal(rng, (b, t, *cond.shape[1:3], self.latent_channels))
        x = noise_BThwc.astype(jnp.float32) * edm.init_noise_scale(sigmas)
        time_ids = self.added_time_ids(b, o.feature_fps, 0.0)
        for i in range(denoise_steps - 1):   # Euler steps (the ablation's N-step features)
            pc = edm.precondition(jnp.float32(sigmas[i]))
            v = self.v_prediction(x * pc.c_in, jnp.full((b,), pc.c_noise), cond, text_BLD, time_ids)
            x0 = pc.c_skip * x + pc.c_out * v
            x = x + (x - x0) / float(sigmas[i]) * float(sigmas[i + 1] - sigmas[i])
        pc = edm.precondition(jnp.float32(sigmas[denoise_steps - 1]))
        sample = self._unet_input(x * pc.c_in, cond)
        c_noise = jnp.full((b,), pc.c_noise)
        k = o.feature_up_blocks
        ups = self.unet.up_block_features(sample, c_noise, text_BLD, time_ids, num_up_blocks=k)
        last = ups[-1]
        parts = [upsample_nearest(u, last.shape[2] // u.shape[2]) for u in ups[:-1]] + [last]
        features = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)
        if not predict_latents:
            return features, None
        # A second, full UNet call on the same inputs: XLA's common-subexpression elimination shares the
        # blocks both calls run, so this costs only the rest of the network.
        v = self.unet(sample, c_noise, text_BLD, time_ids).astype(jnp.float32)
        return features, pc.c_skip * x + pc.c_out * v
