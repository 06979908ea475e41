"""DINOv2-with-registers weights <-> :class:`defi_jax.models.dinov2.Dinov2`.

Two sources:

* transformers ``Dinov2WithRegistersModel`` folders (config.json + model.safetensors)::

      dino = load("/ckpt/dinov2-with-registers-base")
      save(dino, "/tmp/dino")          # Dinov2WithRegistersModel.from_pretrained("/tmp/dino") loads it

* the torch-hub state dict of facebookresearch/dinov2 ``dinov2_vitb14_reg`` that DeFI's reference loads
  (``cls_token``, ``register_tokens``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv`` fused, ...)::

      dino = load_torch_hub_state_dict("/ckpt/dinov2_vitb14_reg4_pretrain.safetensors")
      hub_sd = to_torch_hub_state_dict(dino)      # numpy arrays under the hub names

  A ``.pth`` file must be converted to safetensors first (we do not unpickle weights), e.g.
  ``safetensors.torch.save_file(torch.load(p), p.replace(".pth", ".safetensors"))`` in your own env.

Folders are written with the transformers 4 key names (``attention.attention.query`` ...), which both
transformers 4 and 5 load; transformers 5 names (``attention.q_proj`` ...) are accepted on load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax.interop import _hf_tables as ht
from defi_jax.models.dinov2 import Dinov2, Dinov2Config

_L = "encoder.layer.{i}"
_TABLE = ht.Table([
    ("cls_token", "embeddings.cls_token", "same"),
    ("mask_token", "embeddings.mask_token", "same"),
    ("register_tokens", "embeddings.register_tokens", "same"),
    ("position_embeddings", "embeddings.position_embeddings", "same"),
    ("patch_embeddings.kernel", "embeddings.patch_embeddings.projection.weight", "conv2d"),
    ("patch_embeddings.bias", "embeddings.patch_embeddings.projection.bias", "same"),
    *[(f"layers.{{i}}.attention.{ours}.{a}", f"{_L}.attention.{theirs}.{b}", lay)
      for ours, theirs in (("q_proj", "attention.query"), ("k_proj", "attention.key"),
                           ("v_proj", "attention.value"), ("o_proj", "output.dense"))
      for a, b, lay in (("kernel", "weight", "linear"), ("bias", "bias", "same"))],
    *[(f"layers.{{i}}.mlp.{p}.{a}", f"{_L}.mlp.{p}.{b}", lay)
      for p in ("fc1", "fc2") for a, b, lay in (("kernel", "weight", "linear"), ("bias", "bias", "same"))],
    ("layers.{i}.layer_scale1", f"{_L}.layer_scale1.lambda1", "same"),
    ("layers.{i}.layer_scale2", f"{_L}.layer_scale2.lambda1", "same"),
    *[(f"{ours}.{a}", f"{theirs}.{b}", "same")
      for ours, theirs in (("layers.{i}.norm1", f"{_L}.norm1"), ("layers.{i}.norm2", f"{_L}.norm2"),
                           ("layernorm", "layernorm"))
      for a, b in (("scale", "weight"), ("bias", "bias"))],
])

# transformers 5 native names -> the transformers 4 names the table speaks.
_V5_TO_V4 = [(re.compile(p), r) for p, r in (
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
)]

# torch-hub (facebookresearch/dinov2) names <-> transformers 4 names. The fused qkv is handled apart.
_HUB = ht.Table([
    ("embeddings.cls_token", "cls_token", "same"),
    ("embeddings.mask_token", "mask_token", "same"),
    ("embeddings.register_tokens", "register_tokens", "same"),
    ("embeddings.position_embeddings", "pos_embed", "same"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight", "same"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias", "same"),
    *[(f"{_L}.{hf}.{w}", f"blocks.{{i}}.{hub}.{w}", "same")
      for hf, hub in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.output.dense", "attn.proj"),
                      ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
      for w in ("weight", "bias")],
    (f"{_L}.layer_scale1.lambda1", "blocks.{i}.ls1.gamma", "same"),
    (f"{_L}.layer_scale2.lambda1", "blocks.{i}.ls2.gamma", "same"),
    ("layernorm.weight", "norm.weight", "same"),
    ("layernorm.bias", "norm.bias", "same"),
])
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\..*)$")  # block_chunks > 0 layouts: blocks.<chunk>.<i>.


def config_from_hf(d: dict, source: str = "config.json") -> Dinov2Config:
    d = dict(d)
    for key in ("image_size", "patch_size"):
        if isinstance(d.get(key), (list, tuple)):
            if d[key][0] != d[key][1]:
                raise ValueError(f"{source}: non-square {key}={d[key]} is not supported")
            d[key] = d[key][0]
    return ht.config_from_dict(Dinov2Config, d, source)


def _config_to_hf(cfg: Dinov2Config) -> dict:
    return dataclasses.asdict(cfg) | {
        "architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers",
        "intermediate_size": cfg.mlp_hidden, "apply_layernorm": True, "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}


def _from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: Dinov2Config, source: str, dtype, param_dtype):
    renamed = {}
    for k, v in tensors.items():
        k = k.removeprefix("dinov2_with_registers.")
        for pat, rep in _V5_TO_V4:
            k = pat.sub(rep, k)
        renamed[k] = v
    return ht.build_from_flat(lambda: Dinov2(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                              lambda shapes: _TABLE.from_torch(renamed, shapes, source=source))


def load(path: str, *, dtype=None, param_dtype=jnp.float32) -> Dinov2:
    """A :class:`Dinov2` from a transformers ``Dinov2WithRegistersModel`` folder."""
    cfg = config_from_hf(ht.read_config(path), f"{path}/config.json")
    return _from_hf_tensors(ht.read_safetensors(path), cfg, path, dtype, param_dtype)


def save(model: Dinov2, path: str) -> None:
    """Writes a ``Dinov2WithRegistersModel`` folder (float32 safetensors)."""
    ht.write_folder(path, _TABLE.to_torch(ht.flat_params(model)), _config_to_hf(model.config))


# -------------------------------------------------------------------------------------------- torch hub

def hub_to_hf_names(hub: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch-hub state dict -> transformers 4 names (qkv split into query / key / value)."""
    out = {}
    for name, value in hub.items():
        value = np.asarray(value)
        m = _CHUNKED_BLOCK.match(name)
        name = f"blocks.{m.group(1)}" if m else name
        m = _QKV.match(name)
        if m:
            for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{part}.{m.group(2)}"] = chunk
            continue
        hf = _HUB._match(name, 1)
        if hf is None:
            raise KeyError(f"torch-hub tensor {name!r} has no DINOv2 conversion rule")
        out[hf[0]] = value
    return out


