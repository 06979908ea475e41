"""Checks shared by the encoder tests (CLIP text, DINOv2, T5)."""

import jax
import numpy as np
from flax import nnx


def assert_shards_on_8_devices(params, biggest_dims):
    """The logical names resolve on the default (1, 8, 1) fsdp mesh; the largest weight gets split."""
    from configs.base import get_base_config
    from defi_jax import sharding

    cfg = get_base_config()
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    shardings = sharding.state_shardings(params, mesh, dict(cfg.sharding.logical_axis_rules))
    leaves = [(v.get_value().shape, s) for v, s in zip(
        jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        jax.tree.leaves(shardings))]
    shape, spec = max(leaves, key=lambda t: int(np.prod(t[0])))
    assert sorted(shape) == sorted(biggest_dims) and any(a is not None for a in spec.spec), (shape, spec)
