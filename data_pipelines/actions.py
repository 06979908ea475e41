"""Action normalization with the cached per-dataset statistics (``action_stats.json``).

Position / rotation dims (0..5) map [q01, q99] -> [-1, 1] (clipped); the gripper (dim 6, 1 = open) maps
{0, 1} -> {-1, 1}. ``unnormalize`` inverts it (what a policy applies to its outputs before acting).
"""

from __future__ import annotations

import numpy as np


def _bounds(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(stats["q01"], np.float32)[:6]
    hi = np.asarray(stats["q99"], np.float32)[:6]
    return lo, hi


def normalize(actions_T7: np.ndarray, stats: dict) -> np.ndarray:
    lo, hi = _bounds(stats)
    a = np.asarray(actions_T7, np.float32).copy()
    span = np.where(hi - lo > 1e-8, hi - lo, 1.0)
    a[..., :6] = np.where(hi - lo > 1e-8, np.clip(2 * (a[..., :6] - lo) / span - 1, -1, 1), 0.0)
    a[..., 6] = 2 * np.clip(a[..., 6], 0, 1) - 1
    return a


def unnormalize(actions_T7: np.ndarray, stats: dict) -> np.ndarray:
    lo, hi = _bounds(stats)
    a = np.asarray(actions_T7, np.float32).copy()
    a[..., :6] = (np.clip(a[..., :6], -1, 1) + 1) / 2 * (hi - lo) + lo
    a[..., 6] = (np.clip(a[..., 6], -1, 1) + 1) / 2
    return a
