"""The LeRobot saved-policy folder of a DeFI policy (written without LeRobot; read by ``defi_jax_torch.lerobot``).

``python -m launch.export_torch ... --lerobot`` writes ``OUT/lerobot/`` beside the deployment folder::

    config.json                        LeRobot's policy config: "type": "defi", input_features
                                       (observation.images.<view>: VISUAL [3, H, W]), output_features (action:
                                       ACTION [7]), normalization_mapping (VISUAL: IDENTITY, ACTION: QUANTILES)
    model.safetensors                  every tensor of the whole policy (``DeFIPolicy.state_dict()``:
                                       ``defi.unet.*``, ``defi.vae.*``, ``defi.gfdm_text.*``, ``defi.goal_text.*``,
                                       ``defi.Video_Former.*``, ``defi.model.*``, ``defi.goal_emb.*``, ``defi.lam.*``,
                                       ``defi.time_pos_emb``)
    policy_preprocessor.json           rename -> batch -> device -> normalizer_processor
    policy_preprocessor_step_3_normalizer_processor.safetensors     action.q01, action.q99 [7]
    policy_postprocessor.json          unnormalizer_processor -> device (cpu)
    policy_postprocessor_step_0_unnormalizer_processor.safetensors  action.q01, action.q99 [7]
    defi/                              the parts' config.json files and tokenizers (no weights): what
                                       ``DeFIPolicyTorch.from_configs`` builds the skeleton from
    README.md

The statistics are ours: q01 / q99 of the six arm dimensions and 0 / 1 for the gripper, so LeRobot's QUANTILES
un-normalization of the policy's [-1, 1] output (clipped, as ours is) is exactly
``data_pipelines.actions.unnormalize``. A policy trained on raw actions gets IDENTITY and no statistics.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np
import torch

POLICY_TYPE = "defi"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "policy_preprocessor"
POSTPROCESSOR = "policy_postprocessor"
NORMALIZER_STATE = f"{PREPROCESSOR}_step_3_normalizer_processor.safetensors"
UNNORMALIZER_STATE = f"{POSTPROCESSOR}_step_0_unnormalizer_processor.safetensors"
IMAGE_PREFIX = "observation.images."
ACTION = "action"
TASK = "task"
SKELETON = "defi"      # the subfolder of part configs and tokenizers
_SKELETON_FILES = ("config.json", "gfdm/unet/config.json", "gfdm/vae/config.json", "gfdm/text_encoder/config.json",
                   "text_encoder/config.json")


def action_stats(stats_asset: Mapping) -> dict[str, np.ndarray] | None:
    """LeRobot QUANTILES statistics reproducing our action un-normalization (None for raw actions)."""
    if not stats_asset.get("normalized", False):
        return None
    q01 = np.asarray(stats_asset["stats"]["q01"], np.float32)[:6]
    q99 = np.asarray(stats_asset["stats"]["q99"], np.float32)[:6]
    return {"q01": np.concatenate([q01, [0.0]]).astype(np.float32),      # the gripper: [-1, 1] -> [0, 1]
            "q99": np.concatenate([q99, [1.0]]).astype(np.float32)}


def policy_config(meta: Mapping) -> dict:
    """LeRobot's ``config.json`` (what ``draccus.encode(config, PreTrainedConfig)`` writes for ``DeFIConfig``)."""
    r = int(meta["resolution"])
    normalized = meta["action_stats"].get("normalized", False)
    return {"type": POLICY_TYPE, "n_obs_steps": 1,
            "input_features": {IMAGE_PREFIX + v: {"type": "VISUAL", "shape": [3, r, r]} for v in meta["views"]},
            "output_features": {ACTION: {"type": "ACTION", "shape": [int(meta["action_dim"])]}},
            "device": None, "use_amp": False, "use_peft": False, "push_to_hub": False, "repo_id": None,
            "private": None, "tags": None, "license": None, "pretrained_path": None, "pretrained_revision": None,
            "normalization_mapping": {"VISUAL": "IDENTITY", "ACTION": "QUANTILES" if normalized else "IDENTITY"},
            "horizon": int(meta["horizon"]), "n_action_steps": int(meta["horizon"]), "views": list(meta["views"]),
            "dtype": meta["dtype"]}