def hf_to_hub_names(hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4 names -> torch-hub state dict (query / key / value fused into ``attn.qkv``)."""
    out, qkv = {}, {}
    for name, value in hf.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = np.asarray(value)
            continue
        hub = _HUB._match(name, 0)
        if hub is None:
            raise KeyError(f"tensor {name!r} has no torch-hub DINOv2 name")
        out[hub[0]] = np.asarray(value)
    for (i, kind), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
    return out


def _infer_hub_config(hf: Mapping[str, np.ndarray]) -> Dinov2Config:
    d = hf["embeddings.cls_token"].shape[-1]
    patch = hf["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((hf["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    regs = hf["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in hf else 0
    mlp = hf["encoder.layer.0.mlp.fc1.weight"].shape[0]
    # every released DINOv2 uses 64-wide heads (S 6, B 12, L 16, g 24)
    return Dinov2Config(hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(d // 64, 1),
                        mlp_ratio=mlp / d, image_size=grid * patch, patch_size=patch, num_register_tokens=regs)


def load_torch_hub_state_dict(state_dict, config: Dinov2Config | None = None, *, dtype=None,
                              param_dtype=jnp.float32) -> Dinov2:
    """A :class:`Dinov2` from a torch-hub DINOv2 state dict: a ``.safetensors`` path or a name -> array dict.

    ``config`` defaults to one inferred from the tensor shapes (64-wide heads, as all released models).
    """
    source = "torch-hub state dict"
    if isinstance(state_dict, str):
        source = state_dict
        state_dict = ht.read_safetensors(state_dict)
    hf = hub_to_hf_names({k: np.asarray(v) for k, v in state_dict.items()})
    cfg = config or _infer_hub_config(hf)
    return _from_hf_tensors(hf, cfg, source, dtype, param_dtype)


def to_torch_hub_state_dict(model: Dinov2) -> dict[str, np.ndarray]:
    """The torch-hub (facebookresearch/dinov2) state dict of ``model``, as float32 numpy arrays."""
    return hf_to_hub_names(_TABLE.to_torch(ht.flat_params(model)))
