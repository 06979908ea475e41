"""transformers ``T5EncoderModel`` folders <-> :class:`defi_jax.models.t5.T5Encoder`.

    t5 = load_encoder("/ckpt/t5-base")       # config.json + model.safetensors; full T5 (encoder-decoder)
                                             # folders work too: decoder / lm_head tensors are ignored
    save_encoder(t5, "/tmp/t5_enc")          # T5EncoderModel.from_pretrained("/tmp/t5_enc") loads it
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax.interop import _convert, _hf_folders
from defi_jax.interop._convert import Rule
from defi_jax.models.t5 import T5Config, T5Encoder

# nnx path -> transformers key
RULES = (
    Rule(r"^shared$", "shared.weight"),
    Rule(r"^blocks\.(\d+)\.attn\.relative_attention_bias$",
         r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    Rule(r"^blocks\.(\d+)\.attn\.", r"encoder.block.\1.layer.0.SelfAttention."),
    Rule(r"^blocks\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
    Rule(r"^blocks\.(\d+)\.ffn\.", r"encoder.block.\1.layer.1.DenseReluDense."),
    Rule(r"^blocks\.(\d+)\.ffn_norm\.", r"encoder.block.\1.layer.1.layer_norm."),
    Rule(r"^final_layer_norm\.", "encoder.final_layer_norm."),
    *_convert.DEFAULT_RULES,
)
# tied copy of ``shared`` and the rest of a full encoder-decoder checkpoint
_IGNORE = (r"^encoder\.embed_tokens\.weight$", r"^decoder\.", r"^lm_head\.")


def config_from_hf(d: dict, source: str = "config.json") -> T5Config:
    return _hf_folders.config_from_dict(T5Config, d, source)


def from_state_dict(model: T5Encoder, tensors: Mapping[str, np.ndarray], *, what: str = "T5 encoder") -> T5Encoder:
    """``model`` (concrete or ``nnx.eval_shape``) filled from ``T5EncoderModel``-named tensors."""
    tensors = dict(tensors)   # arrays or ``Lazy`` (each read when placed)
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors.pop("encoder.embed_tokens.weight")  # untied / re-keyed exports
    return _convert.from_torch(model, tensors, RULES, what=what, ignore=_IGNORE)


def to_state_dict(model: T5Encoder) -> dict[str, np.ndarray]:
    """``T5EncoderModel.state_dict()`` names (``shared`` also as the tied ``encoder.embed_tokens``)."""
    out = _convert.to_torch(model, RULES)
    out["encoder.embed_tokens.weight"] = out["shared.weight"].copy()
    return out


def load_state_dict(model: T5Encoder, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``T5EncoderModel``-named tensors into an existing ``model`` in place."""
    nnx.update(model, nnx.state(from_state_dict(model, tensors), nnx.Param))


def load_encoder(path: str, *, dtype=None, param_dtype=jnp.float32) -> T5Encoder:
    """A :class:`T5Encoder` from a transformers T5 folder (safetensors)."""
    cfg = config_from_hf(_hf_folders.read_config(path), f"{path}/config.json")
    model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return from_state_dict(model, _hf_folders.read_tensors(path), what=path)


def save_encoder(model: T5Encoder, path: str) -> None:
    """Writes a ``T5EncoderModel`` folder (float32 safetensors)."""
    cfg = model.config
    config = dataclasses.asdict(cfg) | {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "is_encoder_decoder": False,
        "use_cache": False, "tie_word_embeddings": True, "dense_act_fn": cfg.dense_act_fn,
        "is_gated_act": cfg.is_gated_act, "num_decoder_layers": cfg.num_layers, "dropout_rate": 0.1}
    _hf_folders.write_folder(path, to_state_dict(model), config)
