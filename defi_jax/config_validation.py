"""Checks an experiment config before anything is built or compiled; every error names the bad key."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax

from defi_jax import sharding, stage as stage_lib
from defi_jax.optim import SCHEDULES

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full")  # or any name in jax.checkpoint_policies


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def _fail(key: str, value, why: str):
    raise ConfigError(f"config.{key}={value!r}: {why}")


def data_parallel_size(config, num_devices: int) -> int:
    """Devices the global batch is split over: data * fsdp, within and across slices."""
    dcn = tuple(config.mesh.get("dcn_shape", None) or (1, 1, 1))
    ici = sharding.resolve_mesh_shape(config.mesh.shape, num_devices // math.prod(dcn), "config.mesh.shape")
    return ici[0] * ici[1] * dcn[0] * dcn[1]


def validate(config, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Raises :class:`ConfigError` naming the first bad key; calls the stage's own ``validate`` hook."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    t = config.train

    try:
        stage = stage_lib.get(config.stage)
    except ValueError:
        _fail("stage", config.stage, f"unknown stage; choose one of {stage_lib.names()}")
    except ImportError as e:
        _fail("stage", config.stage, f"the stage's module failed to import: {e}")

    for key in ("num_steps", "batch_size", "grad_accum_steps", "max_nonfinite_steps"):
        if not isinstance(t[key], int) or t[key] <= 0:
            _fail(f"train.{key}", t[key], "must be a positive integer")
    if not t.lr > 0:
        _fail("train.lr", t.lr, "learning rate must be positive")
    if t.schedule not in SCHEDULES:
        _fail("train.schedule", t.schedule, f"unknown schedule; choose one of {SCHEDULES}")
    if t.schedule == "tri_stage":
        fr = tuple(t.tri_stage)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            _fail("train.tri_stage", fr, "must be three non-negative fractions summing to 1")
    if t.warmup_steps < 0:
        _fail("train.warmup_steps", t.warmup_steps, "must be >= 0")
    for key in ("param_dtype", "compute_dtype"):
        if t[key] not in DTYPES:
            _fail(f"train.{key}", t[key], f"unknown dtype; choose one of {DTYPES}")
    if t.remat_policy not in REMAT_POLICIES and not hasattr(jax.checkpoint_policies, str(t.remat_policy)):
        _fail("train.remat_policy", t.remat_policy,
              f"choose one of {REMAT_POLICIES} or a name in jax.checkpoint_policies")
    if not 0.0 <= t.ema_decay < 1.0:
        _fail("train.ema_decay", t.ema_decay, "must be in [0, 1) (0 turns EMA off)")
    if t.grad_clip < 0:
        _fail("train.grad_clip", t.grad_clip, "must be >= 0 (0 turns clipping off)")
    for pattern in t.frozen:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("train.frozen", pattern, f"not a valid regex: {e}")
    for key in ("log_every", "save_every", "keep_checkpoints"):
        if t[key] <= 0:
            _fail(f"train.{key}", t[key], "must be positive")

    dcn = tuple(config.mesh.get("dcn_shape", None) or (1, 1, 1))
    if len(dcn) != len(sharding.MESH_AXES) or any(int(s) <= 0 for s in dcn):
        _fail("mesh.dcn_shape", dcn, f"needs {len(sharding.MESH_AXES)} positive entries")
    if num_devices % math.prod(dcn):
        _fail("mesh.dcn_shape", dcn, f"{num_devices} devices do not split into {math.prod(dcn)} slices")
    try:
        sharding.resolve_mesh_shape(config.mesh.shape, num_devices // math.prod(dcn), "config.mesh.shape")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = data_parallel_size(config, num_devices)
    if t.batch_size % dp:
        _fail("train.batch_size", t.batch_size,
              f"not divisible by the data-parallel size {dp} (mesh data * fsdp over all slices)")
    if t.batch_size % t.grad_accum_steps:
        _fail("train.grad_accum_steps", t.grad_accum_steps,
              f"does not divide config.train.batch_size={t.batch_size}")
    if (t.batch_size // t.grad_accum_steps) % dp:
        _fail("train.grad_accum_steps", t.grad_accum_steps,
              f"the microbatch {t.batch_size // t.grad_accum_steps} is not divisible by the data-parallel "
              f"size {dp}")
    if t.batch_size % process_count:
        _fail("train.batch_size", t.batch_size, f"not divisible by the process count {process_count}")

    rules = dict(config.sharding.logical_axis_rules)
    for name, target in rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for a in axes:
            if a not in sharding.MESH_AXES:
                _fail("sharding.logical_axis_rules", (name, target), f"unknown mesh axis {a!r}")

    _validate_datasets(config)
    if stage.validate is not None:
        try:
            stage.validate(config)
        except ConfigError:
            raise
        except (ValueError, KeyError) as e:
            raise ConfigError(str(e).strip("'\"")) from None


def _data_pipelines():
    """The input-side package, or None where it is absent (validation must not depend on it)."""
    try:
        import data_pipelines
    except ImportError:
        return None
    return data_pipelines


def _validate_datasets(config) -> None:
    """``config.data.mixture`` (preset, "name:w,..." or name -> weight) and ``config.data.dataset`` must be known.

    Uses ``data_pipelines.validate_data_config`` / ``known_datasets`` when that package is importable; without
    it only the mixture's weights are checked.
    """
    d = config.data
    dp = _data_pipelines()
    if "mixture" in d and d.mixture is not None:
        if dp is not None and hasattr(dp, "validate_data_config"):
            try:
                dp.validate_data_config(d, key="config.data")
            except ValueError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith("config.") else f"config.data: {msg}") from None
        elif isinstance(d.mixture, Mapping):
            mix = dict(d.mixture)
            for name, w in mix.items():
                if not isinstance(w, (int, float)) or w < 0:
                    _fail(f"data.mixture.{name}", w, "weights must be non-negative numbers")
            if not sum(mix.values()) > 0:
                _fail("data.mixture", mix, "weights sum to zero")
    known = getattr(dp, "known_datasets", None) if dp is not None else None
    if "dataset" in d and d.dataset and callable(known):
        resolve = getattr(getattr(dp, "oxe_table", None), "resolve", lambda n: n)
        if resolve(d.dataset) not in known():
            _fail("data.dataset", d.dataset, f"unknown dataset; known: {sorted(known())}")
