"""LeRobot datasets (codebase v2.1 and v3.0), read in place: a robot source for every sampler.

A dataset is a folder with ``meta/info.json`` (``codebase_version``, ``fps``, ``features`` {key: {dtype, shape}},
``data_path`` / ``video_path`` templates, ``chunks_size``) and
  v2.1  ``meta/episodes.jsonl`` ({episode_index, tasks, length}), ``meta/tasks.jsonl`` ({task_index, task}),
        one parquet per episode (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``) and one
        video per episode and camera (``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}
        .mp4``), chunk = episode_index // chunks_size;
  v3.0  ``meta/episodes/chunk-XXX/file-XXX.parquet`` (episode_index, tasks, length, data/chunk_index,
        data/file_index, and per camera videos/<key>/chunk_index, file_index, from_timestamp), ``meta/tasks
        .parquet``; many episodes per data file (``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet``)
        and per video file (``videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4``): an
        episode's frame t is shown at from_timestamp + t / fps.
Both: data rows carry ``episode_index``, ``frame_index`` and the action column; ``meta/stats.json`` may hold
{feature: {mean, std, min, max[, q01, q99]}}. Cameras are ``video`` features (AV1 / H.264 decoded with PyAV, one
seek per sample window and camera) or ``image`` features stored inline (PNG/JPEG bytes in the parquet).

A dataset joins the tables with ``register_lerobot(name, path, ...)``: a row in ``oxe_table.LEROBOT_DATASETS``,
after which ``name`` works wherever a dataset name does (mixture strings and dicts, ``data.paths.<name>``,
``dataset_id``, the control rate of gidm_pair spacing). Call it where the config is built (configs are code), so
that every process that builds the config registers the same rows. Actions become the pipeline's 7-D convention
(``action_dims`` picks the components; otherwise the first 7, zero-padded, with a warning) and the last component
follows ``gripper`` (oxe_table's conventions).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines import oxe_table

VERSIONS = ("v2.1", "v3.0")
INFO = os.path.join("meta", "info.json")
STATS = os.path.join("meta", "stats.json")
ACTION_DIM = 7
_CACHED_FILES = 16        # parquet columns kept per reader (a v3.0 file holds many episodes)


def read_info(path: str) -> dict:
    """``meta/info.json`` of the dataset at ``path``, with its codebase version checked."""
    file = os.path.join(path, INFO)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no LeRobot dataset at {path}: {file} is missing")
    with open(file) as f:
        info = json.load(f)
    version = str(info.get("codebase_version", ""))
    if version not in VERSIONS:
        raise ValueError(f"{file}: codebase_version {version!r} is not one this reader knows ({VERSIONS}); "
                         f"convert the dataset with LeRobot's conversion script")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ValueError(f"{file}: no {key!r}")
    return info


def camera_keys(info: dict) -> list[str]:
    """Feature keys holding camera frames (dtype video or image), in info.json order."""
    return [k for k, f in info["features"].items() if f.get("dtype") in ("video", "image")]


def register_lerobot(name: str, path: str, *, image_keys: Mapping[str, str] | Sequence[str] | None = None,
                     action_key: str = "action", action_dims: Sequence[int] | None = None, gripper: str = "open",
                     instruction: str | None = None) -> oxe_table.LeRobotDataset:
    """Make the LeRobot dataset at ``path`` known as ``name``.

    image_keys: {view: feature key} with views "primary" / "wrist", or a list of keys (primary first, then wrist);
      default: the dataset's first two camera features. action_dims: which components of ``action_key`` make
      the 7-D action (None: the first 7, zero-padded when fewer, with a warning). gripper: how the 7th component
      maps onto 1 = open / 0 = closed (see oxe_table). instruction: a fixed instruction for every episode
      instead of its task. The control rate is info.json's fps. Re-registering a name replaces its row.
    """
    if oxe_table.resolve(name) in oxe_table.known_datasets() and name not in oxe_table.LEROBOT_DATASETS:
        raise ValueError(f"register_lerobot: {name!r} is a built-in dataset name; choose another")
    if ":" in name or "," in name:
        raise ValueError(f"register_lerobot: name {name!r} may not contain ':' or ',' (mixture string syntax)")
    info = read_info(path)
    cameras = camera_keys(info)
    if image_keys is None:
        image_keys = cameras[:2]
    if not isinstance(image_keys, Mapping):
        image_keys = dict(zip(("primary", "wrist"), image_keys))
    for view, key in image_keys.items():
        if view not in ("primary", "wrist"):
            raise ValueError(f"register_lerobot({name!r}): image_keys view {view!r} must be 'primary' or 'wrist'")
        if key not in cameras:
            raise ValueError(f"register_lerobot({name!r}): image_keys[{view!r}]={key!r} is not a camera feature "
                             f"of {os.path.join(path, INFO)} (cameras: {cameras})")
    if not image_keys:
        raise ValueError(f"register_lerobot({name!r}): {os.path.join(path, INFO)} has no video or image feature")
    if action_key not in info["features"]:
        raise ValueError(f"register_lerobot({name!r}): action_key={action_key!r} is not a feature of "
                         f"{os.path.join(path, INFO)} (features: {sorted(info['features'])})")
    width = int(np.prod(info["features"][action_key].get("shape") or [1]))
    if action_dims is not None:
        action_dims = tuple(int(d) for d in action_dims)
        if len(action_dims) > ACTION_DIM or any(not 0 <= d < width for d in action_dims):
            raise ValueError(f"register_lerobot({name!r}): action_dims={action_dims} must be at most {ACTION_DIM} "
                             f"indices into {action_key!r} (width {width})")
    elif width != ACTION_DIM:
        logging.warning("LeRobot %s: %r has %d components; the pipeline's actions have %d: %s (pass action_dims= "
                        "to choose them)", name, action_key, width, ACTION_DIM,
                        "the first 7 are kept" if width > ACTION_DIM else "zero-padded at the end")
    if gripper not in oxe_table.GRIPPER_CONVENTIONS:
        raise ValueError(f"register_lerobot({name!r}): gripper={gripper!r}; one of {oxe_table.GRIPPER_CONVENTIONS}")
    row = oxe_table.LeRobotDataset(name=name, path=str(path), image_keys=tuple(image_keys.items()),
                                   action_key=action_key, action_dims=action_dims, gripper=gripper,
                                   control_hz=float(info["fps"]), instruction=instruction)
    oxe_table.LEROBOT_DATASETS[name] = row
    return row


def to_7d(raw_ND: np.ndarray, row: oxe_table.LeRobotDataset, *, gripper: bool = True) -> np.ndarray:
    """Dataset actions float[N, D] -> float32[N, 7] (row.action_dims or the first 7 / zero-padded; the last
    component mapped by row.gripper unless ``gripper`` is False)."""
    raw = np.asarray(raw_ND, np.float32).reshape(len(raw_ND), -1)
    picked = raw[:, list(row.action_dims)] if row.action_dims is not None else raw[:, :ACTION_DIM]
    a = np.zeros((len(raw), ACTION_DIM), np.float32)
    a[:, :picked.shape[1]] = picked
    if gripper:
        a[:, 6] = gripper_open(a[:, 6], row.gripper)
    return a


def gripper_open(g: np.ndarray, convention: str) -> np.ndarray:
    """A gripper command in ``convention`` -> 1 = open, 0 = closed (oxe_table's module docstring)."""
    if convention == "open":
        return np.clip(g, 0, 1)
    if convention == "closed":
        return 1 - np.clip(g, 0, 1)
    if convention == "signed":
        return (np.clip(g, -1, 1) + 1) / 2
    if convention == "signed_closed":
        return (1 - np.clip(g, -1, 1)) / 2
    return np.zeros_like(g)


# ------------------------------------------------------------------------------------------------ metadata
def _jsonl(file: str) -> list[dict]:
    with open(file) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_table(file: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(file, columns=columns)


def _episodes_v21(path: str, info: dict) -> list[dict]:
    file = os.path.join(path, "meta", "episodes.jsonl")
    if not os.path.exists(file):
        raise FileNotFoundError(f"LeRobot v2.1 dataset without {file}")
    chunks = int(info.get("chunks_size", 1000))
    out = []
    for e in sorted(_jsonl(file), key=lambda e: int(e["episode_index"])):
        k = int(e["episode_index"])
        fmt = {"episode_chunk": k // chunks, "episode_index": k}
        videos = {key: (os.path.join(path, info["video_path"].format(video_key=key, **fmt)), 0.0)
                  for key in camera_keys(info) if info["features"][key]["dtype"] == "video"}
        out.append({"episode_index": k, "length": int(e["length"]), "tasks": list(e.get("tasks") or []),
                    "data": os.path.join(path, info["data_path"].format(**fmt)), "videos": videos})
    return out


def _episodes_v30(path: str, info: dict) -> list[dict]:
    import pyarrow.parquet as pq

    folder = os.path.join(path, "meta", "episodes")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"LeRobot v3.0 dataset without episode metadata ({folder}/chunk-*/file-*.parquet)")
    cams = [k for k in camera_keys(info) if info["features"][k]["dtype"] == "video"]
    want = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index"] + [
        f"videos/{k}/{c}" for k in cams for c in ("chunk_index", "file_index", "from_timestamp")]
    out = []
    for file in files:
        missing = [c for c in want if c not in pq.read_schema(file).names]
        if missing:
            raise ValueError(f"{file}: LeRobot v3.0 episode metadata without columns {missing}")
        cols = _read_table(file, want).to_pydict()      # not the per-episode stats/* columns
        for i in range(len(cols["episode_index"])):
            data = info["data_path"].format(chunk_index=cols["data/chunk_index"][i],
                                            file_index=cols["data/file_index"][i])
            videos = {k: (os.path.join(path, info["video_path"].format(
                video_key=k, chunk_index=cols[f"videos/{k}/chunk_index"][i],
                file_index=cols[f"videos/{k}/file_index"][i])), float(cols[f"videos/{k}/from_timestamp"][i]))
                for k in cams}
            out.append({"episode_index": int(cols["episode_index"][i]), "length": int(cols["length"][i]),
                        "tasks": list(cols["tasks"][i] or []), "data": os.path.join(path, data), "videos": videos})
    return sorted(out, key=lambda e: e["episode_index"])


# ------------------------------------------------------------------------------------------------ reader
class EpisodeReader:
    """A LeRobot dataset with ``arrayrecord.StepReader``'s interface for the loader's robot samplers:
    ``index["episodes"]`` (start = a running step id, length, instruction), ``index["views"]``,
    ``records(step ids)`` -> [{view: uint8[H, W, 3]}] (a view is decoded on first access, for all the steps of
    that call at once: one video seek per window and camera) and ``actions[step ids]`` -> float32[N, 7].
    Picklable: its caches are dropped on the way to a grain worker."""

    def __init__(self, path: str, row: oxe_table.LeRobotDataset):
        self.path, self.row = path, row
        self.info = read_info(path)
        self.fps = float(self.info["fps"])
        version = self.info["codebase_version"]
        eps = (_episodes_v21 if version == "v2.1" else _episodes_v30)(path, self.info)
        starts = np.concatenate([[0], np.cumsum([e["length"] for e in eps])]).astype(np.int64)
        for e, s in zip(eps, starts):
            e["start"] = int(s)
            e["instruction"] = row.instruction if row.instruction is not None else (e["tasks"] or [""])[0]
            e["source"] = f"episode {e['episode_index']}"
        self._starts = starts
        self.views = dict(row.image_keys)
        self.index = {"dataset": row.name, "control_hz": self.fps, "views": sorted(self.views), "episodes": eps}
        self._init_caches()

    def _init_caches(self):
        self._files: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_files"), state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_caches()

    def describe(self, episode: int, t: int) -> str:
        ep = self.index["episodes"][episode]
        return f"{ep['data']} (LeRobot episode {ep['episode_index']}) step {t}"

    def episode_of(self, step_ids: np.ndarray) -> np.ndarray:
        steps = np.asarray(step_ids, np.int64)
        if len(steps) and (steps.min() < 0 or steps.max() >= self._starts[-1]):
            raise IndexError(f"{self.path}: step {int(steps.max())} outside the {int(self._starts[-1])} steps")
        return np.searchsorted(self._starts, steps, side="right") - 1

    # --- parquet columns
    def _column(self, file: str, key: str):
        """({episode_index: (first, end) rows}, rows in (episode, frame) order, values) of one data file's column
        ``key``: actions as float32[R, D], images as the Arrow column (rows taken on demand). Cached (LRU)."""
        with self._lock:
            if (file, key) in self._files:
                self._files.move_to_end((file, key))
                return self._files[(file, key)]
        if not os.path.exists(file):
            raise FileNotFoundError(f"LeRobot data file {file} is missing")
        table = _read_table(file, ["episode_index", "frame_index", key])
        ep = np.asarray(table.column("episode_index").to_numpy(), np.int64)
        order = np.lexsort((np.asarray(table.column("frame_index").to_numpy(), np.int64), ep))
        eps, first, count = np.unique(ep[order], return_index=True, return_counts=True)
        spans = {int(e): (int(f), int(f + n)) for e, f, n in zip(eps, first, count)}
        col = table.column(key)
        if key == self.row.action_key:
            values = _matrix(col, table.num_rows, f"{file} column {key!r}")
        else:
            values = col.combine_chunks()
        value = (spans, order, values)
        with self._lock:
            self._files[(file, key)] = value
            while len(self._files) > _CACHED_FILES:
                self._files.popitem(last=False)
        return value

    def _rows(self, ep: dict, key: str, ts: np.ndarray):
        """Values of column ``key`` at steps ``ts`` of episode ``ep`` (rows matched by episode and frame index)."""
        spans, order, values = self._column(ep["data"], key)
        first, end = spans.get(ep["episode_index"], (0, 0))
        if end - first < ep["length"]:
            raise ValueError(f"{ep['data']}: episode {ep['episode_index']} has {end - first} rows, its metadata "
                             f"says {ep['length']}")
        picked = order[first + np.asarray(ts, np.int64)]
        return values[picked] if isinstance(values, np.ndarray) else values.take(picked).to_pylist()

    def episode_actions(self, episode: int) -> np.ndarray:
        """float32[length, 7]: the whole episode's actions in the pipeline's convention."""
        ep = self.index["episodes"][episode]
        return to_7d(self._rows(ep, self.row.action_key, np.arange(ep["length"])), self.row)

    @property
    def actions(self) -> _Actions:
        return _Actions(self)

    # --- frames
    def records(self, step_ids) -> list[dict]:
        steps = np.asarray(step_ids, np.int64).reshape(-1)
        eps = self.episode_of(steps)
        out: list = [None] * len(steps)
        for e in np.unique(eps):
            where = np.nonzero(eps == e)[0]
            window = _Window(self, int(e), steps[where] - self._starts[e])
            for j, i in enumerate(where):
                out[i] = _Frame(window, j)
        return out

    def frames(self, episode: int, ts: np.ndarray, view: str) -> np.ndarray:
        """uint8[len(ts), H, W, 3]: camera ``view`` at steps ``ts`` of one episode (one seek for a video)."""
        ep = self.index["episodes"][episode]
        key = self.views[view]
        if key in ep["videos"]:
            file, offset = ep["videos"][key]
            return decode_frames(file, [offset + int(t) / self.fps for t in ts], self.fps)
        from PIL import Image

        images = self._rows(ep, key, np.asarray(ts, np.int64))
        out = []
        for img in images:
            data = img.get("bytes") if isinstance(img, dict) else img
            if not data:
                raise ValueError(f"{ep['data']}: image {key!r} of episode {ep['episode_index']} has no bytes")
            out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        return np.stack(out)

    # --- statistics
    def stats(self, episodes: np.ndarray) -> dict:
        """Action statistics in the pipeline's 7-D convention: meta/stats.json's where it has q01 and q99 for the
        action (mean, std, min, max, q01, q99), else computed from the parquet actions of ``episodes``."""
        from data_pipelines import arrayrecord

        file = os.path.join(self.path, STATS)
        if os.path.exists(file):
            with open(file) as f:
                entry = json.load(f).get(self.row.action_key) or {}
            if all(k in entry for k in ("q01", "q99")):
                # dims 0..5 only enter the normalization (actions.normalize): the gripper is left as stored
                out = {k: to_7d(np.asarray(entry[k], np.float32).reshape(1, -1), self.row, gripper=False)[0].tolist()
                       for k in ("mean", "std", "min", "max", "q01", "q99") if k in entry}
                out["num_steps"] = int(np.asarray(entry.get("count", [0])).reshape(-1)[0])
                out["source"] = file
                return out
        if not len(episodes):
            raise ValueError(f"{self.path}: no episodes to compute action statistics from")
        return arrayrecord.action_stats(np.concatenate([self.episode_actions(int(e)) for e in episodes]))


def _matrix(col, rows: int, what: str) -> np.ndarray:
    """An Arrow column of vectors (list or fixed-size list) or scalars -> float32[rows, D]."""
    import pyarrow as pa

    arr = col.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    flat = np.asarray(arr.to_numpy(zero_copy_only=False), np.float32)
    if rows and flat.size % rows:
        raise ValueError(f"{what}: {flat.size} values in {rows} rows: vectors of different lengths")
    return flat.reshape(rows, -1)


class _Actions:
    """``reader.actions[ids]``: actions of step ids (an int, a slice with bounds, or an array) -> float32[..., 7]."""

    def __init__(self, reader: EpisodeReader):
        self.reader = reader

    def __getitem__(self, ids) -> np.ndarray:
        if isinstance(ids, slice):
            ids = np.arange(ids.start, ids.stop)
        single = np.ndim(ids) == 0
        ids = np.atleast_1d(np.asarray(ids, np.int64))
        out = np.zeros((len(ids), ACTION_DIM), np.float32)
        eps = self.reader.episode_of(ids)
        for e in np.unique(eps):
            where = np.nonzero(eps == e)[0]
            ep = self.reader.index["episodes"][e]
            raw = self.reader._rows(ep, self.reader.row.action_key, ids[where] - ep["start"])
            out[where] = to_7d(raw, self.reader.row)
        return out[0] if single else out


class _Window:
    """The steps of one ``records`` call within one episode; decodes each view once, on first access."""

    def __init__(self, reader: EpisodeReader, episode: int, ts: np.ndarray):
        self.reader, self.episode, self.ts = reader, episode, ts
        self.decoded: dict[str, np.ndarray] = {}

    def view(self, view: str) -> np.ndarray:
        if view not in self.decoded:
            self.decoded[view] = self.reader.frames(self.episode, self.ts, view)
        return self.decoded[view]


class _Frame(Mapping):
    """One step's {view: uint8[H, W, 3]}, decoded lazily through its window."""

    def __init__(self, window: _Window, j: int):
        self.window, self.j = window, j

    def __getitem__(self, view: str) -> np.ndarray:
        if view not in self.window.reader.views:
            raise KeyError(view)
        return self.window.view(view)[self.j]

    def __contains__(self, view) -> bool:      # without decoding
        return view in self.window.reader.views

    def __iter__(self):
        return iter(self.window.reader.views)

    def __len__(self):
        return len(self.window.reader.views)


def decode_frames(path: str, times_s: Sequence[float], fps: float) -> np.ndarray:
    """uint8[len(times), H, W, 3]: the frames whose timestamps are nearest the given times (within half a frame).

    One seek (to the keyframe at or before the earliest time), then decoding up to the latest time. A time with no
    frame within half a frame period raises (a window past the video's end, a wrong from_timestamp)."""
    import av

    want = np.asarray(times_s, np.float64)
    tol = 0.5 / fps
    lo, hi = float(want.min()), float(want.max())
    best: dict[int, tuple[float, np.ndarray]] = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        tb = float(s.time_base)
        c.seek(int(max(0.0, lo - tol) / tb), stream=s, backward=True, any_frame=False)
        for frame in c.decode(s):
            t = frame.time if frame.time is not None else (frame.pts or 0) * tb
            if t > hi + tol:
                break
            near = np.nonzero(np.abs(want - t) <= tol)[0]
            if len(near):
                img = frame.to_ndarray(format="rgb24")
                for k in near:
                    d = abs(want[k] - t)
                    if k not in best or d < best[k][0]:
                        best[int(k)] = (d, img)
    missing = [float(want[k]) for k in range(len(want)) if k not in best]
    if missing:
        raise ValueError(f"{path}: no frame within {tol:.4f}s of t={missing[:4]}s")
    return np.stack([best[k][1] for k in range(len(want))])

