"""Small randomly initialised diffusers SVD models for the parity tests (UNet, VAE, interop)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import defi_jax  # noqa: E402,F401  (flax settings before any model is built)

CA_DOWN, DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CA_UP, UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"

# Two shapes of UNet: the SVD layout shrunk to 2 levels, and one with per-block layer counts, 2 transformer
# layers per attention, single-head attention and an odd spatial size (diffusers then forwards explicit
# upsample sizes).
UNET_CASES = {
    "two_level": dict(
        config=dict(block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP),
                    num_attention_heads=(2, 4), cross_attention_dim=16, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=24, layers_per_block=1),
        batch=2, frames=3, size=(16, 16), text_len=5),
    "odd_size": dict(
        config=dict(in_channels=6, out_channels=3, block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN),
                    up_block_types=(UP, CA_UP), num_attention_heads=(1, 2), cross_attention_dim=24,
                    addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=(1, 2),
                    transformer_layers_per_block=(2, 1)),
        batch=1, frames=2, size=(9, 11), text_len=3),
}

VAE_CASES = {
    "two_level": dict(config=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  layers_per_block=1), frames=2, videos=2, size=(16, 16)),
    "three_level": dict(config=dict(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                                    layers_per_block=2, latent_channels=3), frames=3, videos=1, size=(24, 16)),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs every 1-d parameter (norm scales / biases, linear / conv biases, mix factors): diffusers starts
    them at constants (1, 0, 0.5), which would hide a swapped or dropped parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_unet(case: str, seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel
    torch.manual_seed(seed)
    return randomize_(UNetSpatioTemporalConditionModel(**UNET_CASES[case]["config"]), seed)


def torch_vae(case: str, seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(seed)
    return randomize_(AutoencoderKLTemporalDecoder(**VAE_CASES[case]["config"]), seed)


def unet_inputs(case: str, seed: int = 0) -> dict[str, torch.Tensor]:
    c = UNET_CASES[case]
    g = torch.Generator().manual_seed(seed)
    b, t, (h, w) = c["batch"], c["frames"], c["size"]
    cfg = c["config"]
    fps = torch.tensor([7.0, 4.0][:b])
    return dict(
        sample=torch.randn(b, t, cfg.get("in_channels", 8), h, w, generator=g),
        timestep=torch.rand(b, generator=g) * 2 - 0.5,  # EDM's c_noise = ln(sigma) / 4 range
        encoder_hidden_states=torch.randn(b, c["text_len"], cfg["cross_attention_dim"], generator=g),
        added_time_ids=torch.stack([fps, torch.full((b,), 127.0), torch.rand(b, generator=g) * 0.1], -1))


def unet_inputs_jax(inputs: dict[str, torch.Tensor]) -> tuple:
    """The same inputs channels-last: sample [B, T, C, H, W] -> [B, T, H, W, C]."""
    return (jnp.asarray(inputs["sample"].permute(0, 1, 3, 4, 2).numpy()), jnp.asarray(inputs["timestep"].numpy()),
            jnp.asarray(inputs["encoder_hidden_states"].numpy()), jnp.asarray(inputs["added_time_ids"].numpy()))


def torch_unet_outputs(model, inputs, num_up_blocks: int = 2):
    """Final output and the first ``num_up_blocks`` up blocks' outputs (forward hooks), all numpy [B,T,H,W,C]."""
    b, t = inputs["sample"].shape[:2]
    feats = []
    hooks = [model.up_blocks[i].register_forward_hook(lambda _m, _i, out: feats.append(out))
             for i in range(num_up_blocks)]
    try:
        with torch.no_grad():
            out = model(**inputs).sample
    finally:
        for h in hooks:
            h.remove()
    to_last = lambda x: x.reshape(b, t, *x.shape[1:]).permute(0, 1, 3, 4, 2).numpy()  # noqa: E731
    return out.permute(0, 1, 3, 4, 2).numpy(), [to_last(f) for f in feats]


def fast_jit(fn, *args):
    """jit-compiled ``fn`` at XLA's lowest backend optimisation level: half the compile time on CPU, and these
    tests run each program once."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def jax_unet_outputs(unet, sample, timestep, ehs, ati, num_up_blocks: int = 2):
    """Our final output and up-block features (the public ``num_up_blocks`` path), from one compiled program."""
    graphdef, state = nnx.split(unet)

    def both(state, *inputs):
        model = nnx.merge(graphdef, state)
        return model(*inputs), model(*inputs, num_up_blocks=num_up_blocks)

    args = (state, sample, timestep, ehs, ati)
    return fast_jit(both, *args)(*args)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def max_rel_err(ours, ref) -> float:
    """Worst element error relative to the reference's largest magnitude (stricter than the norm ratio)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def nchw(x_NHWC) -> np.ndarray:
    return np.asarray(x_NHWC).transpose(0, 3, 1, 2)


def nhwc(x_NCHW: torch.Tensor) -> jax.Array:
    return jnp.asarray(x_NCHW.permute(0, 2, 3, 1).numpy())


def assert_vae_matches_diffusers(vae, case: str, folder, seed: int):
    """Our ``vae`` -> ``save_vae(folder)`` -> diffusers ``from_pretrained``: encode (the latent mode) and decode of
    random frames of ``VAE_CASES[case]`` agree within 1e-4 (max relative). Returns the diffusers model."""
    from diffusers import AutoencoderKLTemporalDecoder

    from defi_jax.interop import diffusers_svd

    c = VAE_CASES[case]
    diffusers_svd.save_vae(vae, str(folder))
    ref = AutoencoderKLTemporalDecoder.from_pretrained(folder).eval()
    x = torch.rand(c["videos"] * c["frames"], 3, *c["size"], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    graphdef, state = nnx.split(vae)

    def run(state, x):
        model = nnx.merge(graphdef, state)
        z = model.encode(x)
        return z, model.decode(z, num_frames=c["frames"])

    z, dec = fast_jit(run, state, nhwc(x))(state, nhwc(x))
    with torch.no_grad():
        ref_z = ref.encode(x).latent_dist.mode()
        ref_dec = ref.decode(ref_z, num_frames=c["frames"]).sample
    assert max_rel_err(nchw(z), ref_z.numpy()) <= 1e-4
    assert max_rel_err(nchw(dec), ref_dec.numpy()) <= 1e-4
    return ref
