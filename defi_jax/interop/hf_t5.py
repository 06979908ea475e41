"""transformers ``T5EncoderModel`` folders <-> :class:`defi_jax.models.t5.T5Encoder`.

    t5 = load_encoder("/ckpt/t5-base")       # config.json + model.safetensors; full T5 (encoder-decoder)
                                             # folders work too: decoder / lm_head tensors are ignored
    save_encoder(t5, "/tmp/t5_enc")          # T5EncoderModel.from_pretrained("/tmp/t5_enc") loads it
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from defi_jax.interop import _hf_tables as ht
from defi_jax.models.t5 import T5Config, T5Encoder

_B = "encoder.block.{i}.layer"
_TABLE = ht.Table([
    ("shared", "shared.weight", "same"),
    *[(f"blocks.{{i}}.attn.{p}.kernel", f"{_B}.0.SelfAttention.{p}.weight", "linear") for p in "qkvo"],
    ("blocks.{i}.attn.relative_attention_bias", f"{_B}.0.SelfAttention.relative_attention_bias.weight", "same"),
    ("blocks.{i}.attn_norm.weight", f"{_B}.0.layer_norm.weight", "same"),
    *[(f"blocks.{{i}}.ffn.{p}.kernel", f"{_B}.1.DenseReluDense.{p}.weight", "linear") for p in ("wi", "wi_0", "wi_1", "wo")],
    ("blocks.{i}.ffn_norm.weight", f"{_B}.1.layer_norm.weight", "same"),
    ("final_layer_norm.weight", "encoder.final_layer_norm.weight", "same"),
])


def config_from_hf(d: dict, source: str = "config.json") -> T5Config:
    return ht.config_from_dict(T5Config, d, source)


def load_encoder(path: str, *, dtype=None, param_dtype=jnp.float32) -> T5Encoder:
    """A :class:`T5Encoder` from a transformers T5 folder (safetensors)."""
    cfg = config_from_hf(ht.read_config(path), f"{path}/config.json")
    tensors = ht.read_safetensors(path)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]  # untied / re-keyed exports
    return ht.build_from_flat(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                              lambda shapes: _TABLE.from_torch(tensors, shapes, source=path))


def save_encoder(model: T5Encoder, path: str) -> None:
    """Writes a ``T5EncoderModel`` folder (float32 safetensors; ``shared`` also as ``encoder.embed_tokens``)."""
    cfg = model.config
    config = dataclasses.asdict(cfg) | {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
        "use_cache": False, "tie_word_embeddings": True, "dense_act_fn": cfg.dense_act_fn,
        "is_gated_act": cfg.is_gated_act, "num_decoder_layers": cfg.num_layers, "dropout_rate": 0.1}
    tensors = _TABLE.to_torch(ht.flat_params(model))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    ht.write_folder(path, tensors, config)
