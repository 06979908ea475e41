"""DINOv2-with-registers parity with transformers (random weights, small configs, float32) + torch-hub names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import defi_jax  # noqa: F401  (flax settings)
from defi_jax.interop import hf_dinov2
from defi_jax.models import dinov2
from _encoder_checks import assert_shards_on_8_devices

transformers = pytest.importorskip("transformers")

# (config, input sizes (H, W)): the first size of each is the trained one, the others interpolate positions
CASES = [
    (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
          num_register_tokens=4), [(16, 16), (12, 12), (16, 28)]),
    (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=35, patch_size=7,
          num_register_tokens=2, qkv_bias=False, layerscale_value=0.3, mlp_ratio=2),
     [(35, 35), (28, 28), (42, 49)]),
]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _hf_model(kw, seed):
    torch.manual_seed(seed)
    model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial registers / layer scales so that their conversion is checked
        for name, p in model.named_parameters():
            if "register_tokens" in name or "mask_token" in name or "lambda1" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "lambda1" in name else 0.0))
    return model


def _run_hf(model, x_BHWC):
    with torch.no_grad():
        return model(torch.tensor(x_BHWC).permute(0, 3, 1, 2)).last_hidden_state.numpy()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_load_and_save_match_transformers(case, tmp_path):
    kw, sizes = CASES[case]
    ref = _hf_model(kw, case)
    ref.save_pretrained(tmp_path / "hf")
    dino = hf_dinov2.load(str(tmp_path / "hf"))
    fwd = jax.jit(lambda m, x: m(x))
    rs = np.random.RandomState(case)
    for h, w in sizes:
        x = rs.randn(2, h, w, 3).astype(np.float32)
        got = fwd(dino, jnp.asarray(x))
        n_patches = (h // kw["patch_size"]) * (w // kw["patch_size"])
        assert got.shape == (2, 1 + kw["num_register_tokens"] + n_patches, kw["hidden_size"])
        assert _rel(got, _run_hf(ref, x)) <= 1e-4, (h, w)

    hf_dinov2.save(dino, str(tmp_path / "ours"))
    back = transformers.Dinov2WithRegistersModel.from_pretrained(str(tmp_path / "ours")).eval()
    x = rs.randn(2, *sizes[1], 3).astype(np.float32)
    assert _rel(fwd(dino, jnp.asarray(x)), _run_hf(back, x)) <= 1e-4


def test_torch_hub_state_dict_both_directions(tmp_path):
    from safetensors.numpy import save_file

    kw, sizes = CASES[0]
    ref = _hf_model(kw, 7)
    ref.save_pretrained(tmp_path / "hf")
    hf_tensors = {k: v.numpy() for k, v in _legacy_state_dict(tmp_path / "hf").items()}
    hub = hf_dinov2.hf_to_hub_names(hf_tensors)
    assert hub["blocks.1.attn.qkv.weight"].shape == (3 * 32, 32)
    assert {"cls_token", "register_tokens", "pos_embed", "mask_token", "patch_embed.proj.weight",
            "blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "norm.weight"} <= set(hub)
    # hub names for every transformers tensor, and back to exactly the same tensors
    back = hf_dinov2.hub_to_hf_names(hub)
    assert set(back) == set(hf_tensors)
    for k in hf_tensors:
        np.testing.assert_array_equal(back[k], hf_tensors[k])

    save_file(hub, tmp_path / "hub.safetensors")
    cfg = dinov2.Dinov2Config(**kw)
    fwd = jax.jit(lambda m, x: m(x))
    for dino in (hf_dinov2.load_torch_hub_state_dict(str(tmp_path / "hub.safetensors"), cfg),
                 hf_dinov2.load_torch_hub_state_dict(hub, cfg)):
        x = np.random.RandomState(0).randn(2, *sizes[1], 3).astype(np.float32)
        assert _rel(fwd(dino, jnp.asarray(x)), _run_hf(ref, x)) <= 1e-4
    ours = hf_dinov2.to_torch_hub_state_dict(dino)
    assert set(ours) == set(hub)
    for k in hub:
        np.testing.assert_allclose(ours[k], hub[k], rtol=0, atol=0)


def test_torch_hub_config_inference_and_in_place_load():
    kw = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, image_size=28, patch_size=14,
              mlp_ratio=2, num_register_tokens=4)
    cfg = dinov2.Dinov2Config(**kw)
    ref = _hf_model(kw, 3)
    abstract = lambda: nnx.eval_shape(lambda: dinov2.Dinov2(cfg, rngs=nnx.Rngs(0)))  # noqa: E731
    src = hf_dinov2.from_state_dict(abstract(), {k: v.numpy() for k, v in ref.state_dict().items()})
    hub = hf_dinov2.to_torchhub_state_dict(src)
    assert hf_dinov2._infer_hub_config(hf_dinov2.hub_to_hf_names(hub)) == cfg
    dst = hf_dinov2.from_state_dict(abstract(), {k: np.zeros_like(v) for k, v in hf_dinov2.to_state_dict(src).items()})
    hf_dinov2.load_torchhub_state_dict(dst, hub)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(src, nnx.Param)),
                              nnx.to_flat_state(nnx.state(dst, nnx.Param))):
        if str(p[-1]) == "kernel":
            assert np.abs(np.asarray(a.get_value())).max() > 0, p
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


def test_interpolation_matrix_matches_torch():
    rs = np.random.RandomState(0)
    for n_in, n_out in ((37, 16), (16, 37), (5, 4), (4, 6), (37, 37), (7, 3)):
        x = rs.randn(1, 3, n_in, n_in).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.tensor(x), size=(n_out, n_out), mode="bicubic",
                                               align_corners=False, antialias=True).numpy()
        m = dinov2.bicubic_aa_matrix(n_in, n_out)
        got = np.einsum("oh,pw,bchw->bcop", m, m, x)
        assert _rel(got, want) <= 1e-5, (n_in, n_out)


def test_full_config_parameter_count_and_tokens():
    cfg = dinov2.Dinov2Config()
    model = nnx.eval_shape(lambda: dinov2.Dinov2(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 86_583_552
    assert_shards_on_8_devices(params, (3072, 768))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
    one_layer = dinov2.Dinov2Config(num_hidden_layers=1)  # the token layout does not depend on depth
    out = jax.eval_shape(lambda x: dinov2.Dinov2(one_layer, rngs=nnx.Rngs(0))(x),
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 1 + 4 + 256, 768)


def test_bad_input_and_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    kw, _ = CASES[0]
    _hf_model(kw, 0).save_pretrained(tmp_path)
    dino = hf_dinov2.load(str(tmp_path))
    with pytest.raises(ValueError, match="channels-last"):
        dino(jnp.zeros((1, 3, 16, 16)))
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layer_scale2" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layer_scale2"):
        hf_dinov2.load(str(tmp_path))


def _legacy_state_dict(folder):
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")

