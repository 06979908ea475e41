"""EDM with v-parameterization, as the GFDM (Stable Video Diffusion) is trained and sampled.

Training (DeFI / VPP ``finetune_unet``): ln sigma ~ N(0.7, 1.6^2), the UNet sees ``c_in * x_noisy`` and
``c_noise = ln(sigma) / 4`` and predicts v; the denoised estimate is ``c_skip * x_noisy + c_out * v`` and
the loss is its squared error to the clean latents weighted by ``(sigma^2 + 1) / sigma^2``.

Sampling follows diffusers' ``EulerDiscreteScheduler`` as configured by SVD (Karras sigmas between 0.002
and 700 with rho 7 and a trailing 0, ``timestep_spacing="leading"`` so the initial noise is scaled by
``sqrt(sigma_max^2 + 1)``, no churn) and ``StableVideoDiffusionPipeline``'s classifier-free guidance,
whose scale ramps linearly across the predicted frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

P_MEAN = 0.7
P_STD = 1.6
SIGMA_DATA = 1.0
SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0


class Precond(NamedTuple):
    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def sample_sigma(rng: jax.Array, shape, p_mean: float = P_MEAN, p_std: float = P_STD) -> jax.Array:
    """Training noise levels: log-normal, ln sigma ~ N(p_mean, p_std^2)."""
    return jnp.exp(jax.random.normal(rng, shape, jnp.float32) * p_std + p_mean)


def precondition(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> Precond:
    """EDM preconditioning for a v-predicting network (for sigma_data = 1 these are DESIGN.md's formulas)."""
    total = sigma**2 + sigma_data**2
    return Precond(
        c_skip=sigma_data**2 / total,
        c_out=-sigma * sigma_data / jnp.sqrt(total),
        c_in=1.0 / jnp.sqrt(total),
        c_noise=jnp.log(sigma) / 4.0,
    )


def loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """Weight of the x0 squared error; makes the loss the unit-variance v-prediction error."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoised(v_pred: jax.Array, x_noisy: jax.Array, sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """x0 estimate from the network's v prediction; ``sigma`` broadcasts against ``x_noisy``."""
    pc = precondition(sigma, sigma_data)
    return pc.c_skip * x_noisy + pc.c_out * v_pred


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> np.ndarray:
    """``num_steps`` decreasing Karras noise levels followed by a final 0 (length num_steps + 1), float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def init_noise_scale(sigmas: np.ndarray) -> float:
    """diffusers' ``init_noise_sigma`` for SVD's "leading" spacing: sqrt(sigma_max^2 + 1), not sigma_max."""
    return float(np.sqrt(np.max(sigmas) ** 2 + 1.0))


def frame_guidance(num_frames: int, min_scale: float, max_scale: float) -> jax.Array:
    """Per-frame classifier-free guidance scale, linear from the first frame to the last: [T]."""
    return jnp.linspace(min_scale, max_scale, num_frames, dtype=jnp.float32)


# v_model(x_in, c_noise_B) -> v prediction shaped like x_in; ``x_in`` is already scaled by c_in.
VModel = Callable[[jax.Array, jax.Array], jax.Array]


def guided(v_pair: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], guidance_BT: jax.Array) -> VModel:
    """Classifier-free guidance as SVD's pipeline does it: ``uncond + g * (cond - uncond)`` per frame.

    ``v_pair(x_in, c_noise) -> (v_uncond, v_cond)`` (one batched UNet call in the model). Guidance is
    linear in v, so this equals guiding the x0 estimate.
    """
    def v_model(x_in, c_noise):
        v_u, v_c = v_pair(x_in, c_noise)
        g = guidance_BT.reshape(guidance_BT.shape + (1,) * (v_c.ndim - guidance_BT.ndim))
        return v_u + g * (v_c - v_u)
    return v_model


def euler_sample(v_model: VModel, noise: jax.Array, sigmas: np.ndarray) -> jax.Array:
    """Euler ODE sampling of latents ``[B, ...]`` from unit ``noise`` along ``sigmas`` (trailing 0 included).

    Matches diffusers' ``EulerDiscreteScheduler.step`` with no churn. The loop is a ``lax.fori_loop``, so
    the UNet is compiled once for all steps.
    """
    sigmas_j = jnp.asarray(sigmas, jnp.float32)
    x = noise.astype(jnp.float32) * init_noise_scale(sigmas)
    b = x.shape[0]

    def step(i, x):
        sigma, sigma_next = sigmas_j[i], sigmas_j[i + 1]
        pc = precondition(sigma)
        v = v_model(x * pc.c_in, jnp.full((b,), pc.c_noise)).astype(jnp.float32)
        x0 = pc.c_skip * x + pc.c_out * v
        return x + (x - x0) / sigma * (sigma_next - sigma)

    return jax.lax.fori_loop(0, len(sigmas) - 1, step, x)
