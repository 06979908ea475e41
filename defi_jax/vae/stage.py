"""VAE stage: the GFDM's autoencoder (SVD's ``AutoencoderKLTemporalDecoder``) trained on video clips.

    python -m launch.train --config=configs/vae.py:tiny --workdir=/tmp/vae

No published weights fit the tiny GFDM's VAE, so the demo trains one first and the GFDM reads it frozen from
this workdir (``configs/gfdm.py``: ``config.init.sources.vae_workdir``; the parameter paths here are the
GFDM's ``vae/`` sub-tree without that prefix). Data: the GFDM's ``gfdm_clip`` samples (uint8 current + K future
frames); each clip is encoded frame by frame and decoded with the temporal decoder over its ``K + 1`` frames, as
the GFDM decodes its samples.

Loss: ``L1(reconstruction, frames) + model.kl_weight * KL(posterior || N(0, 1))`` (both means over elements; the
reconstruction decodes a posterior sample). Training metrics: ``recon_l1``, ``kl``, ``psnr`` (dB, frames in
[0, 1]), ``latent_std`` (std of the posterior means: the GFDM's ``model.vae.scaling_factor`` should be about its
inverse). Evaluation (``config.eval.batches`` held-out batches, posterior mode): ``eval_recon_l1``, ``eval_kl``,
``eval_psnr``, ``eval_latent_std`` and ``<workdir>/samples/step_<N>.gif`` (real clips above, reconstructions below).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import stage as stage_lib
from defi_jax.gfdm import evaluation
from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig
from defi_jax.stage import NumericBatches, Stage

_BATCH_KEYS = ("frames",)


def build_model(config, rngs: nnx.Rngs) -> AutoencoderKLTemporalDecoder:
    """The autoencoder of ``config.model.vae`` (a diffusers config dict, the GFDM's ``model.vae``)."""
    return AutoencoderKLTemporalDecoder(VAEConfig.from_dict(dict(config.model.vae)), rngs=rngs,
                                        dtype=stage_lib.compute_dtype(config),
                                        param_dtype=jnp.dtype(config.train.param_dtype),
                                        attention_impl=config.model.attention_impl)


# ---- loss -------------------------------------------------------------------------------------------
def _reconstruct(model: AutoencoderKLTemporalDecoder, frames_BTHW3, rng: jax.Array | None):
    """(frames in [-1, 1], reconstructions, posterior mean, logvar); ``rng=None`` decodes the posterior mode."""
    x_BTHW3 = frames_BTHW3.astype(jnp.float32) / 127.5 - 1.0
    b, t, h, w, _ = x_BTHW3.shape
    mean_Nhwc, logvar_Nhwc = model.encode_moments(x_BTHW3.reshape(b * t, h, w, 3))
    mean_Nhwc, logvar_Nhwc = mean_Nhwc.astype(jnp.float32), logvar_Nhwc.astype(jnp.float32)
    z_Nhwc = mean_Nhwc if rng is None else model.sample(mean_Nhwc, logvar_Nhwc, rng)
    recon_BTHW3 = model.decode(z_Nhwc, num_frames=t).astype(jnp.float32).reshape(b, t, h, w, 3)
    return x_BTHW3, recon_BTHW3, mean_Nhwc, logvar_Nhwc


def _losses(x, recon, mean, logvar, kl_weight: float):
    recon_l1 = jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    psnr = evaluation.psnr(jnp.clip((recon + 1) / 2, 0, 1), (x + 1) / 2).mean()
    metrics = {"recon_l1": recon_l1, "kl": kl, "psnr": psnr, "latent_std": jnp.std(mean)}
    return recon_l1 + kl_weight * kl, metrics


def loss_fn(model: AutoencoderKLTemporalDecoder, batch, rng, config):
    x, recon, mean, logvar = _reconstruct(model, batch["frames"], rng)
    return _losses(x, recon, mean, logvar, float(config.model.kl_weight))


# ---- data -------------------------------------------------------------------------------------------
def make_data(config, process_index: int, process_count: int, split: str):
    import data_pipelines

    seed = config.seed + (0 if split == "train" else 1_000_003)
    it = data_pipelines.make_loader("gfdm_clip", config.data, global_batch_size=config.train.batch_size,
                                    process_index=process_index, process_count=process_count, seed=seed, split=split)
    return NumericBatches(it, _BATCH_KEYS)


def batch_spec(config) -> dict:
    d = config.data
    return {"frames": jax.ShapeDtypeStruct((config.train.batch_size, d.num_frames + 1, d.resolution, d.resolution, 3),
                                           np.uint8)}


def check_data(config) -> None:
    import data_pipelines
    data_pipelines.check_sources(config.data, "gfdm_clip")


# ---- evaluation -------------------------------------------------------------------------------------
def evaluate(model: AutoencoderKLTemporalDecoder, config, workdir: str, step: int, eval_iter) -> dict:
    """Held-out reconstruction through the posterior mode; a GIF of the first ``eval.num_videos`` clips."""
    e = config.eval
    graphdef, state = nnx.split(model)
    reconstruct = stage_lib.eval_fns("vae", config, graphdef, _eval_fns)
    sums: dict[str, float] = {}
    n, first = 0, None
    for batch in (b for _, b in zip(range(e.batches), eval_iter)):
        metrics, recon = reconstruct(state, batch["frames"])
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if first is None:
            first = (np.asarray(batch["frames"]), np.asarray(recon))
        n += 1
    if first is None:
        raise RuntimeError("VAE evaluate: the eval iterator yielded no batch")
    if e.num_videos > 0 and jax.process_index() == 0:
        real, recon = first[0][:e.num_videos], evaluation.to_uint8(first[1][:e.num_videos])
        evaluation.write_video_grid(os.path.join(workdir, "samples", f"step_{step:08d}.gif"), [real, recon],
                                    fps=e.gif_fps)
    return {f"eval_{k}": v / n for k, v in sums.items()}


def _eval_fns(graphdef, config):
    """Jitted ``(state, frames) -> (metrics, reconstructions)`` for one model structure (built once per run)."""
    @functools.partial(jax.jit, **stage_lib.jit_kwargs(config))
    def reconstruct(state, frames):
        x, recon, mean, logvar = _reconstruct(nnx.merge(graphdef, state), frames, None)
        _, metrics = _losses(x, recon, mean, logvar, float(config.model.kl_weight))
        return metrics, recon

    return reconstruct


def validate(config) -> None:
    m, d = config.model, config.data
    vae = VAEConfig.from_dict(dict(m.vae))
    factor = 2 ** (len(vae.block_out_channels) - 1)
    if d.resolution % factor:
        raise ValueError(f"config.data.resolution={d.resolution} is not a multiple of {factor} (the VAE's "
                         f"{len(vae.block_out_channels)} levels in config.model.vae.block_out_channels)")
    if m.kl_weight < 0:
        raise ValueError(f"config.model.kl_weight={m.kl_weight} must be >= 0")


STAGE = Stage(build_model=build_model, loss_fn=loss_fn, make_data=make_data, evaluate=evaluate, validate=validate,
              batch_spec=batch_spec, check_data=check_data)
