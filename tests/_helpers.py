"""Helpers shared by several test files."""

from __future__ import annotations

import numpy as np

from defi_jax import checkpoint


def nested(flat: dict) -> dict:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    out: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_params(config, workdir: str, params: dict, extra: dict | None = None) -> None:
    """A step-0 checkpoint holding only parameters (flat ``a/b/c`` paths) and the model's other variables: what
    ``restore_model``, the export and the evaluations read (no optimizer state, no train-state compile)."""
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(0, {"params": nested(params), "extra": nested(extra or {}), "step": np.int32(0)}, None,
              config.to_json_best_effort())
    ckpt.close()
