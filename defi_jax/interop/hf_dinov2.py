"""DINOv2-with-registers weights <-> :class:`defi_jax.models.dinov2.Dinov2`.

Two sources:

* transformers ``Dinov2WithRegistersModel`` folders (config.json + model.safetensors)::

      dino = load("/ckpt/dinov2-with-registers-base")
      save(dino, "/tmp/dino")          # Dinov2WithRegistersModel.from_pretrained("/tmp/dino") loads it

* the torch-hub state dict of facebookresearch/dinov2 ``dinov2_vitb14_reg`` that DeFI's reference loads
  (``cls_token``, ``register_tokens``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv`` fused, ...)::

      dino = load_torch_hub_state_dict("/ckpt/dinov2_vitb14_reg4_pretrain.safetensors")
      hub_sd = to_torch_hub_state_dict(dino)      # numpy arrays under the hub names
      load_torchhub_state_dict(dino, hub_sd)      # in place, into an existing model (GIDM importer)

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

from defi_jax.interop import _convert, _hf_folders
from defi_jax.interop._convert import Rule
from defi_jax.models.dinov2 import Dinov2, Dinov2Config

# nnx path -> transformers 4 key (what the published folders and transformers 5's save_pretrained use)
RULES = (
    Rule(r"^(cls_token|mask_token|register_tokens|position_embeddings)$", r"embeddings.\1"),
    Rule(r"^patch_embeddings\.", "embeddings.patch_embeddings.projection."),
    Rule(r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    Rule(r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    Rule(r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    Rule(r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    Rule(r"^layers\.(\d+)\.layer_scale([12])$", r"encoder.layer.\1.layer_scale\2.lambda1"),
    Rule(r"^layers\.", "encoder.layer."),
    *_convert.DEFAULT_RULES,
)

# transformers 5 native names -> the transformers 4 names the rules speak.
_V5_TO_V4 = [(re.compile(p), r) for p, r in (
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
)]


def config_from_hf(d: dict, source: str = "config.json") -> Dinov2Config:
    d = dict(d)
    for key in ("image_size", "patch_size"):
        if isinstance(d.get(key), (list, tuple)):
            if d[key][0] != d[key][1]:
                raise ValueError(f"{source}: non-square {key}={d[key]} is not supported")
            d[key] = d[key][0]
    return _hf_folders.config_from_dict(Dinov2Config, d, source)


def _config_to_hf(cfg: Dinov2Config) -> dict:
    return dataclasses.asdict(cfg) | {
        "architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers",
        "intermediate_size": cfg.mlp_hidden, "apply_layernorm": True, "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}


def from_state_dict(model: Dinov2, tensors: Mapping[str, np.ndarray], *, what: str = "DINOv2") -> Dinov2:
    """``model`` (concrete or ``nnx.eval_shape``) filled from transformers-named tensors (v4 or v5 names)."""
    renamed = {}
    for k, v in tensors.items():
        k = k.removeprefix("dinov2_with_registers.")
        for pat, rep in _V5_TO_V4:
            k = pat.sub(rep, k)
        renamed[k] = v   # arrays or ``Lazy`` (each read when placed)
    return _convert.from_torch(model, renamed, RULES, what=what)


def to_state_dict(model: Dinov2) -> dict[str, np.ndarray]:
    """transformers ``Dinov2WithRegistersModel`` state dict (transformers 4 names)."""
    return _convert.to_torch(model, RULES)


def _abstract(cfg: Dinov2Config, dtype, param_dtype) -> Dinov2:
    return nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def load(path: str, *, dtype=None, param_dtype=jnp.float32) -> Dinov2:
    """A :class:`Dinov2` from a transformers ``Dinov2WithRegistersModel`` folder."""
    cfg = config_from_hf(_hf_folders.read_config(path), f"{path}/config.json")
    return from_state_dict(_abstract(cfg, dtype, param_dtype), _hf_folders.read_tensors(path), what=path)


def save(model: Dinov2, path: str) -> None:
    """Writes a ``Dinov2WithRegistersModel`` folder (float32 safetensors)."""
    _hf_folders.write_folder(path, to_state_dict(model), _config_to_hf(model.config))


# -------------------------------------------------------------------------------------------- torch hub

# (transformers 4 name, torch-hub name) pairs, {i} = block index; applied in both directions. The fused
# ``attn.qkv`` (query; key; value stacked on the output dim) is split / concatenated apart.
_HUB_PAIRS = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.{w}", "patch_embed.proj.{w}"),
    ("encoder.layer.{i}.norm1.{w}", "blocks.{i}.norm1.{w}"),
    ("encoder.layer.{i}.attention.output.dense.{w}", "blocks.{i}.attn.proj.{w}"),
    ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1.gamma"),
    ("encoder.layer.{i}.norm2.{w}", "blocks.{i}.norm2.{w}"),
    ("encoder.layer.{i}.mlp.fc1.{w}", "blocks.{i}.mlp.fc1.{w}"),
    ("encoder.layer.{i}.mlp.fc2.{w}", "blocks.{i}.mlp.fc2.{w}"),
    ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2.gamma"),
    ("layernorm.{w}", "norm.{w}"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
                      .replace(r"\{w\}", r"(?P<w>weight|bias)") + "$")


_HUB_RULES = [(_pattern(hf), _pattern(hub), hf, hub) for hf, hub in _HUB_PAIRS]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\..*)$")  # block_chunks > 0 layouts: blocks.<chunk>.<i>.


def _rename(name: str, to_hub: bool) -> str | None:
    for hf_re, hub_re, hf, hub in _HUB_RULES:
        m = (hf_re if to_hub else hub_re).match(name)
        if m:
            out = hub if to_hub else hf
            for key, val in m.groupdict().items():
                out = out.replace("{" + key + "}", val)
            return out
    return None


def _third(value, i: int):
    """Rows ``i`` / 3 of a fused qkv tensor: an array, or a ``Lazy`` read (whole, then sliced) when made."""
    if not isinstance(value, _convert.Lazy):
        return np.split(np.asarray(value), 3, axis=0)[i]
    n = value.shape[0] // 3
    return _convert.Lazy((n, *value.shape[1:]), value.dtype, lambda: np.asarray(value)[i * n:(i + 1) * n])


def hub_to_hf_names(hub: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch-hub state dict -> transformers 4 names (qkv split into query / key / value)."""
    out = {}
    for name, value in hub.items():
        m = _CHUNKED_BLOCK.match(name)
        name = f"blocks.{m.group(1)}" if m else name
        m = _QKV.match(name)
        if m:
            for i, part in enumerate(("query", "key", "value")):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{part}.{m.group(2)}"] = _third(value, i)
            continue
        hf = _rename(name, to_hub=False)
        if hf is None:
            raise KeyError(f"torch-hub tensor {name!r} has no DINOv2 conversion rule")
        out[hf] = value if isinstance(value, _convert.Lazy) else np.asarray(value)
    return out


