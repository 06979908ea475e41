"""EDM v-parameterization: constants, preconditioning, sigma sampling and the Euler sampler vs diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from defi_jax.gfdm import edm

# Stable Video Diffusion's published scheduler_config.json (the sampler must reproduce this scheduler).
SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", trained_betas=None,
    use_karras_sigmas=True)


def test_constants_match_design():
    assert (edm.P_MEAN, edm.P_STD, edm.SIGMA_DATA) == (0.7, 1.6, 1.0)
    assert (edm.SIGMA_MIN, edm.SIGMA_MAX, edm.RHO) == (0.002, 700.0, 7.0)


def test_preconditioning_formulas():
    s = jnp.asarray([0.01, 0.3, 1.0, 2.0, 50.0, 700.0])
    pc = edm.precondition(s)
    np.testing.assert_allclose(pc.c_skip, 1 / (s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(pc.c_out, -s / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(pc.c_in, 1 / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(pc.c_noise, np.log(s) / 4, rtol=1e-6)
    np.testing.assert_allclose(edm.loss_weight(s), (s**2 + 1) / s**2, rtol=1e-6)
    # v-parameterization identity: the perfect v of clean x0 and noise n reconstructs x0 exactly.
    x0, n = np.float32(0.37), np.float32(-1.2)
    x = x0 + s * n
    v_true = (pc.c_skip * x - x0) / -pc.c_out
    np.testing.assert_allclose(edm.denoised(v_true, x, s), np.full(s.shape, x0), atol=1e-5)


def test_sigma_sampling_is_lognormal():
    sig = edm.sample_sigma(jax.random.key(0), (200_000,))
    log = np.log(np.asarray(sig))
    assert abs(log.mean() - 0.7) < 0.02 and abs(log.std() - 1.6) < 0.02


def test_karras_sigmas_and_timesteps_match_diffusers():
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(20)
    ours = edm.karras_sigmas(20)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=1e-6)
    assert ours[0] == pytest.approx(700.0) and ours[-1] == 0.0
    np.testing.assert_allclose(edm.precondition(jnp.asarray(ours[:-1])).c_noise, sched.timesteps.numpy(), rtol=1e-5)
    assert edm.init_noise_scale(ours) == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


def _toy_v(x_in, c_noise):
    """A nonlinear toy network: depends on input, noise level and position (frames differ)."""
    pos = jnp.arange(x_in.shape[1], dtype=jnp.float32)[None, :, None]
    return jnp.tanh(0.7 * x_in + 0.1 * pos) * (1 + 0.3 * jnp.sin(c_noise))[:, None, None]


def test_euler_sampler_matches_diffusers_with_frame_guidance():
    B, T, D, steps = 2, 5, 3, 8
    noise = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
    guidance_BT = jnp.tile(edm.frame_guidance(T, 1.0, 3.0)[None], (B, 1))

    def v_pair(x_in, c_noise):  # the "unconditional" branch is a different toy
        return 0.5 * _toy_v(x_in, c_noise), _toy_v(x_in, c_noise)

    ours = edm.euler_sample(edm.guided(v_pair, guidance_BT), jnp.asarray(noise), edm.karras_sigmas(steps))

    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(steps)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    g = torch.linspace(1.0, 3.0, T)[None, :, None]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        c = jnp.full((B,), float(t))
        v_u, v_c = (torch.from_numpy(np.array(a)) for a in v_pair(jnp.asarray(x_in.numpy()), c))
        x = sched.step(v_u + g * (v_c - v_u), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-4)


def test_euler_sampler_reaches_the_data_point_of_an_ideal_denoiser():
    target = jnp.asarray([[0.5, -1.0, 2.0]])

    def ideal_v(x_in, c_noise):  # the v whose x0 estimate is exactly ``target``
        sigma = jnp.exp(4 * c_noise)[:, None]
        pc = edm.precondition(sigma)
        x = x_in / pc.c_in
        return (target - pc.c_skip * x) / pc.c_out

    out = edm.euler_sample(ideal_v, jax.random.normal(jax.random.key(1), (1, 3)), edm.karras_sigmas(10))
    np.testing.assert_allclose(out, target, atol=1e-3)
