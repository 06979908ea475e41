"""Shared machinery for the transformers interop modules (CLIP text, DINOv2, T5).

A conversion is one table of rules ``(flax_pattern, torch_pattern, layout)`` applied in both directions.
Patterns name one parameter each; ``{i}`` stands for a layer index. Layouts:

  ``same``    identical array
  ``linear``  nnx kernel ``[in, out]``  <->  torch weight ``[out, in]``
  ``conv2d``  nnx kernel ``[kh, kw, in, out]``  <->  torch weight ``[out, in, kh, kw]``

Folders are what ``save_pretrained`` writes: ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Weights are read with ``safetensors`` only, never pickle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Rule = tuple[str, str, str]

_TO_TORCH = {
    "same": lambda x: x,
    "linear": lambda x: x.T,
    "conv2d": lambda x: x.transpose(3, 2, 0, 1),
}
_FROM_TORCH = {
    "same": lambda x: x,
    "linear": lambda x: x.T,
    "conv2d": lambda x: x.transpose(2, 3, 1, 0),
}


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class Table:
    """A list of name / layout rules usable in both directions."""

    def __init__(self, rules: Sequence[Rule]):
        for _, _, layout in rules:
            if layout not in _TO_TORCH:
                raise ValueError(f"unknown layout {layout!r}")
        self.rules = [(f, t, lay, _regex(f), _regex(t)) for f, t, lay in rules]

    def _match(self, name: str, side: int) -> tuple[str, Callable] | None:
        for f, t, layout, rf, rt in self.rules:
            m = (rf, rt)[side].match(name)
            if m:
                target = (t, f)[side]
                if "i" in m.groupdict():
                    target = target.replace("{i}", m.group("i"))
                return target, (_TO_TORCH, _FROM_TORCH)[side][layout]
        return None

    def to_torch(self, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in flat.items():
            hit = self._match(name, 0)
            if hit is None:
                raise KeyError(f"no conversion rule for parameter {name!r}")
            out[hit[0]] = np.ascontiguousarray(hit[1](np.asarray(value)))
        return out

    def from_torch(self, tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                   source: str = "checkpoint") -> dict[str, np.ndarray]:
        """Maps torch tensors onto the flax names in ``expected`` (name -> shape); all must be present."""
        out = {}
        for name, value in tensors.items():
            hit = self._match(name, 1)
            if hit is None:
                continue
            target, fn = hit
            if target not in expected:
                raise KeyError(f"{source}: tensor {name!r} maps to {target!r}, which this model config lacks")
            value = fn(value)
            if tuple(value.shape) != tuple(expected[target]):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(value.shape)} after conversion, "
                                 f"the model expects {tuple(expected[target])} for {target!r}")
            out[target] = value
        missing = sorted(set(expected) - set(out))
        if missing:
            wanted = [self.torch_name(m) for m in missing[:5]]
            raise KeyError(f"{source}: missing tensors {wanted}{' ...' if len(missing) > 5 else ''}")
        return out

    def torch_name(self, flax_name: str) -> str:
        hit = self._match(flax_name, 0)
        return hit[0] if hit else flax_name


# ---------------------------------------------------------------------------------------------- nnx side

def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{"layers.0.mlp.fc1.kernel": array, ...}`` for every nnx.Param of ``model``."""
    return {_path_str(p): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def build_from_flat(make: Callable[[], nnx.Module], tensors_fn: Callable[[dict], dict], dtype=jnp.float32):
    """Builds ``make()`` abstractly (no random init), then fills its params from ``tensors_fn(shapes)``."""
    model = nnx.eval_shape(make)
    flat_state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    shapes = {_path_str(p): tuple(v.get_value().shape) for p, v in flat_state}
    values = tensors_fn(shapes)
    for path, var in flat_state:
        var.set_value(jnp.asarray(values[_path_str(path)], dtype=var.get_value().dtype or dtype))
    return model


# ---------------------------------------------------------------------------------------------- folders

def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: expected a transformers model folder")
    with open(cfg_file) as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a folder (``model.safetensors`` or a sharded index) or of one ``.safetensors`` file."""
    from safetensors import safe_open

    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
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
        # framework="flax" reads bfloat16 too (numpy cannot); values land as float32 numpy arrays.
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    return out


def write_folder(path: str, tensors: Mapping[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def config_from_dict(cls, d: Mapping, source: str):
    """Dataclass ``cls`` from a transformers config dict, keeping only the fields ``cls`` knows."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad config: {e}") from e
