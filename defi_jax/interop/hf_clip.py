"""transformers ``CLIPTextModel`` folders <-> :class:`defi_jax.models.clip_text.CLIPTextEncoder`.

    enc = load_text_encoder("/ckpt/clip-vit-base-patch32")     # config.json + model.safetensors
    save_text_encoder(enc, "/tmp/clip_text")                   # CLIPTextModel.from_pretrained loads it

``load_text_encoder`` also reads full ``CLIPModel`` / ``CLIPTextModelWithProjection`` folders such as
openai/clip-vit-base-patch32 (nested ``text_config``; legacy ``text_model.`` key prefix; vision tower and
projections ignored), which is what DeFI's reference points at.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from defi_jax.interop import _hf_tables as ht
from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

_TABLE = ht.Table([
    ("token_embedding", "embeddings.token_embedding.weight", "same"),
    ("position_embedding", "embeddings.position_embedding.weight", "same"),
    *[(f"layers.{{i}}.self_attn.{p}.{a}", f"encoder.layers.{{i}}.self_attn.{p}.{b}", lay)
      for p in ("q_proj", "k_proj", "v_proj", "out_proj")
      for a, b, lay in (("kernel", "weight", "linear"), ("bias", "bias", "same"))],
    *[(f"layers.{{i}}.mlp.{p}.{a}", f"encoder.layers.{{i}}.mlp.{p}.{b}", lay)
      for p in ("fc1", "fc2") for a, b, lay in (("kernel", "weight", "linear"), ("bias", "bias", "same"))],
    *[(f"{pre}.{a}", f"{tpre}.{b}", "same")
      for pre, tpre in (("layers.{i}.layer_norm1", "encoder.layers.{i}.layer_norm1"),
                        ("layers.{i}.layer_norm2", "encoder.layers.{i}.layer_norm2"),
                        ("final_layer_norm", "final_layer_norm"))
      for a, b in (("scale", "weight"), ("bias", "bias"))],
])


def config_from_hf(d: dict, source: str = "config.json") -> CLIPTextConfig:
    if "text_config" in d:  # a full CLIPModel folder
        d = d["text_config"] or {}
    return ht.config_from_dict(CLIPTextConfig, d, source)


def load_text_encoder(path: str, *, dtype=None, param_dtype=jnp.float32) -> CLIPTextEncoder:
    """A :class:`CLIPTextEncoder` with the weights of a transformers CLIP folder (safetensors)."""
    cfg = config_from_hf(ht.read_config(path), f"{path}/config.json")
    tensors = ht.read_safetensors(path)
    # transformers < 5 stored the text tower under "text_model."; v5 stores it at the root.
    if any(k.startswith("text_model.") for k in tensors):
        tensors = {k[len("text_model."):]: v for k, v in tensors.items() if k.startswith("text_model.")}
    return ht.build_from_flat(
        lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        lambda shapes: _TABLE.from_torch(tensors, shapes, source=path))


def save_text_encoder(model: CLIPTextEncoder, path: str) -> None:
    """Writes a ``CLIPTextModel`` folder (float32 safetensors, ``text_model.`` key prefix)."""
    import dataclasses

    config = dataclasses.asdict(model.config) | {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    # The legacy "text_model." prefix loads in transformers 4 (native) and 5 (prefix stripped on load).
    tensors = {f"text_model.{k}": v for k, v in _TABLE.to_torch(ht.flat_params(model)).items()}
    ht.write_folder(path, tensors, config)
