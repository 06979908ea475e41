"""Sources -> samplers -> grain mixture: what ``make_loader`` builds.

Pipeline per process (all deterministic for a seed, state checkpointable):
  per source: item indices of this split, ``data_fraction`` of the episodes (evenly spaced), this process's
              disjoint shard [process_index::process_count] -> repeat, with a new global permutation per
              epoch -> sample (random_map: per-element RNG from the seed and the element's index)
  mix the sources with their weights (grain MapDataset.mix) -> optional per-sample ``transform``
  -> read threads -> batch -> worker processes + prefetch.
A sample that cannot be built (undecodable video, truncated episode, missing key, empty instruction)
is skipped (grain drops ``None``) and counted per source; above ``max_failure_fraction`` the run stops with an
error naming the files, grouped by cause. Each sample carries how many samples its sampler skipped since its
previous one (in ``_skips``, removed by ``Loader``), so ``Loader.skip_counts()`` counts the skips of every read
thread and worker process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import string
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines import actions as action_norm
from data_pipelines import arrayrecord, calvin, lerobot, mixtures, oxe_table, video
from data_pipelines.failures import FailureLog

SPECS = ("gfdm_clip", "gidm_pair", "policy_window")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_instruction(text: str) -> str:
    """The reference GIDM collator's text (data.normalize_instructions): lower-case, ASCII punctuation removed."""
    return text.lower().translate(_NO_PUNCTUATION)


# ------------------------------------------------------------------------------------------------ sources
@dataclasses.dataclass
class RobotSource:
    """Robot data with actions, items = steps (episode, t) of the kept episodes: a converted RLDS dataset
    (``arrayrecord.StepReader``), CALVIN in its released layout (``calvin.FrameReader``, episode = one annotated
    segment) or a LeRobot dataset (``lerobot.EpisodeReader``)."""

    name: str
    path: str
    reader: arrayrecord.StepReader | calvin.FrameReader | lerobot.EpisodeReader
    episodes: np.ndarray          # int32[E] indices into reader.index["episodes"] kept for this split
    item_ep: np.ndarray           # int32[N] episode (index into reader.index["episodes"]) of each item
    item_t: np.ndarray            # int32[N] step within that episode
    control_hz: float
    stats: dict | None            # action statistics (only loaded where actions are normalized)

    kind = "robot"

    def __len__(self):
        return len(self.item_ep)

    def describe(self, i: int) -> str:
        return self.reader.describe(int(self.item_ep[i]), int(self.item_t[i]))


@dataclasses.dataclass
class VideoSource:
    """Human video (SSv2 / Ego4D layout): items are videos (SSv2) or narrations (Ego4D)."""

    name: str
    path: str
    layout: str
    items: list[dict]
    fps: float
    window_seconds: float

    kind = "video"

    def __len__(self):
        return len(self.items)

    def describe(self, i: int) -> str:
        return self.items[i]["path"]


def dataset_dir(name: str, data_cfg) -> str:
    paths = dict(data_cfg.get("paths") or {})
    if name in paths and paths[name]:
        return str(paths[name])
    if name in oxe_table.LEROBOT_DATASETS:       # registered with its folder
        return oxe_table.LEROBOT_DATASETS[name].path
    root = data_cfg.get("data_dir") or ""
    if not root:
        if name not in ("demo", "demo_human"):
            raise ValueError(f"data.data_dir is empty and data.paths has no {name!r}: say where {name} lives "
                             f"(only the demo datasets default to the embedded demo data)")
        from data_pipelines import demo

        root = demo.ensure_demo_data()
    return os.path.join(root, name)


