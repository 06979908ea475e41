"""Named device meshes and logical-axis sharding.

Model code names the axes of every parameter and activation logically (``"embed"``, ``"mlp"``,
``"heads"``, ...). Configs map logical names to mesh axes (``config.sharding.logical_axis_rules``), so
the same model runs data-parallel, FSDP or tensor-parallel by changing a config line. No mesh axis name
appears in model code.

Logical axis vocabulary (extend here, and give every new name a rule in ``configs/base.py``):
  batch       activations' leading batch dim
  embed       model width (residual stream / input features of a projection)
  mlp         feed-forward hidden width
  heads       attention projection outputs (num_heads * head_dim)
  vocab       token vocabulary / position tables
  conv_in     input channels of a convolution kernel
  conv_out    output channels of a convolution kernel
  norm        scales / biases of normalization layers (replicated)
  codebook    VQ codebook entries
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, Any]  # logical name -> mesh axis name | tuple of names | None

_log = logging.getLogger(__name__)
_active: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("rules", default=None)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape") -> tuple[int, ...]:
    """Fills in one -1 entry so the product equals ``num_devices``; raises naming ``key`` otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{key}={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"{key}={shape}: at most one entry may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{key}={shape}: entries must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{key}={shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"{key}={shape}: product {math.prod(shape)} != device count {num_devices}")
    return shape


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh from ``config.mesh``.

    ``mesh_cfg.shape`` is the per-slice (ICI) shape; ``mesh_cfg.dcn_shape`` (optional) is the cross-slice
    shape for multi-slice pods, multiplied into the same named axes. Axes are ``Auto``: jit infers the
    sharding of intermediates from the constraints we give (jax 0.10 defaults ``make_mesh`` to Explicit).
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = tuple(int(s) for s in (mesh_cfg.get("dcn_shape", None) or (1,) * len(MESH_AXES)))
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(f"mesh.dcn_shape={dcn}: {len(devices)} devices do not split into {num_slices} slices")
    ici = resolve_mesh_shape(mesh_cfg.shape, len(devices) // num_slices)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError):
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None] | None, rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (later dims that map to it stay unsharded). With ``shape``
    and ``mesh``, a dim whose size the mesh axes do not divide stays unsharded too, so odd sizes (4 latent
    channels, 3 RGB inputs) need no special rules.
    """
    if logical is None:
        return P()
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in config.sharding.logical_axis_rules")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and axes:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _logical_names(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedSharding for every leaf of an (abstract or concrete) nnx.State from its logical axis names."""
    rules = dict(rules)

    def one(var):
        names = _logical_names(var) if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", ())
        if names is not None and len(names) != len(shape):
            raise ValueError(f"logical axes {names} do not match parameter shape {shape}")
        return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Batch arrays are split over (data, fsdp) on their leading dim and replicated otherwise."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Activates ``rules`` for ``constrain`` calls traced inside this context (the trainer sets it)."""
    token = _active.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _active.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside ``use_rules`` (single device, tests)."""
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
