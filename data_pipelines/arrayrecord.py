"""The converted, TensorFlow-free layout training reads: ArrayRecord steps + a JSON episode index.

``<dataset dir>/arrayrecord/`` holds, per split:
  ``<split>-NNNNN-of-MMMMM.array_record``  one record per step: msgpack {view name: encoded image bytes}
  ``<split>_index.json``                 {"episodes": [{"start", "length", "instruction", "source"}],
                                          "views": [...], "control_hz": ..., "dataset": ...}
  ``<split>_actions.npy``                float32[total steps, 7] (standardized; memory-mapped when read)
and ``action_stats.json`` (mean, std, q01, q99, min, max per action dim over the train split, computed from
``train_actions.npy`` alone). ``launch.convert_rlds`` writes the whole folder elsewhere and renames it into place
only once every split and the statistics are complete, so a folder here is always one whole conversion.

Steps are records so that a sampler reads exactly the frames it needs (random access, global shuffle).
"""

from __future__ import annotations

import json
import logging
import os

import msgpack
import numpy as np

SUBDIR = "arrayrecord"
STEPS_PER_SHARD = 20_000


def layout_dir(dataset_dir: str) -> str:
    return os.path.join(dataset_dir, SUBDIR)


def has_split(dataset_dir: str, split: str) -> bool:
    return os.path.exists(os.path.join(layout_dir(dataset_dir), f"{split}_index.json"))


def action_stats(actions_N7: np.ndarray) -> dict:
    a = np.asarray(actions_N7, np.float64)
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "q01": np.quantile(a, 0.01, axis=0).tolist(),
            "q99": np.quantile(a, 0.99, axis=0).tolist(), "min": a.min(0).tolist(), "max": a.max(0).tolist(),
            "num_steps": int(a.shape[0])}


class SplitWriter:
    """Streams standardized episodes of one split into ArrayRecord shards + index + actions in ``folder`` (the
    layout folder itself, e.g. a temporary one that ``convert`` renames to ``<dataset dir>/arrayrecord``)."""

    def __init__(self, folder: str, split: str, dataset: str, control_hz: float):
        from array_record.python import array_record_module

        self._ar = array_record_module
        self.dir = folder
        os.makedirs(self.dir, exist_ok=True)
        self.split, self.dataset, self.control_hz = split, dataset, control_hz
        self.episodes: list[dict] = []
        self.actions: list[np.ndarray] = []
        self.views: list[str] | None = None
        self.shard_paths: list[str] = []
        self._writer = None
        self._in_shard = 0
        self.num_steps = 0

    def _open_shard(self):
        if self._writer is not None:
            self._writer.close()
        path = os.path.join(self.dir, f"{self.split}-{len(self.shard_paths):05d}.array_record.tmp")
        self.shard_paths.append(path)
        # group_size:1 keeps every record independently readable (random access to one step).
        self._writer = self._ar.ArrayRecordWriter(path, "group_size:1")
        self._in_shard = 0

    def add(self, episode: dict, source: str = "") -> None:
        views = sorted(episode["views"])
        if self.views is None:
            self.views = views
        elif views != self.views:
            raise ValueError(f"{source}: views {views} differ from the split's {self.views}")
        T = len(episode["views"][views[0]])
        if any(len(v) != T for v in episode["views"].values()):
            raise ValueError(f"{source}: views have different lengths (truncated episode)")
        actions = episode.get("actions")
        if actions is None:
            actions = np.zeros((T, 7), np.float32)
        if actions.shape != (T, 7):
            raise ValueError(f"{source}: actions {actions.shape} != ({T}, 7)")
        for t in range(T):
            if self._writer is None or self._in_shard >= STEPS_PER_SHARD:
                self._open_shard()
            self._writer.write(msgpack.packb({v: episode["views"][v][t] for v in views}))
            self._in_shard += 1
        self.episodes.append({"start": self.num_steps, "length": T, "instruction": episode["instruction"],
                              "source": source})
        self.actions.append(np.asarray(actions, np.float32))
        self.num_steps += T

    def close(self) -> dict:
        if self._writer is not None:
            self._writer.close()
        n = len(self.shard_paths)
        final = []
        for i, tmp in enumerate(self.shard_paths):
            path = os.path.join(self.dir, f"{self.split}-{i:05d}-of-{n:05d}.array_record")
            os.replace(tmp, path)
            final.append(os.path.basename(path))
        actions = np.concatenate(self.actions) if self.actions else np.zeros((0, 7), np.float32)
        np.save(os.path.join(self.dir, f"{self.split}_actions.npy"), actions)
        index = {"dataset": self.dataset, "control_hz": self.control_hz, "views": self.views or [],
                 "shards": final, "num_steps": self.num_steps, "episodes": self.episodes}
        # The index is written last: its presence marks a complete split.
        with open(os.path.join(self.dir, f"{self.split}_index.json"), "w") as f:
            json.dump(index, f)
        logging.info("wrote %s split %s: %d episodes, %d steps, %d shards", self.dataset, self.split,
                     len(self.episodes), self.num_steps, n)
        return index


