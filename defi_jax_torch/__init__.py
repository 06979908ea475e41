"""The DeFI policy in PyTorch, read from a deployment folder written by ``python -m launch.export_torch``.

    from defi_jax_torch import DeFIPolicyTorch
    policy = DeFIPolicyTorch.from_pretrained("/tmp/defi_torch", device="cuda")
    actions = policy.act({"primary": rgb_HW3, "wrist": wrist_HW3}, "open the drawer")   # float32 [10, 7]

Installed with the ``torch`` extra (``pip install defi-jax[torch]``, plus ``diffusers`` and ``transformers``);
needs neither jax nor flax. See :mod:`defi_jax_torch.policy`.
"""

from defi_jax_torch.policy import DeFIPolicyTorch, read_safetensors, strict_load

__all__ = ["DeFIPolicyTorch", "read_safetensors", "strict_load"]
