"""SVD VAE: parity with diffusers' AutoencoderKLTemporalDecoder (random weights, float32) for the encoder
moments and the temporal decoder; exact SVD parameter count; scaling factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _svd_reference import VAE_CASES, fast_jit, max_rel_err, nchw, nhwc, rel_err, torch_vae
from flax import nnx

from defi_jax.interop import diffusers_svd
from defi_jax.models.svd_layers import trace_rngs
from defi_jax.models.svd_unet import count_params
from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig

torch.set_default_dtype(torch.float32)
SVD_VAE_PARAMS = 97_742_847


def _jax_vae_outputs(vae, x_NHW3, z_Nhw4, num_frames):
    graphdef, state = nnx.split(vae)

    def run(state, x, z):
        model = nnx.merge(graphdef, state)
        mean, logvar = model.encode_moments(x)
        return mean, logvar, model.encode(x), model.decode(z, num_frames=num_frames)

    return fast_jit(run, state, x_NHW3, z_Nhw4)(state, x_NHW3, z_Nhw4)


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_encode_decode_match_diffusers(case, tmp_path):
    c = VAE_CASES[case]
    ref = torch_vae(case, seed=3)
    ref.save_pretrained(tmp_path)
    vae = diffusers_svd.load_vae(str(tmp_path))
    g = torch.Generator().manual_seed(4)
    n, (h, w) = c["videos"] * c["frames"], c["size"]
    x = torch.rand(n, 3, h, w, generator=g) * 2 - 1
    latent_c = c["config"].get("latent_channels", 4)
    z = torch.randn(n, latent_c, h // 2 ** (len(c["config"]["block_out_channels"]) - 1),
                    w // 2 ** (len(c["config"]["block_out_channels"]) - 1), generator=g)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        ref_dec = ref.decode(z, num_frames=c["frames"]).sample

    mean, logvar, mode, dec = _jax_vae_outputs(vae, nhwc(x), nhwc(z), c["frames"])

    assert mode.shape == (n, z.shape[2], z.shape[3], latent_c)
    for ours, theirs in ((mean, post.mean), (logvar, post.logvar), (mode, post.mode()), (dec, ref_dec)):
        assert max_rel_err(nchw(ours), theirs.numpy()) <= 1e-4
    # decoding is temporal: the frames of one video see each other, so per-frame decoding differs
    with torch.no_grad():
        per_frame = ref.decode(z, num_frames=1).sample
    assert rel_err(nchw(dec), per_frame.numpy()) > 1e-3


def test_sample_follows_the_posterior():
    mean, logvar = jnp.full((4096, 1, 1, 1), 2.0), jnp.full((4096, 1, 1, 1), np.log(0.25))
    z = np.asarray(AutoencoderKLTemporalDecoder.sample(mean, logvar, jax.random.key(0)))
    assert abs(z.mean() - 2.0) < 0.03 and abs(z.std() - 0.5) < 0.03


def test_svd_config_parameter_count_and_scaling():
    from diffusers import AutoencoderKLTemporalDecoder as Ref
    cfg = VAEConfig.svd()
    assert cfg.scaling_factor == 0.18215
    vae = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(cfg, rngs=trace_rngs(0)))
    assert count_params(vae) == SVD_VAE_PARAMS
    with torch.device("meta"):
        ref = Ref(**{k: v for k, v in cfg.to_dict().items()})
    assert sum(p.numel() for p in ref.parameters()) == SVD_VAE_PARAMS
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), path
    assert VAEConfig.from_dict(dict(cfg.to_dict(), _class_name="AutoencoderKLTemporalDecoder")) == cfg


def test_decode_rejects_frames_that_do_not_split_into_videos():
    vae = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(VAEConfig(), rngs=trace_rngs(0)))
    with pytest.raises(ValueError, match="num_frames=2"):
        nnx.eval_shape(lambda m: m.decode(jnp.zeros((3, 4, 4, 4)), num_frames=2), vae)
