"""launch.export_torch + defi_jax_torch: a tiny policy workdir exported to a PyTorch folder acts like the JAX
policy (same images, same noise) within 1e-4 relative in float32; the folder loads strictly."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import random_model, save_model, save_params, save_random_workdir
from flax import nnx

from configs import gfdm as gfdm_configs
from configs import gidm as gidm_configs
from configs import policy as policy_configs
from defi_jax import checkpoint, export_torch
from defi_jax.inference import DeFIPolicy, unnormalize
from defi_jax_torch import DeFIPolicyTorch

STATS = {"normalized": True, "stats": {"q01": [-0.5, -0.4, -0.3, -0.2, -0.1, -0.05, 0.0],
                                       "q99": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_torch")
    c = policy_configs.get_config("tiny")
    c.init.sources.gfdm.path = c.init.sources.gidm.path = ""
    c.policy.gfdm_init, c.policy.gidm_init = "initial", "random"
    # Standardized features (model.center_features + scale_features): the export folds the mean and the standard
    # deviation into the input layers' weights and biases.
    c.model.center_features, c.model.scale_features = True, True
    c.init.sources.feature_stats.path = str(tmp / "features")
    workdir = str(tmp / "policy")
    model = random_model("policy", c, seed=0)            # a stand-in fine-tuned run: random weights, no compile
    model.feature_stats.mean[...] = jax.random.normal(jax.random.key(5), model.feature_stats.mean.shape) * 2.0
    model.feature_stats.std[...] = jnp.exp(jax.random.normal(jax.random.key(6), model.feature_stats.std.shape))
    save_model(c, workdir, model)
    os.makedirs(os.path.join(workdir, "assets"))
    with open(os.path.join(workdir, "assets", "action_stats.json"), "w") as f:
        json.dump(STATS, f)
    out = str(tmp / "torch")
    meta = export_torch.export(workdir, out)
    return dict(tmp=tmp, workdir=workdir, out=out, meta=meta, config=c)


def test_folder_layout_and_no_pickle(exported):
    out, meta = exported["out"], exported["meta"]
    for part in ("gfdm/unet", "gfdm/vae", "gfdm/text_encoder", "text_encoder", "gidm", "policy"):
        assert os.path.isfile(os.path.join(out, part, "config.json")), part
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files), files
    assert {"config.json", "README.md", "action_stats.json", "action_stats.safetensors"} <= set(files)
    assert not any(".tmp-" in name for name in os.listdir(exported["tmp"]))     # renamed into place
    assert meta["gfdm"]["fps"] == 4 and meta["gfdm"]["motion_bucket_id"] == 127 and meta["gfdm"]["noise_aug"] == 0
    assert meta["views"] == ["primary", "wrist"] and meta["horizon"] == 10 and meta["action_stats"] == STATS
    readme = open(os.path.join(out, "README.md")).read()
    assert "DeFIPolicyTorch.from_pretrained" in readme and "UNetSpatioTemporalConditionModel" in readme
    from safetensors.torch import load_file
    names = set(load_file(os.path.join(out, "policy", "model.safetensors")))
    names |= set(load_file(os.path.join(out, "gidm", "model.safetensors")))
    # The reference's stage-3 names.
    for key in ("Video_Former.latents", "model.inner_model.action_pred.weight", "model.inner_model.pos_emb",
                "goal_emb.0.weight", "time_pos_emb", "lam.vq.codebook.weight", "lam.text_encoder.embed.weight"):
        assert key in names, key


def test_torch_policy_acts_like_the_jax_policy(exported):
    c = exported["config"]
    jp = DeFIPolicy.from_checkpoint(exported["workdir"])
    tpol = DeFIPolicyTorch.from_pretrained(exported["out"], device="cpu")
    r = c.data.resolution
    rs = np.random.default_rng(0)
    images = {v: rs.integers(0, 256, (r, r, 3), dtype=np.uint8) for v in ("primary", "wrist")}
    instruction = "push the red block"
    noise = tpol.initial_noise(torch.Generator().manual_seed(0))
    assert noise["gfdm"].shape[:2] == (2, c.model.gfdm.num_frames) and noise["actions"].shape == (10, 7)

    # JAX: the same computation as DeFIPolicyModel.act, with the noise given explicitly.
    model = nnx.merge(jp._graphdef, jp._state)
    text = jp.encode_instructions([instruction])
    frames = np.stack([images[v] for v in jp.views])[None]
    gfdm_noise = noise["gfdm"].numpy().transpose(0, 1, 3, 4, 2)            # [V, T, h, w, 4]
    act_noise = noise["actions"].numpy()[None]

    def act(m, frames, text, gfdm_noise, act_noise):
        feats = m.features(frames, text["gfdm"], None, noise=gfdm_noise)
        context, _ = m.context(feats, text)
        return feats, m.head.sample(context, act_noise, num_steps=jp.num_steps, sigma_min=jp.sigma_min)

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, *a: act(nnx.merge(graphdef, s), *a)).lower(
        state, frames, text, gfdm_noise, act_noise).compile({"xla_backend_optimization_level": 0})
    feats, ours = (np.asarray(x) for x in run(state, frames, text, gfdm_noise, act_noise))

    with torch.no_grad():
        t_text = tpol.encode_instruction(instruction)
        t_feats = tpol.features(torch.as_tensor(frames), t_text["gfdm"], noise["gfdm"]).numpy()
    assert t_feats.shape == feats.shape
    assert _rel(t_feats, feats) <= 1e-4
    theirs = tpol.act(images, instruction, noise=noise, normalized=True)
    assert theirs.shape == (10, 7) and np.abs(ours[0]).max() > 0.1
    assert _rel(theirs, ours[0]) <= 1e-4, (theirs, ours[0])
    robot = tpol.act(images, instruction, noise=noise)
    assert _rel(robot, unnormalize(ours[0], STATS)) <= 1e-4
    # Different noise, different actions; the generator path draws it.
    other = tpol.act(images, instruction, generator=torch.Generator().manual_seed(1), normalized=True)
    assert _rel(other, theirs) > 1e-3
    # bfloat16 compute: the same actions up to bfloat16 rounding.
    bf16 = DeFIPolicyTorch.from_pretrained(exported["out"], device="cpu", dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.time_pos_emb.dtype == torch.float32
    assert _rel(bf16.act(images, instruction, noise=noise, normalized=True), theirs) < 0.1


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_tampered_folder_fails_naming_every_tensor_with_both_shapes(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = str(tmp_path / "bad")
    shutil.copytree(exported["out"], bad)
    path = os.path.join(bad, "policy", "model.safetensors")
    tensors = load_file(path)
    w = tensors.pop("model.inner_model.action_pred.weight")
    tensors["model.inner_model.action_pred.weight_renamed"] = w
    tensors["Video_Former.latents"] = tensors["Video_Former.latents"][:, :1].contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        DeFIPolicyTorch.from_pretrained(bad, device="cpu")
    msg = str(err.value)
    latents = list(load_file(os.path.join(exported["out"], "policy", "model.safetensors"))["Video_Former.latents"].shape)
    assert f"missing model.inner_model.action_pred.weight {list(w.shape)}" in msg
    assert "unexpected model.inner_model.action_pred.weight_renamed" in msg
    assert f"mis-shaped Video_Former.latents: file {[latents[0], 1, latents[2]]}, model {latents}" in msg


def test_a_truncated_safetensors_file_fails_naming_it(exported, tmp_path):
    bad = str(tmp_path / "truncated")
    shutil.copytree(exported["out"], bad)
    path = os.path.join(bad, "gidm", "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=r"gidm/model\.safetensors.*truncated"):
        DeFIPolicyTorch.from_pretrained(bad, device="cpu")
    unet = os.path.join(bad, "gfdm", "unet", "diffusion_pytorch_model.safetensors")
    with open(unet, "r+b") as f:
        f.truncate(os.path.getsize(unet) // 2)
    with pytest.raises(ValueError, match=r"gfdm/unet"):
        export_torch.verify(bad)


def test_a_gfdm_workdir_exports_its_stage_in_bfloat16(exported, tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    c = gfdm_configs.get_config("tiny")     # the policy's GFDM as a GFDM workdir of its own
    save_params(c, str(tmp_path / "gfdm"), checkpoint.restore_params(exported["workdir"], prefix="gfdm/"))
    meta = export_torch.export(str(tmp_path / "gfdm"), str(tmp_path / "out"), dtype="bfloat16")
    assert meta["stage"] == "gfdm" and meta["parts"] == ["gfdm/unet", "gfdm/vae", "gfdm/text_encoder"]
    from safetensors.torch import load_file
    folder = tmp_path / "out" / "gfdm" / "unet"
    assert {t.dtype for t in load_file(str(folder / "diffusion_pytorch_model.safetensors")).values()} == {torch.bfloat16}
    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    assert next(unet.parameters()).dtype == torch.bfloat16
    ours = checkpoint.restore_params(str(tmp_path / "gfdm"))["unet/conv_in/kernel"]   # [3, 3, in, out]
    np.testing.assert_allclose(unet.conv_in.weight.detach().float().numpy(), np.asarray(ours).transpose(3, 2, 0, 1),
                               rtol=1e-2, atol=1e-2)


def test_a_gidm_workdir_exports_the_reference_stage2_names(tmp_path):
    from safetensors.numpy import load_file

    from defi_jax.interop import defi_torch

    c = gidm_configs.get_config("tiny")
    model = save_random_workdir("gidm", c, str(tmp_path / "gidm"), seed=4)
    meta = export_torch.export(str(tmp_path / "gidm"), str(tmp_path / "out"))
    assert meta["stage"] == "gidm" and meta["parts"] == ["gidm"]
    written = load_file(str(tmp_path / "out" / "gidm" / "model.safetensors"))
    expected = defi_torch.gidm_state_dict(model)
    assert written.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
