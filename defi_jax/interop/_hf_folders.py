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

from defi_jax.interop import _convert


def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: expected a transformers model folder")
    with open(cfg_file) as f:
        return json.load(f)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Float32 numpy tensors of a folder's ``model.safetensors`` (or shards) or of one ``.safetensors`` file.

    Read through safetensors' flax reader so bfloat16 / float16 checkpoints load too; never pickle.
    """
    from safetensors import safe_open

    if os.path.isfile(path):
        files = [path]
    else:
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index) as f:
                files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    "(pickled .bin checkpoints are not read; convert them to safetensors)")
    out = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), np.float32)
    return out


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
