"""transformers ``CLIPTextModel`` folders <-> :class:`defi_jax.models.clip_text.CLIPTextEncoder`.

    enc = load_text_encoder("/ckpt/clip-vit-base-patch32")     # config.json + model.safetensors
    save_text_encoder(enc, "/tmp/clip_text")                   # CLIPTextModel.from_pretrained loads it
    enc = load_text_encoder(path, with_projection=True)        # + text_projection: enc.text_embeds(ids, mask)

``load_text_encoder`` also reads full ``CLIPModel`` / ``CLIPTextModelWithProjection`` folders such as
openai/clip-vit-base-patch32 (nested ``text_config``; ``text_model.`` key prefix; vision tower and
projections ignored), which is what DeFI's reference points at.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax.interop import _convert, _hf_folders
from defi_jax.interop._convert import Rule
from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder

# nnx path -> transformers 5 key (transformers 4 adds "text_model."; handled at the folder boundary)
RULES = (
    Rule(r"^token_embedding$", "embeddings.token_embedding.weight"),
    Rule(r"^position_embedding$", "embeddings.position_embedding.weight"),
    Rule(r"^layers\.", "encoder.layers."),
    *_convert.DEFAULT_RULES,
)
# tensors of CLIPModel folders that are not part of the text tower (+ text_projection without a projection)
_IGNORE = (r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$", r"position_ids$")


def config_from_hf(d: dict, source: str = "config.json") -> CLIPTextConfig:
    if "text_config" in d:  # a full CLIPModel folder
        d = d["text_config"] or {}
    return _hf_folders.config_from_dict(CLIPTextConfig, d, source)


def from_state_dict(model: CLIPTextEncoder, tensors, *, what: str = "CLIP text encoder") -> CLIPTextEncoder:
    """``model`` (concrete or ``nnx.eval_shape``) filled from transformers-named tensors, either key style."""
    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}   # ``Lazy``: read when placed
    ignore = _IGNORE if model.with_projection else (*_IGNORE, r"^text_projection\.")
    return _convert.from_torch(model, tensors, RULES, what=what, ignore=ignore)


def to_state_dict(model: CLIPTextEncoder) -> dict[str, np.ndarray]:
    """transformers ``CLIPTextModel`` state dict (legacy ``text_model.`` prefix, which v4 and v5 both load)."""
    return {k if k.startswith("text_projection.") else f"text_model.{k}": v
            for k, v in _convert.to_torch(model, RULES).items()}


def load_text_encoder(path: str, *, with_projection: bool = False, dtype=None,
                      param_dtype=jnp.float32) -> CLIPTextEncoder:
    """A :class:`CLIPTextEncoder` with the weights of a transformers CLIP folder (safetensors).

    ``with_projection=True`` also loads ``text_projection`` (CLIPModel / CLIPTextModelWithProjection folders).
    """
    cfg = config_from_hf(_hf_folders.read_config(path), f"{path}/config.json")
    model = nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                   with_projection=with_projection))
    return from_state_dict(model, _hf_folders.read_tensors(path), what=path)


def save_text_encoder(model: CLIPTextEncoder, path: str) -> None:
    """Writes a ``CLIPTextModel`` (``CLIPTextModelWithProjection`` with a projection) folder, float32."""
    arch = "CLIPTextModelWithProjection" if model.with_projection else "CLIPTextModel"
    config = dataclasses.asdict(model.config) | {"architectures": [arch], "model_type": "clip_text_model"}
    _hf_folders.write_folder(path, to_state_dict(model), config)
