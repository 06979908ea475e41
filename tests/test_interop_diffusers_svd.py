"""diffusers SVD folders <-> our modules: save -> from_pretrained gives the same model and outputs (also
sharded), a model built in JAX exports to the same function, and broken folders fail naming the tensors."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from _svd_reference import UNET_CASES, VAE_CASES, assert_vae_matches_diffusers, max_rel_err, torch_unet, torch_vae, \
    unet_inputs
from flax import nnx
from safetensors.numpy import load_file, save_file

from defi_jax.interop import diffusers_svd
from defi_jax.models.svd_layers import trace_rngs
from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig

torch.set_default_dtype(torch.float32)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_unet_save_loads_in_diffusers_sharded_and_identical(tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel
    ref = torch_unet("odd_size", seed=5)
    ref.save_pretrained(tmp_path / "src")
    unet = diffusers_svd.load_unet(str(tmp_path / "src"))

    diffusers_svd.save_unet(unet, str(tmp_path / "out"), max_shard_bytes=512 * 1024)  # force several shards
    files = os.listdir(tmp_path / "out")
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    back = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "out").eval()
    assert tuple(back.config.block_out_channels) == tuple(ref.config.block_out_channels)
    _assert_same_state(ref, back)
    inputs = unet_inputs("odd_size", seed=6)
    with torch.no_grad():  # same weights bit for bit; torch's kernels may still differ in the last ulp
        assert max_rel_err(back(**inputs).sample.numpy(), ref(**inputs).sample.numpy()) <= 1e-5

    # our loader reads the sharded folder too, to the same parameters
    again = diffusers_svd.load_unet(str(tmp_path / "out"))
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(unet, nnx.Param)),
                                  nnx.to_flat_state(nnx.state(again, nnx.Param))):
        assert p1 == p2 and np.array_equal(v1.get_value(), v2.get_value())


def test_vae_built_in_jax_exports_to_the_same_function(tmp_path):
    """Random JAX weights (never seen by torch) -> save_vae -> from_pretrained -> same encode / decode."""
    cfg = VAEConfig(**VAE_CASES["two_level"]["config"])
    abstract = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(cfg, rngs=trace_rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(7)
    # every parameter random (norm scales, biases and mix factors too), scaled to keep activations O(1)
    state = jax.tree.unflatten(treedef, [
        (rng.standard_normal(x.shape) / np.sqrt(max(np.prod(x.shape[:-1]), 1))).astype(x.dtype) for x in leaves])
    ref = assert_vae_matches_diffusers(nnx.merge(graphdef, state), "two_level", tmp_path, seed=8)
    assert tuple(ref.config.block_out_channels) == cfg.block_out_channels


def test_vae_round_trip_is_exact_and_fp16_variants_work(tmp_path):
    from diffusers import AutoencoderKLTemporalDecoder as Ref
    ref = torch_vae("three_level", seed=9)
    ref.save_pretrained(tmp_path / "src")
    vae = diffusers_svd.load_vae(str(tmp_path / "src"))
    diffusers_svd.save_vae(vae, str(tmp_path / "out"))
    _assert_same_state(ref, Ref.from_pretrained(tmp_path / "out"))

    # Hugging Face "fp16" variants (how the published SVD weights ship), both directions
    ref.save_pretrained(tmp_path / "hf16", variant="fp16")
    assert os.path.exists(tmp_path / "hf16" / "diffusion_pytorch_model.fp16.safetensors")
    vae16 = diffusers_svd.load_vae(str(tmp_path / "hf16"), variant="fp16")
    diffusers_svd.save_vae(vae16, str(tmp_path / "out16"), dtype=np.float16, variant="fp16")
    back = Ref.from_pretrained(tmp_path / "out16", variant="fp16")
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k].float(), v.half().float()), k


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    torch_vae("two_level", seed=10).save_pretrained(path)
    return path


def test_load_names_missing_unexpected_and_misshaped_tensors(vae_folder, tmp_path):
    tensors = load_file(vae_folder / "diffusion_pytorch_model.safetensors")
    del tensors["decoder.conv_in.bias"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["encoder.conv_in.weight"] = tensors["encoder.conv_in.weight"][:, :2]
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    with pytest.raises(ValueError) as err:
        diffusers_svd.load_vae(str(tmp_path))
    msg = str(err.value)
    assert "missing" in msg and "decoder.conv_in.bias" in msg
    assert "unexpected" in msg and "decoder.extra.weight" in msg
    assert "mis-shaped" in msg and "encoder.conv_in.weight" in msg


def test_never_reads_pickle_and_checks_the_class(vae_folder, tmp_path):
    (tmp_path / "config.json").write_text((vae_folder / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        diffusers_svd.load_vae(str(tmp_path))
    with pytest.raises(ValueError, match="AutoencoderKLTemporalDecoder"):
        diffusers_svd.load_unet(str(vae_folder))


def test_unet_config_json_round_trips(tmp_path):
    cfg = dict(UNET_CASES["two_level"]["config"])
    torch_unet("two_level").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    unet = diffusers_svd.load_unet(str(tmp_path))
    assert unet.config.block_out_channels == cfg["block_out_channels"]
    assert {k: v for k, v in unet.config.to_dict().items() if k in saved} == \
        {k: v for k, v in saved.items() if not k.startswith("_")}
