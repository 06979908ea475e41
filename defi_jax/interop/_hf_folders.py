"""transformers model folders for the encoder interop modules (CLIP text, DINOv2, T5).

A folder is what ``save_pretrained`` writes: ``config.json`` + ``model.safetensors`` (or a sharded
index). Name / layout conversion is ``defi_jax.interop._convert`` (one rule table per model, both ways).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from defi_jax import paths
from defi_jax.interop import _convert


def read_config(path: str) -> dict:
    cfg_file = paths.join(path, "config.json")
    if not paths.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: expected a transformers model folder")
    return json.loads(paths.read_text(cfg_file))


def read_tensors(path: str) -> dict[str, _convert.Lazy]:
    """The tensors of a folder's ``model.safetensors`` (or shards) or of one ``.safetensors`` file, as float32
    ``Lazy`` tensors: only the headers are read here, each tensor when it is placed (``_convert.lazy_safetensors``:
    a loader holds what it built plus one tensor); bfloat16 / float16 files widen exactly. Never pickle. Local or
    ``gs://`` alike (``defi_jax.paths``)."""
    one_file = paths.exists(path) and not paths.isdir(path)
    tensors = _convert.lazy_safetensors(path) if one_file else _convert.read_safetensors(path, "model")
    return {k: v if v.dtype == np.float32 else v.astype(np.float32) for k, v in tensors.items()}


def write_folder(path: str, tensors: Mapping[str, np.ndarray], config: dict) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    _convert.write_safetensors({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path, "model")


def config_from_dict(cls, d: Mapping, source: str):
    """Dataclass ``cls`` from a transformers config dict, keeping only the fields ``cls`` knows."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad config: {e}") from e
