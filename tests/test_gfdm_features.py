"""One-step features vs the reference computed with diffusers (random tiny SVD UNet + VAE, float32).

The reference is DeFI's ``Diffusion_feature_extractor``: SVD's Euler scheduler at the first of 20 Karras
steps, latents = noise * init_noise_sigma -> ``scale_model_input`` -> [latents ; VAE mode latent of the
frame repeated over T] -> UNet with (fps 4, motion 127, noise aug 0); features = [nearest-x2 upsampled
up_blocks[0] output ; up_blocks[1] output] on channels. We read diffusers' up-block outputs with hooks.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from flax import nnx

from defi_jax.gfdm.model import GFDM, GFDMOptions
from defi_jax.interop import diffusers_svd
from test_gfdm_edm import SVD_SCHEDULER

# Three levels like configs/gfdm.py:tiny (SVD has four; the feature cut is the same: after up_blocks[1]).
UNET = dict(sample_size=8, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2,
            block_out_channels=(32, 64, 64), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
            layers_per_block=1, cross_attention_dim=16, transformer_layers_per_block=1,
            num_attention_heads=(2, 4, 4), num_frames=3)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32),
           layers_per_block=1, latent_channels=4, sample_size=16, scaling_factor=0.18215, force_upcast=True)
TEXT = dict(vocab_size=64, hidden_size=8, intermediate_size=16, projection_dim=8, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=20)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    t_unet = UNetSpatioTemporalConditionModel(**UNET).eval()
    t_vae = AutoencoderKLTemporalDecoder(**VAE).eval()
    with torch.no_grad():  # diffusers zero-inits some output layers; randomize so every path is exercised
        for p in t_unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("svd")
    t_unet.save_pretrained(root / "unet")
    t_vae.save_pretrained(root / "vae")

    cfg = ml_collections.ConfigDict(dict(unet=UNET, vae=VAE, text_encoder=TEXT, num_frames=3))
    # Built abstractly (no initialisation compiles), then filled: UNet / VAE from the diffusers folders,
    # the text encoder (unused here: the features take text embeddings) with zeros.
    ours = nnx.eval_shape(lambda: GFDM(GFDMOptions.from_config(cfg), rngs=nnx.Rngs(0)))
    nnx.update(ours.unet, nnx.state(diffusers_svd.load_unet(str(root / "unet")), nnx.Param))
    nnx.update(ours.vae, nnx.state(diffusers_svd.load_vae(str(root / "vae")), nnx.Param))
    nnx.update(ours.text_encoder, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(ours.text_encoder)))
    return ours, t_unet, t_vae


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def compiled(fn, model, *args, options):
    """``fn(model, *args)`` jitted with the fast-compile ``options`` (each program runs once here)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a)).lower(state, *args).compile(options)
    return run(state, *args)


def test_one_step_features_match_diffusers(models, fast_compile):
    ours, t_unet, t_vae = models
    B, T, H = 2, 3, 16
    rs = np.random.default_rng(0)
    frame = rs.uniform(-1, 1, (B, H, H, 3)).astype(np.float32)
    text = rs.standard_normal((B, 5, 16)).astype(np.float32)
    noise = rs.standard_normal((B, T, H // 2, H // 2, 4)).astype(np.float32)

    def both(m, f, t, n):  # with the predicted latents, and cut after up_blocks[1] (one program)
        return (*m.one_step_features(f, t, None, noise_BThwc=n),
                m.one_step_features(f, t, None, noise_BThwc=n, predict_latents=False))

    feats, pred, (cut, none) = compiled(both, ours, frame, text, noise, options=fast_compile)
    # Full size: up_blocks[0] (1280 ch) upsampled + up_blocks[1] (1280 ch) = 2560 at 16 x 16; here 64 + 64 at the
    # latent resolution (three levels instead of four).
    assert feats.shape == (B, T, H // 2, H // 2, 128) and pred.shape == (B, T, H // 2, H // 2, 4)

    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(20)
    t0 = sched.timesteps[0]
    outs = {}
    hooks = [t_unet.up_blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (0, 1)]
    with torch.no_grad():
        cond = t_vae.encode(torch.from_numpy(frame).permute(0, 3, 1, 2)).latent_dist.mode()
        latents = torch.from_numpy(noise).permute(0, 1, 4, 2, 3) * sched.init_noise_sigma
        x_in = torch.cat([sched.scale_model_input(latents, t0), cond[:, None].repeat(1, T, 1, 1, 1)], dim=2)
        ids = torch.tensor([[4.0, 127.0, 0.0]] * B)
        v = t_unet(x_in, t0, encoder_hidden_states=torch.from_numpy(text), added_time_ids=ids).sample
        x0 = sched.step(v, t0, latents).pred_original_sample
    for h in hooks:
        h.remove()
    ref = torch.cat([torch.nn.functional.interpolate(outs[0], scale_factor=2), outs[1]], dim=1)  # [B*T, C, h, w]
    ref = ref.reshape(B, T, *ref.shape[1:]).permute(0, 1, 3, 4, 2).numpy()
    assert rel_err(feats, ref) <= 1e-4
    # channel layout: the first 64 channels are up_blocks[0]'s output repeated 2 x 2 (nearest), the rest up_blocks[1]
    up0 = outs[0].reshape(B, T, *outs[0].shape[1:]).permute(0, 1, 3, 4, 2).numpy()
    assert rel_err(feats[:, :, ::2, ::2, :64], up0) <= 1e-4 and rel_err(feats[:, :, 1::2, 1::2, :64], up0) <= 1e-4
    assert rel_err(pred, x0.permute(0, 1, 3, 4, 2).numpy()) <= 1e-4

    # Without the prediction, the UNet stops after up_blocks[1] and the features are the same.
    assert none is None
    np.testing.assert_allclose(np.asarray(cut), np.asarray(feats), rtol=1e-5, atol=1e-5)


def test_conditioning_is_the_unscaled_mode_latent_repeated(models):
    """UNet input channels: [c_in * noisy latents (4) ; condition latent (4), the same for every frame]."""
    ours = models[0]
    frame = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    cond = ours.encode_frames(frame)
    np.testing.assert_allclose(cond, ours.vae.encode(frame), rtol=1e-6)  # not multiplied by 0.18215
    x = jnp.ones((1, 3, 8, 8, 4))
    sample = ours._unet_input(x, cond)
    assert sample.shape == (1, 3, 8, 8, 8)
    for t in range(3):
        np.testing.assert_array_equal(sample[0, t, ..., 4:], cond[0])
        np.testing.assert_array_equal(sample[0, t, ..., :4], x[0, t])


def test_full_config_features_are_2560_channels_at_16x16():
    """configs/gfdm.py:svd at 256 px, 16 frames (abstract: shapes only, nothing allocated)."""
    from configs.gfdm import get_config

    model = nnx.eval_shape(lambda: GFDM(GFDMOptions.from_config(get_config("svd").model), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    feats, _ = jax.eval_shape(
        lambda s, f, t, k: nnx.merge(graphdef, s).one_step_features(f, t, k, predict_latents=False), state,
        jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32), jax.ShapeDtypeStruct((2, 20, 1024), jnp.float32),
        jax.random.key(0))
    assert feats.shape == (2, 16, 16, 16, 2560)
