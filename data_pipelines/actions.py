"""Action normalization with the cached per-dataset statistics (``action_stats.json``).

Position / rotation dims (0..5) map [q01, q99] -> [-1, 1] (clipped); the gripper (dim 6, 1 = open) maps
{0, 1} -> {-1, 1}. ``unnormalize`` inverts it (what a policy applies to its outputs before acting).
``action_stats`` / ``compute_action_stats`` give the statistics; they read actions only, never a frame. A
registered LeRobot dataset's statistics are those of its train episodes (the loader's hold-out: the tail of the
episodes is eval): ``action_stats`` takes ``meta/stats.json``'s where it has q01 / q99, as the loader does.
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


def compute_action_stats(dataset: str, data_cfg) -> dict:
    """Statistics (mean, std, q01, q99, min, max, num_steps) of a robot dataset's train-split actions, computed
    from the actions alone, no frame decoded: ``train_actions.npy`` of a converted RLDS dataset, the
    ``rel_actions`` of CALVIN's annotated frames (``calvin.compute_stats``), the parquet actions of a LeRobot
    dataset's train episodes (``meta/stats.json`` is not read)."""
    from data_pipelines import arrayrecord, calvin, loader, oxe_table

    name = oxe_table.resolve(dataset)
    path = loader.dataset_dir(name, data_cfg)
    if name in oxe_table.LEROBOT_DATASETS:
        reader, train = _lerobot_train(name, path, data_cfg)
        if not len(train):
            raise ValueError(f"{path}: no train episodes to compute action statistics from")
        return arrayrecord.action_stats(np.concatenate([reader.episode_actions(int(e)) for e in train]))
    if name in oxe_table.CALVIN_DATASETS:
        return calvin.compute_stats(calvin.task_dir(path, oxe_table.CALVIN_DATASETS[name].folder), name)
    if name in oxe_table.ROBOT_DATASETS:
        return arrayrecord.compute_stats(path)
    raise ValueError(f"data: {name!r} has no actions (human video); action statistics need a robot dataset")


def action_stats(dataset: str, data_cfg) -> dict:
    """The statistics ``policy_window`` normalizes with: a converted dataset's cached ``action_stats.json`` while
    it matches the data beside it (else recomputed from the actions), CALVIN's computed once per process, a
    LeRobot dataset's ``meta/stats.json`` when it has q01 / q99 (else computed from its train episodes)."""
    from data_pipelines import arrayrecord, loader, oxe_table

    name = oxe_table.resolve(dataset)
    if name in oxe_table.ROBOT_DATASETS:
        return arrayrecord.read_stats(loader.dataset_dir(name, data_cfg))
    path = loader.dataset_dir(name, data_cfg)
    if name in oxe_table.LEROBOT_DATASETS:     # what policy_window normalizes with (loader.open_source)
        reader, train = _lerobot_train(name, path, data_cfg)
        return reader.stats(train)
    if path not in _COMPUTED:
        _COMPUTED[path] = compute_action_stats(name, data_cfg)
    return _COMPUTED[path]


_COMPUTED: dict[str, dict] = {}


def _lerobot_train(name: str, path: str, data_cfg):
    """(the registered LeRobot dataset's reader, its train episodes: the loader's hold-out at data_fraction 1)."""
    from data_pipelines import lerobot, loader, oxe_table

    reader = lerobot.EpisodeReader(path, oxe_table.LEROBOT_DATASETS[name])
    n = len(reader.index["episodes"])
    return reader, loader._holdout(n, "train", float(data_cfg.get("eval_fraction", 0.05)), 1.0,
                                   loader.episode_groups(reader))
