"""DeFI stage 3: the policy's trained networks.

``VideoFormer`` (GFDM features -> 224 tokens), ``PolicyLatentActions`` (the GIDM encoder at fine-tuning ->
4 latent-action tokens) and ``ActionHead`` (EDM diffusion transformer: ``encode`` once per observation,
``sample`` the action chunk, ``loss`` for training). Reference-name interop: ``defi_jax.interop.defi_policy``.
"""

from defi_jax.policy.action_head import ActionHead
from defi_jax.policy.latent_action import PolicyLatentActions
from defi_jax.policy.video_former import VideoFormer

__all__ = ["ActionHead", "PolicyLatentActions", "VideoFormer"]
