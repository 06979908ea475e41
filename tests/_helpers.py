"""Helpers shared by several test files."""

from __future__ import annotations

import numpy as np

from defi_jax import checkpoint, paths


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
    """A step-0 checkpoint (and the workdir's config.json) holding only parameters (flat ``a/b/c`` paths) and the model's other variables: what
    ``restore_model``, the export and the evaluations read (no optimizer state, no train-state compile)."""
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(0, {"params": nested(params), "extra": nested(extra or {}), "step": np.int32(0)}, None,
              config.to_json_best_effort())
    ckpt.close()
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort())   # as a run's workdir


def random_model(stage: str, config, seed: int = 0):
    """``config``'s ``stage`` model with weights drawn on the host (``benchmarks.export.random_weights``): shapes
    from ``nnx.eval_shape``, so neither an init program is compiled nor the initializers run eagerly (the tiny
    policy's eager init alone costs ~36 s of CPU). What the callers test holds for any weights."""
    from flax import nnx

    from defi_jax import nn, stage as stage_lib
    from defi_jax.benchmarks.export import random_weights

    with nn.fast_traced_rngs():   # the abstract build without flax's slow traced RNG bookkeeping (policy: 5 -> 1.4 s)
        abstract = nnx.eval_shape(lambda: stage_lib.get(stage).build_model(config, nnx.Rngs(seed)))
    return random_weights(abstract, seed)


def flat_state(state) -> dict:
    """An ``nnx.State`` as ``{"a/b/c": numpy array}``."""
    from flax import nnx
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def save_model(config, workdir: str, model) -> None:
    """``model`` as a step-0 params-only checkpoint of ``config``'s run in ``workdir``."""
    from flax import nnx
    save_params(config, workdir, flat_state(nnx.state(model, nnx.Param)), flat_state(nnx.state(model, nnx.Not(nnx.Param))))


def save_random_workdir(stage: str, config, workdir: str, seed: int = 0):
    """A step-0 params-only checkpoint of :func:`random_model` in ``workdir``; returns the model."""
    model = random_model(stage, config, seed)
    save_model(config, workdir, model)
    return model
