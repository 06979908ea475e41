"""launch.export_torch --lerobot: the LeRobot saved-policy folder of a tiny policy (layout, JSON keys, tensor names
and shapes, our action statistics), and that the plugin's computation + LeRobot's QUANTILES un-normalization give
the PyTorch policy's actions. LeRobot itself needs a newer Python than our pins: the load through LeRobot's own
classes runs only where it is installed (importorskip)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model

from configs import policy as policy_configs
from defi_jax import export_torch
from defi_jax.benchmarks.export import tiny_workdir
from defi_jax_torch import DeFIPolicyTorch, lerobot_folder

INSTRUCTION = "push the red block"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_lerobot")
    workdir = str(tmp / "policy")
    tiny_workdir(workdir, seed=3)     # configs/policy.py:tiny, every parameter random, normalized action statistics
    out = str(tmp / "torch")
    meta = export_torch.export(workdir, out, lerobot=True)
    return dict(out=out, lerobot=os.path.join(out, "lerobot"), meta=meta, config=policy_configs.get_config("tiny"),
                stats=_json(os.path.join(workdir, "assets", "action_stats.json")))


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_layout_config_and_processor_pipelines(exported):
    d, meta, r = exported["lerobot"], exported["meta"], exported["config"].data.resolution
    assert "lerobot" in meta["parts"]
    files = {os.path.relpath(os.path.join(p, f), d) for p, _, fs in os.walk(d) for f in fs}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json",
            "policy_preprocessor_step_3_normalizer_processor.safetensors",
            "policy_postprocessor_step_0_unnormalizer_processor.safetensors", "README.md", "defi/config.json",
            "defi/gfdm/unet/config.json", "defi/gfdm/vae/config.json", "defi/gfdm/text_encoder/config.json",
            "defi/text_encoder/config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files
    assert not any(f.startswith("defi/") and f.endswith(".safetensors") for f in files)   # weights once, in model.*

    config = _json(os.path.join(d, "config.json"))
    assert config["type"] == "defi" and config["n_obs_steps"] == 1
    assert config["input_features"] == {f"observation.images.{v}": {"type": "VISUAL", "shape": [3, r, r]}
                                        for v in ("primary", "wrist")}
    assert config["output_features"] == {"action": {"type": "ACTION", "shape": [7]}}
    assert config["normalization_mapping"] == {"VISUAL": "IDENTITY", "ACTION": "QUANTILES"}
    assert config["horizon"] == config["n_action_steps"] == 10 and config["views"] == ["primary", "wrist"]

    pre = _json(os.path.join(d, "policy_preprocessor.json"))
    post = _json(os.path.join(d, "policy_postprocessor.json"))
    assert pre["name"] == "policy_preprocessor" and post["name"] == "policy_postprocessor"
    assert [s["registry_name"] for s in pre["steps"]] == ["rename_observations_processor", "to_batch_processor",
                                                          "device_processor", "normalizer_processor"]
    assert [s["registry_name"] for s in post["steps"]] == ["unnormalizer_processor", "device_processor"]
    norm, unnorm = pre["steps"][3], post["steps"][0]
    assert norm["config"]["features"] == {**config["input_features"], **config["output_features"]}
    assert unnorm["config"]["features"] == config["output_features"]
    assert norm["config"]["norm_map"] == unnorm["config"]["norm_map"] == config["normalization_mapping"]
    ours = exported["stats"]
    assert ours["normalized"] and meta["action_stats"] == ours
    for step in (norm, unnorm):
        stats = load_file(os.path.join(d, step["state_file"]))
        # Ours: q01 / q99 of the arm, the gripper's [-1, 1] -> [0, 1] as quantiles 0 / 1.
        assert set(stats) == {"action.q01", "action.q99"}
        np.testing.assert_array_equal(stats["action.q01"].numpy(), np.float32(ours["stats"]["q01"][:6] + [0.0]))
        np.testing.assert_array_equal(stats["action.q99"].numpy(), np.float32(ours["stats"]["q99"][:6] + [1.0]))


def test_weights_are_the_whole_policy_under_defi_names(exported):
    policy = DeFIPolicyTorch.from_pretrained(exported["out"], device="cpu")
    written = load_file(os.path.join(exported["lerobot"], "model.safetensors"))
    expected = {"defi." + k: v for k, v in policy.state_dict().items()}
    assert written.keys() == expected.keys()
    for k in ("defi.unet.conv_in.weight", "defi.vae.encoder.conv_in.weight", "defi.Video_Former.latents",
              "defi.model.inner_model.action_pred.weight", "defi.lam.vq.codebook.weight", "defi.time_pos_emb",
              "defi.goal_text.text_projection.weight"):
        assert k in written, k
    for k, v in expected.items():
        assert written[k].shape == v.shape and torch.equal(written[k], v), k


def test_plugin_chunk_unnormalized_by_lerobot_gives_our_actions(exported):
    """What LeRobot runs (skeleton from defi/ configs, model.safetensors loaded strictly, the plugin's batch
    handling, then QUANTILES un-normalization with the post-processor's statistics) equals act()."""
    d = exported["lerobot"]
    holder = torch.nn.Module()
    holder.defi = DeFIPolicyTorch.from_configs(os.path.join(d, "defi"))
    missing, unexpected = load_model(holder, os.path.join(d, "model.safetensors"), strict=True)
    assert not missing and not unexpected
    reference = DeFIPolicyTorch.from_pretrained(exported["out"], device="cpu")
    r = exported["config"].data.resolution
    rs = np.random.default_rng(1)
    images = {v: rs.integers(0, 256, (r, r, 3), dtype=np.uint8) for v in ("primary", "wrist")}
    noise = reference.initial_noise(torch.Generator().manual_seed(2))
    batch = {f"observation.images.{v}": torch.as_tensor(x).permute(2, 0, 1)[None].float() / 255
             for v, x in images.items()} | {"task": [INSTRUCTION]}
    chunk = lerobot_folder.predict_chunk(holder.defi, batch, noise=noise)
    assert chunk.shape == (1, 10, 7) and float(chunk.abs().max()) <= 1.0

    stats = load_file(os.path.join(d, "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    q01, q99 = stats["action.q01"], stats["action.q99"]
    robot = ((chunk + 1.0) * (q99 - q01) / 2.0 + q01)[0].numpy()      # LeRobot's QUANTILES inverse
    ours = reference.act(images, INSTRUCTION, noise=noise)
    np.testing.assert_allclose(robot, ours, rtol=1e-5, atol=1e-6)
    assert np.abs(ours - ours.mean(0)).max() > 1e-3          # not a constant chunk
    with pytest.raises(KeyError, match="observation.images.wrist"):
        lerobot_folder.predict_chunk(holder.defi, {k: v for k, v in batch.items() if "wrist" not in k})


def test_raw_action_policies_get_identity_and_no_statistics():
    meta = {"resolution": 64, "views": ["primary"], "action_dim": 7, "horizon": 10, "dtype": "float32",
            "action_stats": {"normalized": False}}
    config = lerobot_folder.policy_config(meta)
    assert config["normalization_mapping"]["ACTION"] == "IDENTITY"
    assert lerobot_folder.action_stats(meta["action_stats"]) is None
    pre, post = lerobot_folder._pipelines(config, None)
    assert not any("state_file" in s for s in pre["steps"] + post["steps"])


def test_loads_through_lerobot(exported):
    pytest.importorskip("lerobot")
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    from defi_jax_torch.lerobot import DeFIConfig, DeFIPolicy

    d = exported["lerobot"]
    assert get_policy_class("defi") is DeFIPolicy
    policy = DeFIPolicy.from_pretrained(d)
    assert isinstance(policy.config, DeFIConfig)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=d)
    reference = DeFIPolicyTorch.from_pretrained(exported["out"], device="cpu")
    r = exported["config"].data.resolution
    rs = np.random.default_rng(4)
    images = {v: rs.integers(0, 256, (r, r, 3), dtype=np.uint8) for v in ("primary", "wrist")}
    noise = reference.initial_noise(torch.Generator().manual_seed(5))
    observation = {f"observation.images.{v}": torch.as_tensor(x).permute(2, 0, 1).float() / 255
                   for v, x in images.items()} | {"task": INSTRUCTION}
    batch = pre(observation)
    chunk = post(policy.predict_action_chunk(batch, noise=noise).cpu())
    np.testing.assert_allclose(chunk[0].numpy(), reference.act(images, INSTRUCTION, noise=noise), rtol=1e-5,
                               atol=1e-6)
    policy.reset()
    first = post(policy.select_action(batch, noise=noise))
    np.testing.assert_allclose(first[0].numpy(), chunk[0, 0].numpy(), rtol=1e-5, atol=1e-6)