def _pipelines(config: Mapping, stats: Mapping | None) -> tuple[dict, dict]:
    """``policy_preprocessor.json`` and ``policy_postprocessor.json`` (LeRobot's default policy pipelines)."""
    norm = {"eps": 1e-8, "features": {**config["input_features"], **config["output_features"]},
            "norm_map": config["normalization_mapping"]}
    unnorm = {"eps": 1e-8, "features": dict(config["output_features"]), "norm_map": config["normalization_mapping"]}
    normalizer = {"registry_name": "normalizer_processor", "config": norm}
    unnormalizer = {"registry_name": "unnormalizer_processor", "config": unnorm}
    if stats is not None:
        normalizer["state_file"], unnormalizer["state_file"] = NORMALIZER_STATE, UNNORMALIZER_STATE
    pre = {"name": PREPROCESSOR, "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        normalizer]}
    post = {"name": POSTPROCESSOR, "steps": [
        unnormalizer, {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    return pre, post


def write(deployment: str, out: str, policy) -> dict:
    """Writes the LeRobot folder of the deployment folder ``deployment`` (whose loaded ``DeFIPolicyTorch`` is
    ``policy``) to ``out``; returns its ``config.json``."""
    from safetensors.numpy import save_file
    from safetensors.torch import save_model

    with open(os.path.join(deployment, "config.json")) as f:
        meta = json.load(f)
    os.makedirs(out, exist_ok=True)
    config = policy_config(meta)
    stats = action_stats(meta["action_stats"])
    pre, post = _pipelines(config, stats)
    for name, obj in (("config.json", config), (f"{PREPROCESSOR}.json", pre), (f"{POSTPROCESSOR}.json", post)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
    if stats is not None:
        flat = {f"{ACTION}.{k}": v for k, v in stats.items()}
        save_file(flat, os.path.join(out, NORMALIZER_STATE))
        save_file(flat, os.path.join(out, UNNORMALIZER_STATE))
    holder = torch.nn.Module()
    holder.defi = policy
    save_model(holder, os.path.join(out, WEIGHTS), metadata={"format": "pt"})   # shared (tied) tensors once
    for rel in _SKELETON_FILES:
        os.makedirs(os.path.dirname(os.path.join(out, SKELETON, rel)), exist_ok=True)
        shutil.copy(os.path.join(deployment, rel), os.path.join(out, SKELETON, rel))
    if os.path.isdir(os.path.join(deployment, "tokenizers")):
        shutil.copytree(os.path.join(deployment, "tokenizers"), os.path.join(out, SKELETON, "tokenizers"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_readme(config))
    return config


def images_uint8(batch: Mapping, views, index: int) -> dict[str, np.ndarray]:
    """One observation of a LeRobot batch (``observation.images.<view>``: float [B, 3, H, W] in [0, 1]) as the
    uint8 [H, W, 3] images ``DeFIPolicyTorch.act`` reads."""
    out = {}
    for v in views:
        key = IMAGE_PREFIX + v
        if key not in batch:
            raise KeyError(f"the batch has no {key!r} (keys: {sorted(batch)}); rename the camera with LeRobot's "
                           f"rename_map")
        x = torch.as_tensor(batch[key])[index].detach().float().cpu()
        out[v] = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return out


def predict_chunk(policy, batch: Mapping, *, noise: Mapping | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalized action chunks [B, horizon, action_dim] in [-1, 1] for a LeRobot batch (images and ``task``);
    LeRobot's post-processor un-normalizes them. ``noise``: one ``initial_noise()`` dict, for every row."""
    tasks = batch[TASK]
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    chunks = [np.clip(policy.act(images_uint8(batch, policy.views, b), task, noise=noise, generator=generator,
                                 normalized=True), -1.0, 1.0) for b, task in enumerate(tasks)]
    return torch.as_tensor(np.stack(chunks))


def _readme(config: Mapping) -> str:
    views = ", ".join(f"`{k}`" for k in config["input_features"])
    return "\n".join([
        "# DeFI policy for LeRobot", "",
        "A LeRobot saved-policy folder (`config.json` type `defi`, `model.safetensors`, the pre- / post-processor "
        "pipelines with the policy's action statistics), written by `python -m launch.export_torch --lerobot`. "
        "The policy class lives in `defi_jax_torch.lerobot` (install `defi-jax[torch]` beside LeRobot); import it "
        "(or pass `--policy.discover_packages_path=defi_jax_torch.lerobot`) so LeRobot knows the type:", "",
        "```python", "import defi_jax_torch.lerobot  # registers the 'defi' policy type",
        "from lerobot.policies.factory import make_pre_post_processors",
        "from defi_jax_torch.lerobot import DeFIPolicy", "",
        "policy = DeFIPolicy.from_pretrained(\"THIS_FOLDER\")",
        "pre, post = make_pre_post_processors(policy.config, pretrained_path=\"THIS_FOLDER\")",
        "action = post(policy.select_action(pre(observation)))   # observation: "
        + views + " float [3, H, W] in [0, 1], plus `task`", "```", "",
        f"Actions: chunks of {config['horizon']} steps, executed {config['n_action_steps']} at a time. "
        "`defi/` holds the parts' configs and tokenizers the networks are built from; every weight is in "
        "`model.safetensors` (no pickle).", ""])
