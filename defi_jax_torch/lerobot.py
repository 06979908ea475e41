"""The DeFI policy as a LeRobot policy plugin (type ``defi``): reads the folder ``launch.export_torch --lerobot``
writes (see :mod:`defi_jax_torch.lerobot_folder`).

    import defi_jax_torch.lerobot                  # registers DeFIConfig under "defi"
    from lerobot.policies.factory import make_pre_post_processors
    policy = defi_jax_torch.lerobot.DeFIPolicy.from_pretrained("/ckpt/defi_torch/lerobot")
    pre, post = make_pre_post_processors(policy.config, pretrained_path="/ckpt/defi_torch/lerobot")
    action = post(policy.select_action(pre(observation)))        # [1, 7] robot units

LeRobot's scripts find it with ``--policy.path=/ckpt/defi_torch/lerobot
--policy.discover_packages_path=defi_jax_torch.lerobot``. The config, the policy class and the processor factory
share this one module, so LeRobot's naming conventions (``configuration_*`` -> ``modeling_*`` /
``processor_*``) resolve them here. Inference only: DeFI trains in JAX (``python -m launch.train``).
This is the only module of the project that imports ``lerobot``.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.optim import AdamWConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.processor import make_default_pre_post_processors

from defi_jax_torch import lerobot_folder
from defi_jax_torch.policy import DeFIPolicyTorch


@PreTrainedConfig.register_subclass(lerobot_folder.POLICY_TYPE)
@dataclass
class DeFIConfig(PreTrainedConfig):
    """The LeRobot side of a DeFI policy; the networks' sizes live in the folder's ``defi/config.json``."""

    horizon: int = 10
    n_action_steps: int = 10
    views: list[str] = field(default_factory=lambda: ["primary", "wrist"])
    dtype: str = "float32"
    normalization_mapping: dict[str, NormalizationMode] = field(default_factory=lambda: {
        "VISUAL": NormalizationMode.IDENTITY, "ACTION": NormalizationMode.QUANTILES})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"n_action_steps={self.n_action_steps} must be in [1, horizon={self.horizon}]")

    def validate_features(self) -> None:
        missing = [v for v in self.views if lerobot_folder.IMAGE_PREFIX + v not in self.image_features]
        if missing:
            raise ValueError(f"DeFI reads the views {self.views}; input_features lacks "
                             f"{[lerobot_folder.IMAGE_PREFIX + v for v in missing]}")
        if self.action_feature is None:
            raise ValueError("DeFI needs 'action' in output_features")

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(lr=1e-4, weight_decay=0.0)

    def get_scheduler_preset(self):
        return None

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None


class DeFIPolicy(PreTrainedPolicy):
    """``DeFIPolicyTorch`` (``self.defi``) behind LeRobot's policy interface: ``select_action`` pops one action
    of the current chunk, ``predict_action_chunk`` gives [B, horizon, 7] in [-1, 1] (the post-processor
    un-normalizes)."""

    config_class = DeFIConfig
    name = lerobot_folder.POLICY_TYPE

    def __init__(self, config: DeFIConfig, dataset_stats=None, **kwargs):
        super().__init__(config)
        config.validate_features()
        if not config.pretrained_path:
            raise ValueError("DeFIPolicy is built from an exported folder: DeFIPolicy.from_pretrained(FOLDER) or "
                             "--policy.path=FOLDER (write one with python -m launch.export_torch --lerobot)")
        root = os.path.join(str(config.pretrained_path), lerobot_folder.SKELETON)
        self.defi = DeFIPolicyTorch.from_configs(root)     # random weights until model.safetensors is loaded
        for tower in (self.defi.unet, self.defi.vae, self.defi.gfdm_text, self.defi.goal_text):
            tower.to(dtype=getattr(torch, config.dtype))
        self._action_queue: deque = deque(maxlen=config.n_action_steps)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: DeFIConfig | None = None, strict: bool = True,
                        **kwargs) -> DeFIPolicy:
        """LeRobot's ``from_pretrained``, strict by default; a Hub id is downloaded whole first (the skeleton's
        configs and tokenizers sit beside ``model.safetensors``)."""
        path = str(pretrained_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download
            path = snapshot_download(repo_id=path, revision=kwargs.get("revision"))
        config = config or PreTrainedConfig.from_pretrained(path)
        config.pretrained_path = Path(path)
        return super().from_pretrained(path, config=config, strict=strict, **kwargs)

    def reset(self):
        self._action_queue.clear()

    def get_optim_params(self) -> dict:
        return {"params": self.parameters()}

    def forward(self, batch, reduction: str = "mean"):
        raise NotImplementedError("DeFI trains in JAX (python -m launch.train); the LeRobot plugin runs inference")

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict, **kwargs) -> torch.Tensor:
        """[B, horizon, action_dim] normalized actions; ``noise`` (an ``initial_noise()`` dict) or ``generator``
        may be passed."""
        device = self.defi.time_pos_emb.device
        return lerobot_folder.predict_chunk(self.defi, batch, noise=kwargs.get("noise"),
                                            generator=kwargs.get("generator")).to(device)

    @torch.no_grad()
    def select_action(self, batch: dict, **kwargs) -> torch.Tensor:
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch, **kwargs)[:, : self.config.n_action_steps]
            self._action_queue.extend(chunk.transpose(0, 1))      # n_action_steps x [B, action_dim]
        return self._action_queue.popleft()


def make_defi_pre_post_processors(config: DeFIConfig, dataset_stats=None):
    """LeRobot's default policy pipelines (rename, batch, device, normalize / unnormalize, cpu); an exported
    folder's own ``policy_preprocessor.json`` / ``policy_postprocessor.json`` carry DeFI's statistics."""
    return make_default_pre_post_processors(config, dataset_stats)