class StepReader:
    """Random access to one split: ``frames(step indices, view)`` -> list of encoded images.

    Opened lazily so that it can be pickled into grain worker processes.
    """

    def __init__(self, dataset_dir: str, split: str):
        self.dir = layout_dir(dataset_dir)
        self.split = split
        with open(os.path.join(self.dir, f"{split}_index.json")) as f:
            self.index = json.load(f)
        self._source = None
        self._actions = None

    def __getstate__(self):
        return {"dir": self.dir, "split": self.split, "index": self.index, "_source": None, "_actions": None}

    @property
    def source(self) -> tuple[list, np.ndarray]:
        """(one ArrayRecordReader per shard, first global step of each shard), opened on first use."""
        if self._source is None:
            from array_record.python import array_record_module

            # No read-ahead and no internal thread pool: reads are small and random (a few steps of one
            # episode); parallelism comes from grain's read threads and worker processes.
            options = "readahead_buffer_size:0,max_parallelism:1"
            readers = [array_record_module.ArrayRecordReader(os.path.join(self.dir, s), options)
                       for s in self.index["shards"]]
            starts = np.cumsum([0] + [r.num_records() for r in readers])
            if starts[-1] != self.index["num_steps"]:
                raise ValueError(f"{self.dir}: shards hold {starts[-1]} steps, the index says "
                                 f"{self.index['num_steps']} (truncated conversion?)")
            self._source = (readers, starts)
        return self._source

    @property
    def actions(self) -> np.ndarray:
        if self._actions is None:
            self._actions = np.load(os.path.join(self.dir, f"{self.split}_actions.npy"), mmap_mode="r")
        return self._actions

    def describe(self, episode: int, t: int) -> str:
        ep = self.index["episodes"][episode]
        return f"{os.path.dirname(self.dir)} episode {ep.get('source') or episode} step {t}"

    def records(self, steps: list[int]) -> list[dict]:
        """Steps (global indices) -> their records. One batched read per shard touched, in this thread
        (the grain source's thread pool per call costs more than the read itself)."""
        readers, starts = self.source
        steps = np.asarray(steps, np.int64)
        if len(steps) and (steps.min() < 0 or steps.max() >= starts[-1]):
            raise IndexError(f"{self.dir}: step {int(steps.max())} outside the {int(starts[-1])} stored steps")
        shard = np.searchsorted(starts, steps, side="right") - 1
        out: list = [None] * len(steps)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            raw = readers[s].read([int(steps[i] - starts[s]) for i in where])
            for i, r in zip(where, raw):
                out[i] = msgpack.unpackb(r)
        return out


def compute_stats(dataset_dir: str) -> dict:
    """Action statistics of the converted train split, from ``train_actions.npy`` alone (no frame is read)."""
    path = os.path.join(layout_dir(dataset_dir), "train_actions.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no converted actions at {path}; run python -m launch.convert_rlds")
    actions = np.load(path, mmap_mode="r")
    if not len(actions):
        raise ValueError(f"{path}: the train split has no steps to compute action statistics from")
    return action_stats(actions)


def read_stats(dataset_dir: str) -> dict:
    """The cached ``action_stats.json``, or statistics computed from the actions (seconds) where that file is
    missing or describes another number of steps than the train split beside it (a stale file)."""
    path = os.path.join(layout_dir(dataset_dir), "action_stats.json")
    n = None
    if has_split(dataset_dir, "train"):
        with open(os.path.join(layout_dir(dataset_dir), "train_index.json")) as f:
            n = json.load(f)["num_steps"]
    if os.path.exists(path):
        with open(path) as f:
            stats = json.load(f)
        if stats and (n is None or stats.get("num_steps") == n):
            return stats
        logging.warning("%s describes %s steps, the train split has %s: recomputing from train_actions.npy",
                        path, stats.get("num_steps"), n)
    return compute_stats(dataset_dir)
