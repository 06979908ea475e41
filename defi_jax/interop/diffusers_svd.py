"""Stable Video Diffusion weights in diffusers folders <-> our Flax modules, both directions, exact.

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards plus
``diffusion_pytorch_model.safetensors.index.json``); pickled ``.bin`` files are never read::

    unet = load_unet("svd/unet")                 # UNetSpatioTemporal, float32 parameters
    vae = load_vae("svd/vae")                    # AutoencoderKLTemporalDecoder
    save_unet(unet, "out/unet")                  # UNetSpatioTemporalConditionModel.from_pretrained("out/unet")
    save_vae(vae, "out/vae")                     # AutoencoderKLTemporalDecoder.from_pretrained("out/vae")
    unet = load_unet("svd/unet", variant="fp16")  # diffusion_pytorch_model.fp16.safetensors, cast to float32
    save_unet(unet, "out/unet", dtype=np.float16, variant="fp16")   # from_pretrained(..., variant="fp16")

Our attribute names are diffusers' own, so the name / transpose table is ``_convert.DEFAULT_RULES``
(``kernel`` -> ``weight`` with the Linear / Conv2d / Conv3d transposes, norm ``scale`` -> ``weight``),
applied to NNX paths on load and on save alike. Missing, unexpected and mis-shaped tensors are reported
together, by name.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from defi_jax.interop import _convert
from defi_jax.models.svd_layers import trace_rngs
from defi_jax.models.svd_unet import UNetConfig, UNetSpatioTemporal
from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig

WEIGHTS_NAME = "diffusion_pytorch_model"
UNET_RULES: tuple[_convert.Rule, ...] = _convert.DEFAULT_RULES
VAE_RULES: tuple[_convert.Rule, ...] = _convert.DEFAULT_RULES
_DIFFUSERS_VERSION = "0.24.0"  # the release that introduced these classes; from_pretrained only records it


def _read_config(path: str, class_name: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a diffusers {class_name} folder")
    with open(cfg_path) as f:
        cfg = json.load(f)
    found = cfg.get("_class_name")
    if found not in (None, class_name):
        raise ValueError(f"{cfg_path}: _class_name is {found!r}, expected {class_name!r}")
    return cfg


def _write(module, config_dict: dict, class_name: str, rules, path: str, max_shard_bytes: int, dtype,
           variant) -> None:
    os.makedirs(path, exist_ok=True)
    cfg = {"_class_name": class_name, "_diffusers_version": _DIFFUSERS_VERSION, **config_dict}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = _convert.to_torch(module, rules, lazy=True)   # streamed: one tensor at a time beside the model
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    _convert.write_safetensors(tensors, path, WEIGHTS_NAME, max_shard_bytes, variant=variant)


def load_unet(path: str, *, dtype=None, param_dtype=jnp.float32, attention_impl: str | None = None,
              remat: bool = False, variant: str | None = None) -> UNetSpatioTemporal:
    """A ``UNetSpatioTemporalConditionModel`` folder as our ``UNetSpatioTemporal`` (built abstractly, then filled).

    Parameters are cast to ``param_dtype``; ``dtype`` / ``attention_impl`` / ``remat`` go to the module.
    """
    config = UNetConfig.from_dict(_read_config(path, "UNetSpatioTemporalConditionModel"))
    abstract = nnx.eval_shape(lambda: UNetSpatioTemporal(config, rngs=trace_rngs(0), dtype=dtype,
                                                         param_dtype=param_dtype, attention_impl=attention_impl,
                                                         remat=remat))
    return _convert.from_torch(abstract, _convert.read_safetensors(path, WEIGHTS_NAME, variant), UNET_RULES,
                               what=f"UNet from {path}")


def save_unet(unet: UNetSpatioTemporal, path: str, *, max_shard_bytes: int = 10 * 1024**3, dtype=None,
              variant: str | None = None) -> None:
    """Writes a folder that diffusers' ``UNetSpatioTemporalConditionModel.from_pretrained`` loads.

    ``dtype`` (e.g. ``np.float16``) casts the written tensors; ``variant`` names the files as HF variants.
    """
    _write(unet, unet.config.to_dict(), "UNetSpatioTemporalConditionModel", UNET_RULES, path, max_shard_bytes,
           dtype, variant)


def load_vae(path: str, *, dtype=None, param_dtype=jnp.float32, attention_impl: str | None = None,
             variant: str | None = None) -> AutoencoderKLTemporalDecoder:
    """An ``AutoencoderKLTemporalDecoder`` folder as our module of the same name."""
    config = VAEConfig.from_dict(_read_config(path, "AutoencoderKLTemporalDecoder"))
    abstract = nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(
        config, rngs=trace_rngs(0), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl))
    return _convert.from_torch(abstract, _convert.read_safetensors(path, WEIGHTS_NAME, variant), VAE_RULES,
                               what=f"VAE from {path}")


def save_vae(vae: AutoencoderKLTemporalDecoder, path: str, *, max_shard_bytes: int = 10 * 1024**3, dtype=None,
             variant: str | None = None) -> None:
    """Writes a folder that diffusers' ``AutoencoderKLTemporalDecoder.from_pretrained`` loads."""
    _write(vae, vae.config.to_dict(), "AutoencoderKLTemporalDecoder", VAE_RULES, path, max_shard_bytes, dtype,
           variant)