def _holdout(n: int, split: str, eval_fraction: float, data_fraction: float,
             groups: list[str] | None = None) -> np.ndarray:
    """Episode indices of a split made from one list, both parts spread evenly over it: where datasets are
    stored task by task, a contiguous tail would hold out the last task only and a contiguous fraction would
    keep the first tasks only. Eval is the last episode of each of ``n_eval`` equal blocks (with one, the last
    episode); train keeps ``data_fraction`` of the rest, evenly spaced, the first one included.

    ``groups`` (one label per episode, e.g. its instruction) stratifies both: the spread runs over the episodes
    ordered by label (stably), so every task gets its share of the hold-out and of a fraction whatever order the
    episodes are stored in (the demo data's converted order is shuffled)."""
    if groups is not None and len(groups) != n:
        raise ValueError(f"_holdout: {len(groups)} group labels for {n} episodes")
    order = np.arange(n) if groups is None else np.array(sorted(range(n), key=groups.__getitem__), np.int64)
    n_eval = max(1, int(round(n * eval_fraction))) if n > 1 and eval_fraction > 0 else 0
    is_eval = np.zeros(n, bool)
    is_eval[(np.arange(1, n_eval + 1) * n) // max(n_eval, 1) - 1] = True
    if split == "eval":
        return np.sort(order[is_eval])
    rest = np.flatnonzero(~is_eval)
    keep = max(1, int(np.ceil(len(rest) * data_fraction))) if len(rest) else 0
    return np.sort(order[rest[(np.arange(keep) * len(rest)) // max(keep, 1)]])


def episode_groups(reader) -> list[str] | None:
    """Each episode's instruction (the task), the label :func:`_holdout` stratifies by; None when any is missing."""
    labels = [e.get("instruction") for e in reader.index["episodes"]]
    return labels if all(isinstance(t, str) for t in labels) else None


def _steps(reader, episodes: np.ndarray, tail: int, process_index: int, process_count: int):
    """(episode, t) of every item: steps 0..length - 1 - tail of each kept episode, this process's shard."""
    lengths = np.array([max(0, reader.index["episodes"][e]["length"] - tail) for e in episodes], np.int64)
    item_ep = np.repeat(episodes, lengths).astype(np.int32)
    item_t = (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
    return item_ep[process_index::process_count], item_t[process_index::process_count]


def open_source(name: str, data_cfg, split: str, process_index: int = 0, process_count: int = 1, *,
                with_stats: bool = False):
    """Build one source for this process (its disjoint shard of the split); ``with_stats`` loads the action
    statistics of a robot dataset (policy_window with data.normalize_actions)."""
    name = oxe_table.resolve(name)
    path = dataset_dir(name, data_cfg)
    frac = float(data_cfg.get("data_fraction", 1.0))
    if not 0 < frac <= 1:
        raise ValueError(f"data.data_fraction={frac!r} must be in (0, 1]")
    eval_fraction = float(data_cfg.get("eval_fraction", 0.05))
    if name in oxe_table.LEROBOT_DATASETS:       # no eval split of its own: evenly spaced episodes are held out
        reader = lerobot.EpisodeReader(path, oxe_table.LEROBOT_DATASETS[name])
        n = len(reader.index["episodes"])
        groups = episode_groups(reader)
        episodes = _holdout(n, split, eval_fraction, frac if split == "train" else 1.0, groups)
        item_ep, item_t = _steps(reader, episodes, 0, process_index, process_count)
        stats = reader.stats(_holdout(n, "train", eval_fraction, 1.0, groups)) if with_stats else None
        return RobotSource(name, path, reader, episodes, item_ep, item_t, reader.fps, stats)
    if name in oxe_table.ROBOT_DATASETS or name in oxe_table.CALVIN_DATASETS:
        if name in oxe_table.ROBOT_DATASETS:
            control_hz, tail = oxe_table.ROBOT_DATASETS[name].control_hz, 0
            if not arrayrecord.has_split(path, "train"):
                raise FileNotFoundError(
                    f"data: {name} has no converted data at {arrayrecord.layout_dir(path)}; convert the RLDS "
                    f"dataset once with: python -m launch.convert_rlds --dataset {name} --src {path}")
            has_eval = arrayrecord.has_split(path, "eval")
            open_split = functools.partial(arrayrecord.StepReader, path)
        else:
            row = oxe_table.CALVIN_DATASETS[name]
            control_hz, tail = row.control_hz, calvin.MIN_WINDOW
            path = calvin.task_dir(path, row.folder)
            if not calvin.has_split(path, "train"):
                raise FileNotFoundError(
                    f"data: {name} has no CALVIN training split at {os.path.join(path, calvin.SPLITS['train'])} "
                    f"(with {calvin.ANNOTATIONS}); point data.paths.{name} at the released task folder "
                    f"({row.folder}/ holding training/ and validation/)")
            has_eval = calvin.has_split(path, "eval")
            open_split = functools.partial(calvin.FrameReader, path, dataset=name, control_hz=control_hz)
        if split == "eval" and has_eval:
            reader = open_split("eval")
            episodes = np.arange(len(reader.index["episodes"]))
        else:  # a dataset without its own eval split holds out some of train (eval_fraction)
            reader = open_split("train")
            episodes = _holdout(len(reader.index["episodes"]), split, 0.0 if has_eval else eval_fraction,
                                frac if split == "train" else 1.0, episode_groups(reader))
        item_ep, item_t = _steps(reader, episodes, tail, process_index, process_count)
        stats = action_norm.action_stats(name, data_cfg) if with_stats else None
        return RobotSource(name, path, reader, episodes, item_ep, item_t, control_hz, stats)
    if name in oxe_table.VIDEO_DATASETS:
        row = oxe_table.VIDEO_DATASETS[name]
        if row.layout == "ssv2":
            if os.path.exists(os.path.join(path, "labels", "validation.json")):   # the released split
                items = video.ssv2_items(path, split)
                if split == "train":
                    items = [items[i] for i in _holdout(len(items), "train", 0.0, frac)]
            else:
                items = video.ssv2_items(path, "train")
                items = [items[i] for i in _holdout(len(items), split, eval_fraction, frac)]
        else:
            items = video.ego4d_items(path, select=lambda n: _holdout(n, split, eval_fraction,
                                                                      frac if split == "train" else 1.0))
        items = items[process_index::process_count]
        return VideoSource(name, path, row.layout, items, row.fps, row.window_seconds)
    raise ValueError(f"data.mixture: unknown dataset {name!r}; known: {oxe_table.known_datasets()}")


# ------------------------------------------------------------------------------------------------ samplers
def _pair_range(name: str, data_cfg) -> tuple[int, int]:
    """(lo, hi): the steps n between a gidm_pair's two frames are drawn from [lo, hi] (data.pair_spacing)."""
    spacing = data_cfg.get("pair_spacing", "seconds")
    if spacing == "reference":
        lo, hi = oxe_table.reference_pair_window(name)
        return lo - 1, hi - 1          # first and last frame of a window of W: n = W - 1
    if spacing != "seconds":
        raise ValueError(f"data.pair_spacing={spacing!r} must be 'seconds' or 'reference'")
    n = max(1, int(round(float(data_cfg.get("pair_seconds", 1.0)) * oxe_table.control_hz(name))))
    return n, n


class Sampler:
    """Builds one sample of ``spec`` from item ``i`` of ``source``; picklable (runs in grain workers).

    Returns None (the sample is skipped) when the input is unusable, counting it per source. Every sample it
    returns carries ``_skips`` int32[num_sources]: at ``source_index`` the samples skipped since its previous one.
    """

    def __init__(self, spec: str, source, data_cfg, *, max_pair_actions: int, dataset_id: int,
                 transform: Callable | None = None, process_index: int = 0, process_count: int = 1,
                 source_index: int = 0, num_sources: int = 1):
        self.spec, self.source, self.transform = spec, source, transform
        self.process_index, self.process_count = process_index, process_count
        self.source_index, self.num_sources = source_index, num_sources
        self.size = int(data_cfg.resolution)
        self.num_frames = int(data_cfg.num_frames)
        self.stride = int(data_cfg.frame_stride)
        self.views = tuple(data_cfg.views)
        self.pair_range = _pair_range(source.name, data_cfg)
        self.max_pair_actions = max_pair_actions
        self.obs_frames = int(data_cfg.obs_frames)
        self.horizon = int(data_cfg.action_horizon)
        self.normalize_actions = bool(data_cfg.get("normalize_actions", True))
        self.normalize_instructions = bool(data_cfg.get("normalize_instructions", False))
        self.dataset_id = dataset_id
        self.max_failure_fraction = float(data_cfg.max_failure_fraction)
        self.min_checked = int(data_cfg.min_failures_checked)
        self.attempts = 0
        self.failed = 0
        self.failures = FailureLog()      # grouped by cause, bounded (memory stays flat)
        self._pending_skips = 0
        self._lock = threading.Lock()
        self._durations: dict[str, float] = {}
        if spec == "policy_window" and source.kind == "video":
            raise ValueError(f"data.mixture: {source.name} is action-free video; policy_window needs actions")
        if spec == "policy_window" and self.normalize_actions and source.stats is None:
            raise FileNotFoundError(f"{source.name}: no action statistics for {source.path} (data.normalize_actions"
                                    f"=True); re-run the converter or set data.normalize_actions=False")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _read(self, i: int, rng: np.random.Generator) -> dict:
        """The raw sample; an interpreter-internal error (SystemError: CPython 3.11's ``ast`` module raises "AST
        constructor recursion depth mismatch" when two threads build ASTs at once) is retried once with the same
        draws, so a transient fault never changes which samples a run reads."""
        read = self._robot if self.source.kind == "robot" else self._video
        draws = copy.deepcopy(rng.bit_generator.state)
        try:
            return read(i, rng)
        except SystemError as e:
            logging.warning("data: %s sample %s: %s: %s; retrying it once", self.source.name, self.source.describe(i),
                            type(e).__name__, e)
            rng.bit_generator.state = draws
            return read(i, rng)

    def __call__(self, i, rng: np.random.Generator):
        i = int(i)
        self.attempts += 1
        try:
            sample = self._read(i, rng)
            if self.normalize_instructions:
                sample["instruction"] = normalize_instruction(sample["instruction"])
            if not sample["instruction"].strip():
                raise ValueError("empty instruction")
            sample["dataset"] = self.source.name
            sample["dataset_id"] = np.int32(self.dataset_id)
            # Shards are [process_index::process_count]: this is the item's index in the whole split.
            sample["item_id"] = np.int32(i * self.process_count + self.process_index)
            if self.transform is not None:
                sample = self.transform(sample)
        except Exception as e:  # noqa: BLE001 - any bad input is skipped; the fraction check stops runaway loss
            if "interpreter shutdown" in str(e):  # prefetch threads racing the exit: not a data problem
                return None
            what = self.source.describe(i)
            with self._lock:
                self.failed += 1
                self._pending_skips += 1
                self.failures.add(what, f"{type(e).__name__}: {e}")
            logging.warning("data: skipping %s sample %s (%d/%d failed in this process): %s", self.source.name,
                            what, self.failed, self.attempts, e)
            if self.attempts >= self.min_checked and self.failed / self.attempts > self.max_failure_fraction:
                raise RuntimeError(
                    f"data: {self.failed} of {self.attempts} samples of {self.source.name} failed "
                    f"(> config.data.max_failure_fraction={self.max_failure_fraction}); by cause:\n"
                    + str(self.failures)) from e
            return None
        skips = np.zeros(self.num_sources, np.int32)
        with self._lock:
            skips[self.source_index], self._pending_skips = self._pending_skips, 0
        sample["_skips"] = skips
        return sample

    def _pair_steps(self, rng) -> int:
        lo, hi = self.pair_range
        return lo if lo == hi else int(rng.integers(lo, hi + 1))

    # --- robot (converted RLDS, CALVIN)
    def _robot_frames(self, ep: dict, ts: list[int], view: str) -> np.ndarray:
        reader = self.source.reader
        uniq = sorted(set(ts))
        recs = reader.records([ep["start"] + t for t in uniq])
        decoded = {}
        for t, r in zip(uniq, recs):
            if view not in r:
                raise KeyError(f"view {view!r} missing (has {sorted(r)})")
            image = r[view]      # encoded bytes (ArrayRecord) or uint8[H, W, 3] (CALVIN)
            decoded[t] = (video.resize_crop(image, self.size) if isinstance(image, np.ndarray)
                          else video.decode_image(image, self.size))
        return np.stack([decoded[t] for t in ts])

    def _robot(self, i: int, rng) -> dict:
        src = self.source
        e = int(src.item_ep[i])
        ep = src.reader.index["episodes"][e]
        t, L = int(src.item_t[i]), int(ep["length"])
        if t >= L:
            raise ValueError(f"step {t} beyond episode length {L}")
        have = [v for v in src.reader.index["views"]]
        instruction = ep["instruction"]
        if self.spec == "gfdm_clip":
            options = [v for v in self.views if v in have] or have[:1]
            view = options[int(rng.integers(len(options)))]
            ts = [min(t + k * self.stride, L - 1) for k in range(self.num_frames + 1)]
            return {"frames": self._robot_frames(ep, ts, view), "instruction": instruction}
        if self.spec == "gidm_pair":
            view = "primary" if "primary" in have else have[0]
            t2 = min(t + self._pair_steps(rng), L - 1)
            acts = np.zeros((self.max_pair_actions, 7), np.float32)
            seg = np.asarray(src.reader.actions[ep["start"] + t: ep["start"] + t2], np.float32)
            acts[:len(seg)] = seg
            return {"frames": self._robot_frames(ep, [t, t2], view), "instruction": instruction,
                    "actions": acts, "has_actions": np.bool_(True), "num_actions": np.int32(len(seg))}
        # policy_window
        ts = [max(0, t - k) for k in range(self.obs_frames - 1, -1, -1)]
        frames = []
        for v in self.views:
            if v in have:
                frames.append(self._robot_frames(ep, ts, v))
            else:  # a dataset without this camera: black frames (see "view_mask")
                frames.append(np.zeros((len(ts), self.size, self.size, 3), np.uint8))
        steps = np.minimum(np.arange(t, t + self.horizon), L - 1)
        acts = np.asarray(src.reader.actions[ep["start"] + steps], np.float32)
        return {"frames": np.stack(frames), "instruction": instruction,
                "actions": action_norm.normalize(acts, src.stats) if self.normalize_actions else acts,
                "action_mask": np.arange(t, t + self.horizon) < L,
                "view_mask": np.array([v in have for v in self.views])}

    # --- human video
    def _duration(self, path: str) -> float:
        if path not in self._durations:
            if len(self._durations) > 10_000:
                self._durations.clear()
            self._durations[path] = video.probe_duration(path)
        return self._durations[path]

    def _video(self, i: int, rng) -> dict:
        src = self.source
        item = src.items[i]
        path = item["path"]
        if self.spec == "gfdm_clip":
            span = self.num_frames * self.stride / src.fps
        else:
            span = self._pair_steps(rng) / src.fps
        if src.layout == "ego4d":
            lo = max(0.0, item["center_s"] - src.window_seconds / 2)
            hi = max(lo, item["center_s"] + src.window_seconds / 2 - span)
        else:
            lo, hi = 0.0, max(0.0, self._duration(path) - span - 1e-3)
        start = float(rng.uniform(lo, hi)) if hi > lo else lo
        if self.spec == "gfdm_clip":
            times = [start + k * self.stride / src.fps for k in range(self.num_frames + 1)]
            return {"frames": video.decode_at(path, times, self.size), "instruction": item["instruction"]}
        frames = video.decode_at(path, [start, start + span], self.size)
        return {"frames": frames, "instruction": item["instruction"],
                "actions": np.zeros((self.max_pair_actions, 7), np.float32), "has_actions": np.bool_(False),
                "num_actions": np.int32(0)}


# ------------------------------------------------------------------------------------------------ batching
def collate(samples: list[dict]) -> dict:
    """Stack numeric leaves; strings become numpy object arrays."""
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], (str, bytes)):
            out[k] = np.array(vals, dtype=object)
        else:
            out[k] = np.stack([np.asarray(v) for v in vals])
    return out


class Loader:
    """Host-local batch iterator with exact checkpointable state (wraps a grain DatasetIterator)."""

    def __init__(self, dataset, sources, weights: dict[str, float], batch_size: int, samplers=(), workers: int = 0):
        self._dataset = dataset
        self._workers = int(workers)
        self._samplers = list(samplers)
        self._it = iter(dataset)
        self._skips = np.zeros(len(sources), np.int64)
        self.sources = sources
        self.weights = weights
        self.batch_size = batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._skips += batch.pop("_skips").sum(0)
        return batch

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        """Restores a position saved by ``get_state``, also one saved with another ``data.num_workers``.

        grain's state differs with the worker count (worker w reads elements w, w + W, ... of the mixture), so a
        state from W workers is re-seeked for this run's count: the elements consumed so far, T = the sum of the
        workers' positions, are kept as consumed and every worker continues at element ceil(T / M) of its slice.
        The samples after the position are the same; their order within the next M-element window may differ and
        at most M - 1 samples are skipped. Logged as a warning.
        """
        self._it.set_state(_reseek(state, self._workers))

    def failures(self) -> dict[str, tuple[int, int, list[str]]]:
        """Per source: (failed, attempted, one line per cause naming files) in THIS process (workers log their
        own); ``skip_counts`` counts every process."""
        return {s.source.name: (s.failed, s.attempts, s.failures.lines()) for s in self._samplers}

    def skip_counts(self) -> dict[str, int]:
        """Per source name: samples skipped as unusable so far, in this process and its grain workers alike
        (cheap: for metrics every step). A skip is reported with the next sample its sampler builds, so the count
        may run up to a read-ahead window ahead of the batches returned."""
        return {name: int(n) for name, n in zip(self.sources, self._skips)}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _state_workers(state: Any) -> int:
    return len(state["iterators_in_use_states"]) if isinstance(state, dict) and "iterators_in_use_states" in state \
        else 0


def _reseek(state: Any, workers: int) -> Any:
    """A grain iterator state for ``workers`` worker processes from one saved with any worker count."""
    saved = _state_workers(state)
    if saved == workers:
        return state
    if saved:
        consumed = sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    elif isinstance(state, dict) and "next_index" in state:
        consumed = int(state["next_index"])
    else:
        raise ValueError(f"data iterator state {str(state)[:200]!r}: not a state this loader wrote; start the run "
                         f"in a fresh workdir or restore the model only")
    logging.warning("data: the checkpoint's iterator state was saved with %d grain worker(s), this run has %d "
                 "(config.data.num_workers): re-seeked to sample %d of the mixture order (same samples next, their "
                 "order within one %d-sample window may differ)", saved, workers, consumed, max(workers, 1))
    if workers == 0:
        return {"next_index": consumed}
    start = -(-consumed // workers)
    return {"next_index_in_cycle": 0, "next_index_in_datasets": workers,
            "iterators_in_use_indices": list(range(workers)),
            "iterators_in_use_states": [{"next_index": start} for _ in range(workers)],
            "exhausted": [0] * workers, "future_states": {}}


class EpochShuffle:
    """Global index -> item: a fresh seeded permutation of the n items per epoch (epoch = index // n).

    O(1) per element after an O(n) permutation once per epoch (grain's per-element index shuffle costs
    ~1 ms per element on a busy CPU, more than decoding a small frame)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()   # grain's prefetch threads call this concurrently

    def __getstate__(self):
        return {"n": self.n, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["n"], state["seed"])

    def __call__(self, index: int, _) -> int:
        epoch, pos = divmod(int(index), self.n)
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n).astype(np.int32)
                if len(self._cache) >= 2:   # prefetch threads may straddle an epoch boundary
                    del self._cache[min(self._cache)]
                self._cache[epoch] = perm
        return int(perm[pos])


def mix(sizes: list[int], samplers: list[Callable], weights: list[float], seed: int):
    """Per source: a new global shuffle of its items every epoch, repeated forever, sampled; then the sources
    are mixed with ``weights``. Returns a grain MapDataset of samples (None = skipped)."""
    import grain

    datasets = []
    for k, (n, sampler) in enumerate(zip(sizes, samplers)):
        datasets.append(grain.MapDataset.range(n)
                        .repeat()
                        .map_with_index(EpochShuffle(n, seed * 1_000_003 + k))
                        .random_map(sampler, seed=seed * 1_000_003 + 7919 + k))
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, list(weights))


def make_loader(spec: str, data_cfg, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                seed: int = 0, split: str = "train", transform: Callable | None = None) -> Loader:
    """See ``data_pipelines.__init__`` for the contract."""
    import grain

    if spec not in SPECS:
        raise ValueError(f"unknown data spec {spec!r}; one of {SPECS}")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    weights = mixtures.apply_human_video_fraction(mixtures.resolve(data_cfg.mixture),
                                                  data_cfg.get("human_video_fraction"))
    names = sorted(weights)
    known = oxe_table.known_datasets()
    max_pair = max(_pair_range(n, data_cfg)[1] for n in names)
    with_stats = spec == "policy_window" and bool(data_cfg.get("normalize_actions", True))
    sources, samplers = {}, []
    for k, name in enumerate(names):
        src = open_source(name, data_cfg, split, process_index, process_count, with_stats=with_stats)
        if len(src) == 0:
            raise ValueError(f"data: {name} has no {split} samples for process {process_index} at {src.path}")
        sources[name] = src
        samplers.append(Sampler(spec, src, data_cfg, max_pair_actions=max_pair, dataset_id=known.index(name),
                                transform=transform, process_index=process_index, process_count=process_count,
                                source_index=k, num_sources=len(names)))
    mixed = mix([len(s) for s in sources.values()], samplers, [weights[n] for n in names], seed)
    local_bs = global_batch_size // process_count
    ds = mixed.to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 4)),
                                                 prefetch_buffer_size=max(local_bs, 8)))
    ds = ds.batch(local_bs, drop_remainder=True, batch_fn=collate)
    workers = int(data_cfg.get("num_workers", 0))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain script has not parsed any
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=int(data_cfg.get("prefetch", 2))))
    return Loader(ds, sources, weights, local_bs, samplers, workers=workers)


def check_sources(data_cfg, spec: str, key: str = "config.data") -> None:
    """Open both splits of every dataset of the mixture as ``make_loader`` would (index and annotation files only,
    nothing decoded) and raise one FileNotFoundError listing every problem: a missing data folder, a dataset not
    there or not converted, an empty split, a spec the dataset cannot serve. Call it before the first step."""
    if spec not in SPECS:
        raise ValueError(f"unknown data spec {spec!r}; one of {SPECS}")
    weights = mixtures.apply_human_video_fraction(mixtures.resolve(data_cfg.mixture, key=f"{key}.mixture"),
                                                  data_cfg.get("human_video_fraction"))
    problems: list[str] = []

    def missing(p: str) -> bool:
        return not str(p).startswith("gs://") and not os.path.exists(p)

    root = data_cfg.get("data_dir") or ""
    paths = dict(data_cfg.get("paths") or {})
    if root and missing(root):
        problems.append(f"{key}.data_dir={root!r} does not exist")
    for name, p in sorted(paths.items()):
        if p and missing(p):
            problems.append(f"{key}.paths.{name}={p!r} does not exist")
    with_stats = spec == "policy_window" and bool(data_cfg.get("normalize_actions", True))
    for name in sorted(weights):
        found: dict[str, list[str]] = {}        # problem -> splits (one line when both splits share it)
        for split in ("train", "eval"):
            try:
                src = open_source(name, data_cfg, split, with_stats=with_stats)
                if len(src) == 0:
                    raise ValueError(f"no {split} samples at {src.path}")
                Sampler(spec, src, data_cfg, max_pair_actions=1, dataset_id=0)   # spec vs dataset checks
            except (OSError, ValueError, KeyError) as e:
                found.setdefault(str(e).removeprefix("data: "), []).append(split)
        problems += [f"{name} ({' + '.join(splits)}): {msg}" for msg, splits in found.items()]
    if problems:
        raise FileNotFoundError(
            f"{key}: {len(problems)} problem(s) with the data of mixture {sorted(weights)} (spec {spec}, both "
            f"splits checked):\n  - " + "\n  - ".join(problems))
