"""CALVIN in its released layout, read in place (no conversion): the policy's fine-tuning data.

A task folder (``task_ABC_D``, ``task_D_D``, ...) holds ``training/`` (split "train") and ``validation/``
(split "eval"), each with
  ``episode_XXXXXXX.npz``        one frame each, by global frame id: rgb_static uint8[200, 200, 3], rgb_gripper
                                 uint8[84, 84, 3], rel_actions float[7] (6 relative EEF deltas in [-1, 1], gripper
                                 -1 = close / 1 = open), actions, robot_obs, scene_obs, depth_*
  ``ep_start_end_ids.npy``       int[E, 2]: first and last frame id of each recorded episode
  ``lang_annotations/auto_lang_ann.npy``   {"language": {"ann": [text], "task": [...], "emb": ...},
                                 "info": {"indx": [(first, last frame id)], ...}}
  ``statistics.yaml``            CALVIN's own observation statistics (not needed here).

Samples follow the reference's DiskDataset (min_window_size 21, obs_seq_len 1, act_seq_len 10): an annotated
segment (first..last, inclusive) yields one item per start frame t in range(first, last + 1 - 21), i.e. every
frame but the segment's last 21; the observation is frame t and the actions are rel_actions of frames t..t+9. The
reader below gives the loader's robot samplers the same interface as ``arrayrecord.StepReader`` (an "episode" is
one annotated segment), so every spec works on CALVIN: gfdm_clip and gidm_pair clamp to the segment's end.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

SPLITS = {"train": "training", "eval": "validation"}
VIEWS = {"primary": "rgb_static", "wrist": "rgb_gripper"}   # our view names -> npz keys
ACTION_KEY = "rel_actions"
ANNOTATIONS = os.path.join("lang_annotations", "auto_lang_ann.npy")
EPISODES = "ep_start_end_ids.npy"
MIN_WINDOW = 21          # the reference's min_window_size: a segment's last 21 frames start no sample
STATS_MAX_FRAMES = 200_000


def frame_name(frame_id: int) -> str:
    return f"episode_{int(frame_id):07d}.npz"


def task_dir(path: str, folder: str) -> str:
    """``path`` itself when it holds training/ or validation/, else ``path/<folder>`` when that does."""
    for p in (path, os.path.join(path, folder)):
        if any(os.path.isdir(os.path.join(p, s)) for s in SPLITS.values()):
            return p
    return path


def has_split(task: str, split: str) -> bool:
    return os.path.exists(os.path.join(task, SPLITS[split], ANNOTATIONS))


def read_annotations(split_dir: str) -> list[tuple[int, int, str]]:
    """[(first frame, last frame (inclusive), instruction)] of one split's language annotations."""
    path = os.path.join(split_dir, ANNOTATIONS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no CALVIN language annotations at {path}")
    # The one pickle this package reads: CALVIN ships its annotations as a Python dict saved with np.save, which
    # numpy loads only with allow_pickle. It is read from this one file of this known dataset layout; every
    # other file (frames, episode bounds) is read without pickle.
    ann = np.load(path, allow_pickle=True).item()
    try:
        texts, indx = list(ann["language"]["ann"]), list(ann["info"]["indx"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{'language': {{'ann': ...}}, 'info': {{'indx': ...}}}}, "
                         f"missing {e}") from None
    if len(texts) != len(indx):
        raise ValueError(f"{path}: {len(texts)} instructions but {len(indx)} (start, end) ranges")
    return [(int(s), int(e), str(t).strip()) for (s, e), t in zip(indx, texts)]


class FrameReader:
    """One split of a CALVIN task folder, with ``arrayrecord.StepReader``'s interface: ``index["episodes"]`` (one
    per annotated segment: start frame id, length, instruction), ``index["views"]``, ``records(frame ids)`` ->
    [{view: uint8[H, W, 3]}] and ``actions[frame ids]`` -> float32[N, 7] rel_actions. Picklable (plain fields)."""

    def __init__(self, task: str, split: str, dataset: str, control_hz: float = 30.0):
        self.dir = os.path.join(task, SPLITS[split])
        bounds_path = os.path.join(self.dir, EPISODES)
        if not os.path.exists(bounds_path):
            raise FileNotFoundError(f"no CALVIN episode bounds at {bounds_path}")
        bounds = np.load(bounds_path).reshape(-1, 2)
        episodes, outside = [], 0
        for k, (first, last, text) in enumerate(read_annotations(self.dir)):
            # A segment spanning two recordings would join unrelated frames: keep those inside one recording.
            if not np.any((bounds[:, 0] <= first) & (last <= bounds[:, 1])):
                outside += 1
                continue
            episodes.append({"start": first, "length": last - first + 1, "instruction": text,
                             "source": f"annotation {k} (frames {first}-{last})"})
        if outside:
            logging.warning("%s: %d annotated segments cross a recording boundary (%s); skipped", self.dir, outside,
                            EPISODES)
        self.index = {"dataset": dataset, "control_hz": control_hz, "views": sorted(VIEWS), "episodes": episodes}

    def path(self, frame_id: int) -> str:
        return os.path.join(self.dir, frame_name(frame_id))

    def records(self, frame_ids) -> list[dict]:
        out = []
        for i in frame_ids:
            with np.load(self.path(i)) as z:   # npz members are read lazily: only the two images
                out.append({view: z[key] for view, key in VIEWS.items()})
        return out

    @property
    def actions(self) -> _RelActions:
        return _RelActions(self)

    def describe(self, episode: int, t: int) -> str:
        return self.path(self.index["episodes"][episode]["start"] + t)


class _RelActions:
    """``reader.actions[ids]``: rel_actions of the given frame ids (an int, a slice with bounds, or an array)."""

    def __init__(self, reader: FrameReader):
        self.reader = reader

    def __getitem__(self, ids) -> np.ndarray:
        if isinstance(ids, slice):
            ids = np.arange(ids.start, ids.stop)
        single = np.ndim(ids) == 0
        ids = np.atleast_1d(np.asarray(ids, np.int64))
        acts = np.stack([read_action(self.reader.path(i)) for i in ids]) if len(ids) else np.zeros((0, 7))
        acts = acts.astype(np.float32)
        return acts[0] if single else acts


def read_action(path: str) -> np.ndarray:
    with np.load(path) as z:
        a = np.asarray(z[ACTION_KEY], np.float32).reshape(-1)
    if a.shape != (7,):
        raise ValueError(f"{path}: {ACTION_KEY} has shape {a.shape}, expected (7,)")
    return a


def compute_stats(task: str, dataset: str, max_frames: int = STATS_MAX_FRAMES, threads: int = 16) -> dict:
    """Action statistics (``arrayrecord.action_stats``) of the training split's rel_actions over the annotated
    frames (what policy_window samples), from the ``rel_actions`` member of each npz only: no image is read.
    Above ``max_frames`` frames a fixed (seed 0) random subset of that many frames is used."""
    from data_pipelines import arrayrecord

    reader = FrameReader(task, "train", dataset)
    frames = np.unique(np.concatenate(
        [ep["start"] + np.arange(ep["length"]) for ep in reader.index["episodes"]] or [np.zeros(0, np.int64)]))
    if not len(frames):
        raise ValueError(f"{reader.dir}: no annotated frames to compute action statistics from")
    total = len(frames)
    if total > max_frames:
        frames = np.sort(np.random.default_rng(0).choice(frames, max_frames, replace=False))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        acts = np.stack(list(pool.map(read_action, [reader.path(i) for i in frames])))
    stats = arrayrecord.action_stats(acts)
    stats["frames_total"] = int(total)
    return stats