def hf_to_hub_names(hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4 names -> torch-hub state dict (query / key / value fused into ``attn.qkv``)."""
    out, qkv = {}, {}
    for name, value in hf.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = np.asarray(value)
            continue
        hub = _rename(name, to_hub=True)
        if hub is None:
            raise KeyError(f"tensor {name!r} has no torch-hub DINOv2 name")
        out[hub] = np.asarray(value)
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
        state_dict = _hf_folders.read_tensors(state_dict)
    hf = hub_to_hf_names(state_dict)
    cfg = config or _infer_hub_config(hf)
    return from_state_dict(_abstract(cfg, dtype, param_dtype), hf, what=source)


def load_torchhub_state_dict(model: Dinov2, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a torch-hub state dict into an existing ``model`` in place (the GIDM checkpoint importer)."""
    nnx.update(model, nnx.state(from_state_dict(model, hub_to_hf_names(state_dict), what="torch-hub DINOv2"),
                                nnx.Param))


def to_torch_hub_state_dict(model: Dinov2) -> dict[str, np.ndarray]:
    """The torch-hub (facebookresearch/dinov2) state dict of ``model``, as numpy arrays."""
    return hf_to_hub_names(to_state_dict(model))


to_torchhub_state_dict = to_torch_hub_state_dict
