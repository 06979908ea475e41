"""Closed-loop Meta-World v3 evaluation of a chunking policy, with the scripted experts as a baseline.

    policy = DeFIPolicy.from_checkpoint("workdirs/demo/policy")        # or load_exported(...), or a stand-in
    summary = evaluate(policy, Protocol(tasks=("reach-v3", "push-v3"), episodes=50), "/tmp/eval")

Environments live in ``workers`` spawned processes (MuJoCo's EGL renderer and TensorFlow cannot share a
process; spawn also keeps JAX's threads out of the children). The policy runs in this process: every round, one
``act_batch`` call takes the observations of all live episodes (padded to ``workers`` rows, so a compiled policy
sees one batch size), and each worker executes the first ``steps_per_chunk`` actions of its chunk before asking
again. An episode ends at the first step whose ``info["success"]`` is true (a success) or after ``horizon`` env
steps (a failure).

What the policy sees is what it trained on (``data_pipelines/demo.py``): the same cameras (``primary`` =
"corner", ``wrist`` = "gripperPOV"), rendered offscreen at the demo data's size with shadows, reflections and
multisampling off, rotated by 180 degrees; the instruction of the demo data for each task. Each observation
also carries ``"state"`` (Meta-World's 39-D observation vector), which DeFI policies ignore and stand-ins may use.

Actions: the policy's 7-D rows follow the demo dataset (``data_pipelines/oxe_table.py``, row "demo"): xyz
delta, three rotation zeros, gripper with 1 = open. Meta-World's env action is 4-D: xyz delta and a gripper
effort with +1 = close, so effort = 1 - 2 * gripper (the inverse of the dataset's (1 - effort) / 2); all four
are clipped to [-1, 1] and the rotation dims are dropped (:func:`to_env_action`).

Seeds: the 50 goals of a task are Meta-World's own (``MT1(task, seed=seed)``). Episode e of task t has the seed
``SeedSequence((seed, crc32(t), e))`` (:func:`episode_seed`), which seeds the env, and plays goal
``permutation_{seed, t}[e % 50]`` (:func:`goal_index`): the first 50 episodes of a task visit each goal once,
and a task's episodes do not depend on which other tasks run. The scripted expert (``metaworld.policies``) runs
on the same seeds and goals in the same workers, acting every step (it generated the demo data), so
``expert_success`` says how solvable each task is under this protocol. Two runs with the same protocol and
policy give the same episodes. The policy's noise is seeded per episode: a policy whose ``act_batch`` takes
``seeds`` (every defi-jax backend) gets, for each row, ``SeedSequence((episode seed, replanning step))``
(:func:`noise_seed`), so an episode plays the same whatever other tasks run and whatever the worker count (up to
float rounding of a different batch size); a policy without ``seeds`` draws its own noise, which can depend on
the batch a row shares (the summary's ``protocol.policy_noise`` says which).

The GFDM's predicted future (``Protocol.predict_future``, on by default; the policy needs
``act_and_predict_batch``, which the JAX ``DeFIPolicy`` has and the exported / PyTorch backends have not: the
summary then says so). At every replanning step the call that computes the actions also returns the VAE-decoded
one-step prediction of the video view, from the same single denoising step whose features the policy read;
frame k shows ``k * future_stride`` env steps ahead. The workers keep the video view at every step and

- put the prediction beside the real frames in the GIFs. Layout: each GIF frame is two panels side by side,
  [real | predicted], each ``resolution`` wide: on the left the real frame at env step t; on the right the
  latest prediction (made at replanning step r <= t) showing its frame (t - r) // future_stride (frame 0 is
  the GFDM's rendering of the observed frame), enlarged (nearest) from the policy's resolution; once t runs
  past the predicted frames, the last one is held at half brightness (:data:`VIDEO_LAYOUT`).
- score it against what really followed (PSNR at the policy's resolution, ``attribution.step_scores``): each
  episode record carries ``prediction_score`` and ``prediction_steps``, and the failed episodes are split
  into forward-dynamics failures (the prediction was bad) and inverse-dynamics failures (it was good, the actions
  failed) by ``defi_jax/evaluation/attribution.py``'s rule: below the ``attribution_percentile``-th (10th)
  percentile of the task's successful episodes' scores -> forward dynamics. The paper's reference point is its
  hand-labelled split of 200 CALVIN failures: 62% forward / 38% inverse dynamics.

Outputs under ``out``: ``summary.json`` (protocol, per-task success with a 95% Wilson interval, the means, every
episode, throughput, ``attribution``), ``summary.csv`` (one row per task plus ``mean``, protocol columns on every
row), ``attribution.csv`` (per task and ``all``: failures, forward / inverse dynamics counts and fractions, the
threshold; only when the prediction was available, also printed) and ``videos/<task>/ep<e>_<success|failure>.gif``
(the video view, one frame per env step, with the prediction beside it when available; a rerun replaces the
GIFs of its tasks). Every file is written atomically. Progress: one line per finished episode.

DAgger (``evaluate(..., relabel_out=DIR)``): the workers also keep, at every state the policy visits, the demo
data's two cameras, Meta-World's state and the scripted expert's action there; each episode becomes
``DIR/<task>/ep<e>.npz`` (:func:`write_relabelled`) and ``DIR/relabelled.json`` lists them, written last.
``launch.make_demo_data --relabelled DIR`` (:func:`read_relabelled`) adds them to the demo's robot dataset.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from defi_jax import paths
from defi_jax.evaluation import attribution

# Imported lazily in the workers only: mujoco, gymnasium, metaworld (the parent holds JAX and maybe TensorFlow).

CAMERAS = {"primary": "corner", "wrist": "gripperPOV"}    # data_pipelines/demo.py: image / wrist_image
FLIP = "rotated 180 degrees (rows and columns reversed), as the demo data"
NUM_GOALS = 50                                           # Meta-World's goals per task (metaworld._N_GOALS)
Z95 = 1.959963984540054
# DAgger relabelling (evaluate(relabel_out=...)): what each visited state keeps, in the demo data's format
# (data_pipelines/demo.py: "image" = corner camera, "wrist_image" = gripper camera, the 4-D env action).
RELABEL_CAMERAS = {"image": CAMERAS["primary"], "wrist_image": CAMERAS["wrist"]}
RELABEL_KEYS = ("image", "wrist_image", "state", "action", "policy_action")
VIDEO_LAYOUT = ("two panels per env step t: left, the real frame of the video view; right, the GFDM's one-step "
                "prediction made at the latest replanning step r <= t: its frame (t - r) // future_stride (frame 0: "
                "the GFDM's rendering of the observed frame), enlarged (nearest) from the policy's resolution; past "
                "the last predicted frame, that frame held at half brightness")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that defines the numbers an evaluation reports; recorded in ``summary.json``."""

    tasks: tuple[str, ...]
    episodes: int = 50                  # per task (Meta-World's protocol: 50)
    horizon: int = 200                  # env steps per episode
    steps_per_chunk: int = 10           # actions of each chunk executed before the policy is asked again
    seed: int = 0
    resolution: int = 128               # render size; the demo data's (launch.make_demo_data --size)
    cameras: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(CAMERAS))
    workers: int = 4
    expert: bool = True                 # also run the scripted expert on the same seeds
    videos_per_task: int | None = None  # GIFs of the first N episodes of each task (None: all, 0: none)
    video_view: str = "primary"
    gif_frame_ms: int = 40              # GIF frame duration (one frame per env step; 80 Hz control)
    # The GFDM's one-step predicted future of the video view beside the real frames in the GIFs, scored against
    # what followed for failure attribution; where the policy can (``act_and_predict_batch``: the JAX policy),
    # else recorded as unavailable.
    predict_future: bool = True
    future_stride: int = 1              # env steps between the GFDM's predicted frames (its data.frame_stride)
    attribution_percentile: float = 10.0   # attribution.py's rule: failures below this percentile of successes

    def check(self, policy=None):
        """Raises ValueError naming the field (or the policy's view) that cannot work."""
        if not self.tasks:
            raise ValueError("tasks: empty")
        known = task_tables()["all"]
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"tasks: unknown Meta-World v3 task(s) {unknown}; e.g. {known[:6]}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: duplicates in {list(self.tasks)}")
        for name in ("episodes", "horizon", "steps_per_chunk", "resolution", "workers", "gif_frame_ms",
                     "future_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.attribution_percentile <= 100.0:
            raise ValueError(f"attribution_percentile: must be in [0, 100], got {self.attribution_percentile}")
        if self.video_view not in self.cameras:
            raise ValueError(f"video_view: {self.video_view!r} is not one of cameras {sorted(self.cameras)}")
        if policy is not None:
            missing = [v for v in policy.views if v not in self.cameras]
            if missing:
                raise ValueError(f"the policy reads view(s) {missing} that have no Meta-World camera; cameras maps "
                                 f"{dict(self.cameras)}")


def _tables() -> dict[str, list[str]]:
    from metaworld import env_dict
    return {"all": sorted(env_dict.ALL_V3_ENVIRONMENTS), "mt10": list(env_dict.MT10_V3),
            "mt50": list(env_dict.MT50_V3)}


@functools.cache
def task_tables() -> dict[str, list[str]]:
    """Meta-World's task names: ``all`` (v3), ``mt10``, ``mt50``; read in a spawned process, since importing
    ``metaworld`` loads MuJoCo (and its EGL bindings), which must stay out of the process holding the policy."""
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_tables).result()
        except ImportError as e:
            raise ImportError(f"Meta-World is not importable ({e}): pip install -e '.[sim]'") from None


def task_list(spec: str) -> tuple[str, ...]:
    """``mt10`` | ``mt50`` | ``demo`` (the robot tasks of the demo data) | a comma-separated list of tasks."""
    key = spec.strip().lower()
    if key in ("mt10", "mt50"):
        return tuple(task_tables()[key])
    if key == "demo":
        from data_pipelines import demo
        return tuple(demo.ROBOT_TASKS)
    return tuple(t.strip() for t in spec.split(",") if t.strip())


# ---- protocol pieces -----------------------------------------------------------------------------

def episode_seed(seed: int, task: str, episode: int) -> int:
    """The 32-bit seed of episode ``episode`` of ``task``: the same whatever other tasks run."""
    return int(np.random.SeedSequence((seed, zlib.crc32(task.encode()), episode)).generate_state(1)[0])


def goal_index(seed: int, task: str, episode: int) -> int:
    """Which of the task's 50 Meta-World goals episode ``episode`` plays (each once per 50 episodes)."""
    order = np.random.default_rng(np.random.SeedSequence((seed, zlib.crc32(task.encode())))).permutation(NUM_GOALS)
    return int(order[episode % NUM_GOALS])


def noise_seed(episode_seed: int, chunk: int) -> int:
    """The policy's noise seed for the ``chunk``-th replanning step of the episode seeded ``episode_seed``."""
    return int(np.random.SeedSequence((episode_seed, chunk)).generate_state(1)[0])


def _takes_seeds(fn) -> bool:
    """Whether a policy method accepts per-row noise ``seeds``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seeds" or p.kind is p.VAR_KEYWORD for p in params)


def to_env_action(actions_K7: np.ndarray) -> np.ndarray:
    """Policy rows [K, 7] (xyz delta, 3 rotations, gripper 1 = open) -> Meta-World actions [K, 4] (xyz delta,
    gripper effort +1 = close), clipped to [-1, 1]; the rotation dims are dropped."""
    a = np.asarray(actions_K7, np.float32)
    if a.ndim != 2 or a.shape[1] != 7:
        raise ValueError(f"policy actions: expected [chunk, 7] (xyz, rotation, gripper), got {list(a.shape)}")
    effort = 1.0 - 2.0 * a[:, 6:7]
    return np.clip(np.concatenate([a[:, :3], effort], 1), -1.0, 1.0).astype(np.float32)


def from_env_action(actions_K4: np.ndarray) -> np.ndarray:
    """Meta-World actions [K, 4] -> the demo dataset's 7-D rows (the inverse of :func:`to_env_action` inside
    [-1, 1]): what ``data_pipelines.rlds`` makes of the demo data's raw actions."""
    a = np.clip(np.asarray(actions_K4, np.float32), -1.0, 1.0)
    zeros = np.zeros((len(a), 3), np.float32)
    return np.concatenate([a[:, :3], zeros, (1.0 - a[:, 3:4]) / 2.0], 1)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a binomial test of ``only_a`` of
    ``only_a + only_b`` at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def discordant(a: Mapping, b: Mapping) -> tuple[int, int, int]:
    """(pairs, only a succeeded, only b succeeded) over the keys two ``{episode key: success}`` maps share."""
    keys = a.keys() & b.keys()
    return len(keys), sum(a[k] and not b[k] for k in keys), sum(b[k] and not a[k] for k in keys)


COMPARE_KEYS = ("horizon", "steps_per_chunk", "seed", "resolution", "cameras", "flip")


def compare(a: Mapping, b: Mapping) -> dict:
    """Two evaluation summaries, episode by episode: per shared task and ``all``, the episodes both played, each
    one's successes, the episodes only one solved and the exact McNemar p-value. Episode e of a task has the same
    env seed and goal in both; with per-row policy noise (``protocol.policy_noise``) the same noise too, whatever
    the task lists and worker counts (``shared_noise``; without it the task list, episode count and workers must
    match). Raises ValueError naming the protocol keys that differ."""
    shared_noise, tasks, a_o, b_o = _paired(a, b)
    return {"shared_noise": shared_noise, "tasks": _paired_rows(tasks, a_o, b_o)}


def compare_pooled(pairs: Sequence[tuple[Mapping, Mapping]]) -> dict:
    """Several (a, b) pairs of evaluation summaries (e.g. two variants, one pair per fine-tuning seed), each paired
    as :func:`compare` (``pairs``: its rows), pooled: the ``tasks`` rows count every pair's shared episodes, a
    discordant episode of any pair counting once. Raises ValueError naming the pair (1-based) that cannot be
    paired."""
    if not pairs:
        raise ValueError("no pair of evaluations to compare")
    tasks, a_all, b_all, noise, per_pair = [], {}, {}, True, []
    for i, (a, b) in enumerate(pairs):
        try:
            shared_noise, pair_tasks, a_o, b_o = _paired(a, b)
            per_pair.append(_paired_rows(pair_tasks, a_o, b_o))
        except ValueError as e:
            raise ValueError(f"pair {i + 1}: {e}") from e
        noise = noise and shared_noise
        tasks += [t for t in pair_tasks if t not in tasks]
        a_all |= {(i, *k): v for k, v in a_o.items()}
        b_all |= {(i, *k): v for k, v in b_o.items()}
    return {"shared_noise": noise, "pairs": per_pair, "tasks": _paired_rows(tasks, a_all, b_all)}


def _paired(a: Mapping, b: Mapping) -> tuple[bool, list[str], dict, dict]:
    """(shared noise, the shared tasks, each summary's {(task, episode): success} on them)."""
    pa, pb = a["protocol"], b["protocol"]
    shared_noise = all(str(p.get("policy_noise", "")).startswith("per row") for p in (pa, pb))
    keys = COMPARE_KEYS if shared_noise else (*COMPARE_KEYS, "tasks", "episodes_per_task", "workers")
    differ = [f"{k} ({pa.get(k)!r} vs {pb.get(k)!r})" for k in keys if pa.get(k) != pb.get(k)]
    if differ:
        raise ValueError("the two evaluations ran different protocols: " + "; ".join(differ)
                         + ("" if shared_noise else " (without per-row policy noise the batches decide the draws)"))
    tasks = [t for t in pa["tasks"] if t in pb["tasks"]]
    if not tasks:
        raise ValueError(f"the two evaluations share no task ({pa['tasks']} vs {pb['tasks']})")
    a_o, b_o = ({(e["task"], int(e["episode"])): bool(e["success"]) for e in s.get("episodes", ()) if e["task"] in tasks}
                for s in (a, b))
    return shared_noise, tasks, a_o, b_o


def _paired_rows(tasks: Sequence[str], a_o: Mapping, b_o: Mapping) -> dict:
    """Per task and ``all``: episodes both played, successes, discordant episodes, McNemar p (keys end in
    (task, episode))."""
    rows = {}
    for task in [*tasks, "all"]:
        a_t, b_t = ({k: v for k, v in o.items() if task in ("all", k[-2])} for o in (a_o, b_o))
        shared = a_t.keys() & b_t.keys()
        n, only_a, only_b = discordant(a_t, b_t)
        rows[task] = {"episodes": n, "a_successes": sum(a_t[k] for k in shared),
                      "b_successes": sum(b_t[k] for k in shared), "only_a": only_a, "only_b": only_b,
                      "mcnemar_p": mcnemar_exact(only_a, only_b)}
    if not rows["all"]["episodes"]:
        raise ValueError("the two evaluations share no episode (summary.json 'episodes' missing or disjoint)")
    return rows


# ---- the worker process --------------------------------------------------------------------------

class _Episode:
    """One episode inside a worker: the env steps, the frames for the GIF, the success."""

    def __init__(self, job: dict):
        self.job = job
        self.t = 0
        self.success_step = None
        self.frames: list[np.ndarray] = []   # the video view before each step, then the last state
        self.shown = None                    # the video view the policy was last shown (reused as a frame)
        self.futures: list[tuple[int, np.ndarray]] = []   # (env step, the GFDM's predicted frames [T, r, r, 3])
        # DAgger relabelling (job["relabel"]): per visited state, the demo data's two views, Meta-World's state,
        # the scripted expert's action there and the action the policy took
        self.relabel = {k: [] for k in RELABEL_KEYS} if job.get("relabel") else None

    @property
    def recording(self) -> bool:
        """Whether the video view is kept at every step: for the GIF or to score the predicted futures."""
        return bool(self.job.get("video")) or bool(self.futures)

    @property
    def over(self) -> bool:
        return self.success_step is not None or self.t >= self.job["horizon"]


class _Sim:
    """One task inside a worker: its env with Meta-World's 50 goals, its scripted expert, a renderer."""

    def __init__(self, task: str, seed: int, resolution: int):
        import gymnasium as gym
        import metaworld  # noqa: F401 - registers the Meta-World gymnasium envs
        from metaworld.policies import ENV_POLICY_MAP

        self.wrapped = gym.make("Meta-World/MT1", env_name=task, seed=seed)
        self.env = self.wrapped.unwrapped     # stepped directly: the wrappers would draw a random goal on reset
        self.goals = self.wrapped.get_wrapper_attr("tasks")
        if len(self.goals) != NUM_GOALS:
            raise RuntimeError(f"{task}: Meta-World made {len(self.goals)} goals, expected {NUM_GOALS}")
        self.expert = ENV_POLICY_MAP[task]()
        self.resolution = resolution
        self._render = None
        self.obs = None

    def reset(self, job: dict) -> np.ndarray:
        self.env.seed(job["seed"])
        self.env.set_task(self.goals[job["goal"]])
        self.env.max_path_length = max(self.env.max_path_length, job["horizon"])
        self.obs, _ = self.env.reset()
        return self.obs

    def step(self, action_4: np.ndarray) -> bool:
        """One env step; whether Meta-World reports success."""
        self.obs, _, _, _, info = self.env.step(action_4)
        return bool(info.get("success"))

    def start_rendering(self):
        if self._render is None:
            from data_pipelines import demo  # the demo data's renderer: same flip, no shadows / reflections
            self._render = demo._Renderer(self.wrapped, self.resolution)

    def render(self, camera: str) -> np.ndarray:
        return self._render(camera)

    def close(self):
        if self._render is not None:
            self._render.close()
        self.wrapped.close()


_SIMS_PER_WORKER = 2   # jobs come task by task (experts, then the policy): two envs avoid most rebuilds


def _worker(conn, resolution: int, cameras: dict, video_view: str, gif_frame_ms: int, seed: int,
            future_stride: int):
    """Serves one pipe: ("expert", job) -> ("expert", record); ("reset", job) -> ("obs", obs);
    ("step", actions [K, 4], predicted future [T, r, r, 3] or None) -> ("obs", obs) or ("done", record);
    ("stats",) -> ("stats", dict); ("close",). Errors go back as ("error", traceback)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import warnings
    warnings.filterwarnings("ignore")   # gymnasium's env checker warns about Meta-World's spaces on every reset

    sims: collections.OrderedDict[str, _Sim] = collections.OrderedDict()
    stats = collections.Counter()
    episode: _Episode | None = None
    sim: _Sim | None = None

    def sim_for(task: str, rendering: bool) -> _Sim:
        t0 = time.perf_counter()
        if task not in sims:
            if len(sims) == _SIMS_PER_WORKER:
                sims.popitem(last=False)[1].close()
            sims[task] = _Sim(task, seed, resolution)
        sims.move_to_end(task)
        if rendering:
            sims[task].start_rendering()
        stats["setup_s"] += time.perf_counter() - t0   # kept out of the steps/s figures
        return sims[task]

    def observe(ep: _Episode) -> dict:
        out = {v: sim.render(cameras[v]) for v in ep.job["views"]}
        out["state"] = np.array(sim.obs, np.float64)   # what the scripted expert reads
        ep.shown = out.get(video_view)
        return out

    def finish(ep: _Episode) -> dict:
        rec = {k: ep.job[k] for k in ("task", "episode", "seed", "goal")}
        rec.update(success=ep.success_step is not None, success_step=ep.success_step, steps=ep.t, video=None)
        if ep.recording:
            ep.frames.append(sim.render(cameras[video_view]))   # the state the last action led to
        if ep.relabel is not None:
            rec["relabel"] = {k: np.stack(v) for k, v in ep.relabel.items()}   # >= 1 step per episode
        if ep.futures:
            from defi_jax.inference import resize_image
            t0 = time.perf_counter()
            size = ep.futures[0][1].shape[1]                    # the policy's resolution
            real = [resize_image(f, size, video_view) for f in ep.frames]
            steps = attribution.step_scores(real, ep.futures, future_stride)
            rec.update(prediction_score=attribution.episode_score(steps), prediction_steps=steps)
            stats["score_s"] += time.perf_counter() - t0
        if ep.job.get("video"):
            from PIL import Image
            t0 = time.perf_counter()
            frames = _beside_predictions(ep.frames, ep.futures, future_stride) if ep.futures else ep.frames
            path = ep.job["video"] + ("_success.gif" if rec["success"] else "_failure.gif")
            images = [Image.fromarray(f) for f in frames]
            gif = io.BytesIO()
            images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=gif_frame_ms,
                           loop=0)
            paths.write_bytes(path, gif.getvalue())
            stats["video_s"] += time.perf_counter() - t0
            rec["video"] = path
        return rec

    while True:
        msg = conn.recv()
        cmd = msg[0]
        try:
            if cmd == "close":
                break
            if cmd == "stats":
                conn.send(("stats", dict(stats)))
                continue
            t0, setup0 = time.perf_counter(), stats["setup_s"]

            def busy() -> float:
                return time.perf_counter() - t0 - (stats["setup_s"] - setup0)

            if cmd == "expert":
                ep = _Episode(msg[1])
                sim = sim_for(ep.job["task"], rendering=False)
                obs = sim.reset(ep.job)
                while not ep.over:
                    if sim.step(np.clip(sim.expert.get_action(obs), -1, 1).astype(np.float32)):
                        ep.success_step = ep.t
                    ep.t += 1
                    obs = sim.obs
                stats["expert_steps"] += ep.t
                stats["expert_s"] += busy()
                conn.send(("expert", finish(ep)))
            elif cmd == "reset":
                episode = _Episode(msg[1])
                sim = sim_for(episode.job["task"], rendering=True)
                sim.reset(episode.job)
                reply = ("obs", observe(episode))
                stats["env_s"] += busy()
                conn.send(reply)
            elif cmd == "step":
                ep = episode
                if msg[2] is not None:
                    ep.futures.append((ep.t, msg[2]))
                for k, a in enumerate(msg[1]):
                    if ep.recording:          # at k = 0 the policy was just shown this view: no second render
                        ep.frames.append(ep.shown if k == 0 and ep.shown is not None else
                                         sim.render(cameras[video_view]))
                    if ep.relabel is not None:
                        r = ep.relabel
                        r["image"].append(sim.render(RELABEL_CAMERAS["image"]))
                        r["wrist_image"].append(sim.render(RELABEL_CAMERAS["wrist_image"]))
                        r["state"].append(np.asarray(sim.obs, np.float32))
                        r["action"].append(np.clip(sim.expert.get_action(sim.obs), -1, 1).astype(np.float32))
                        r["policy_action"].append(np.asarray(a, np.float32))
                    if sim.step(a):
                        ep.success_step = ep.t
                    ep.t += 1
                    stats["env_steps"] += 1
                    if ep.over:
                        break
                if ep.over:
                    stats["env_s"] += busy()
                    episode = None
                    conn.send(("done", finish(ep)))
                else:
                    reply = ("obs", observe(ep))
                    stats["env_s"] += busy()
                    conn.send(reply)
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception:  # noqa: BLE001 - reported to the parent, which raises with the job named
            conn.send(("error", traceback.format_exc()))
    for s in sims.values():
        s.close()


def _beside_predictions(frames: Sequence[np.ndarray], futures: Sequence[tuple[int, np.ndarray]],
                        stride: int) -> list[np.ndarray]:
    """The GIF with predictions: frame t = [real frame t | what the latest prediction (made at step r <= t) shows
    for t: its frame (t - r) // stride, enlarged (nearest) to the real frame's size; past its last predicted
    frame, that frame held at half brightness]."""
    from PIL import Image

    out, latest, cache = [], -1, {}
    for t, real in enumerate(frames):
        while latest + 1 < len(futures) and futures[latest + 1][0] <= t:
            latest += 1
        r, pred_THW3 = futures[latest]
        k = (t - r) // stride
        key = (latest, min(k, len(pred_THW3)))
        if key not in cache:
            shown = pred_THW3[k] if k < len(pred_THW3) else pred_THW3[-1] // 2
            cache[key] = np.asarray(Image.fromarray(shown).resize(real.shape[1::-1], Image.NEAREST))
        out.append(np.concatenate([real, cache[key]], axis=1))
    return out


class _Workers:
    """``n`` spawned env workers, each behind a pipe; closed on exit (joined, terminated if stuck)."""

    def __init__(self, n: int, protocol: Protocol):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs, self.jobs = [], [], [None] * n
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, name=f"metaworld-worker-{i}", daemon=True,
                            args=(child, protocol.resolution, dict(protocol.cameras), protocol.video_view,
                                  protocol.gif_frame_ms, protocol.seed, protocol.future_stride))
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def send(self, i: int, msg: tuple):
        if msg[0] in ("expert", "reset"):
            self.jobs[i] = msg[1]
        self.conns[i].send(msg)

    def recv(self, i: int):
        try:
            kind, payload = self.conns[i].recv()
        except EOFError:
            raise RuntimeError(f"Meta-World worker {i} died (exit code {self.procs[i].exitcode}) during "
                               f"{_describe(self.jobs[i])}") from None
        if kind == "error":
            raise RuntimeError(f"Meta-World worker {i} failed during {_describe(self.jobs[i])}:\n{payload}")
        return kind, payload

    def ready(self, busy: Sequence[int]) -> list[int]:
        from multiprocessing import connection
        ready = connection.wait([self.conns[i] for i in busy])
        return sorted(i for i in busy if self.conns[i] in ready)

    def stats(self) -> list[dict]:
        for i in range(len(self.conns)):
            self.conns[i].send(("stats",))
        return [self.recv(i)[1] for i in range(len(self.conns))]

    def close(self):
        for c in self.conns:
            try:
                c.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self.conns:
            c.close()


def _describe(job: dict | None) -> str:
    if job is None:
        return "startup"
    return f"{job['task']} episode {job['episode']} (seed {job['seed']}, goal {job['goal']})"


# ---- the evaluation ------------------------------------------------------------------------------

def evaluate(policy, protocol: Protocol, out: str, *, policy_info: Mapping | None = None,
             progress: Callable[[str], None] | None = print, relabel_out: str | None = None) -> dict:
    """Runs ``protocol`` with ``policy`` (``views``, ``resolution``, ``act_batch(observations, instructions)
    -> [B, chunk, 7]``), writes ``out``/summary.json, summary.csv and the GIFs; returns the summary.

    ``policy_info`` (e.g. the checkpoint path and step) is recorded in the summary. ``progress`` gets one line
    per finished episode (None: quiet). A ``gs://`` ``out`` is written in a local staging folder and uploaded at
    the end (the evaluated tasks' old videos there replaced, ``summary.json`` last).

    ``relabel_out`` (DAgger): also keeps every policy episode with the scripted expert's action at each state
    the policy visited (:func:`write_relabelled`), for ``launch.make_demo_data --relabelled``."""
    from data_pipelines import demo

    protocol.check(policy)
    if paths.is_remote(out):
        import tempfile
        with tempfile.TemporaryDirectory(prefix="defi_jax_eval_") as staging:
            summary = evaluate(policy, protocol, staging, policy_info=policy_info, progress=progress,
                               relabel_out=relabel_out)
            for task in protocol.tasks:
                paths.rmtree(paths.join(out, "videos", task), missing_ok=True)
            paths.upload_tree(staging, out, last=("summary.json",))
        return summary
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    say = progress or (lambda _: None)
    views = tuple(policy.views)
    instructions = {t: demo.instruction(t) for t in protocol.tasks}
    jobs, expert_jobs = [], []
    for task in protocol.tasks:
        for e in range(protocol.episodes):
            job = {"task": task, "episode": e, "seed": episode_seed(protocol.seed, task, e),
                   "goal": goal_index(protocol.seed, task, e), "horizon": protocol.horizon, "views": views}
            expert_jobs.append(dict(job, video=None))
            n_videos = protocol.episodes if protocol.videos_per_task is None else protocol.videos_per_task
            job["video"] = os.path.join(out, "videos", task, f"ep{e:03d}") if e < n_videos else None
            job["relabel"] = relabel_out is not None
            jobs.append(job)
    total = len(jobs) + (len(expert_jobs) if protocol.expert else 0)
    n_workers = min(protocol.workers, len(jobs))
    say(f"metaworld: {len(protocol.tasks)} task(s) x {protocol.episodes} episode(s), horizon {protocol.horizon}, "
        f"{protocol.steps_per_chunk} step(s) per chunk, {n_workers} worker(s)"
        + (", with the scripted expert on the same seeds" if protocol.expert else ""))

    for task in protocol.tasks:     # a rerun into the same folder replaces its tasks' GIFs (names carry outcomes)
        shutil.rmtree(os.path.join(out, "videos", task), ignore_errors=True)
    if relabel_out is not None:     # an earlier run's index must not describe the episodes this run rewrites
        paths.remove(paths.join(relabel_out, RELABEL_INDEX), missing_ok=True)

    workers = _Workers(n_workers, protocol)
    finished = itertools.count(1)

    def report(kind: str, rec: dict):
        result = (f"success at step {rec['success_step']}" if rec["success"] else f"failure ({rec['steps']} steps)")
        say(f"[{next(finished)}/{total}] {kind:6s} {rec['task']} ep {rec['episode']} (seed {rec['seed']}, goal "
            f"{rec['goal']}): {result}")

    t_start = time.perf_counter()
    try:
        expert_records, expert_s = [], 0.0
        if protocol.expert:
            t0 = time.perf_counter()
            expert_records = _run_expert(workers, expert_jobs, report)
            expert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = None
        if relabel_out is not None:
            def keep(rec: dict) -> dict:
                arrays = rec.pop("relabel")
                rec["relabelled"] = write_relabelled(relabel_out, rec, arrays, instructions[rec["task"]])
                return rec
        records, calls = _run_policy(workers, jobs, policy, instructions, protocol, report, keep)
        policy_phase_s = time.perf_counter() - t0
        worker_stats = workers.stats()
    finally:
        workers.close()
    for rec in records:
        if rec["video"]:
            rec["video"] = os.path.relpath(rec["video"], out)

    summary = _summary(protocol, policy, policy_info, instructions, records, expert_records, calls, n_workers)
    if relabel_out is not None:
        summary["relabelled"] = _write_relabel_index(relabel_out, protocol, summary, records)
        say(f"metaworld: {len(records)} relabelled episode(s) in {relabel_out} (launch.make_demo_data "
            f"--relabelled={relabel_out})")
    summary["throughput"] = _throughput(worker_stats, calls, policy_phase_s, expert_s,
                                        time.perf_counter() - t_start)
    paths.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    _write_csv(os.path.join(out, "summary.csv"), summary)
    table = os.path.join(out, "attribution.csv")
    if summary["attribution"]["available"]:
        _write_attribution_csv(table, summary["attribution"])
        say("metaworld: failure attribution (" + summary["attribution"]["rule"] + ")\n"
            + attribution.format_table(summary["attribution"]))
    else:
        paths.remove(table, missing_ok=True)      # never leave an earlier run's table beside this summary
        say(f"metaworld: no failure attribution: {summary['attribution']['reason']}")
    say(f"metaworld: mean success {summary['mean_success']:.3f}"
        + (f" (scripted expert {summary['mean_expert_success']:.3f})" if protocol.expert else "")
        + f"; {summary['throughput']['env_steps_per_s_per_worker']:.1f} env steps/s per worker")
    return summary


def _run_expert(workers: _Workers, jobs: list[dict], report) -> list[dict]:
    """The scripted expert's episodes, dealt to whichever worker is free (each episode depends only on its job)."""
    queue, busy, records = collections.deque(jobs), [], []
    for i in range(len(workers.conns)):
        if queue:
            workers.send(i, ("expert", queue.popleft()))
            busy.append(i)
    while busy:
        for i in workers.ready(busy):
            _, rec = workers.recv(i)
            records.append(rec)
            report("expert", rec)
            busy.remove(i)
            if queue:
                workers.send(i, ("expert", queue.popleft()))
                busy.append(i)
    return sorted(records, key=lambda r: (r["task"], r["episode"]))


def _run_policy(workers: _Workers, jobs: list[dict], policy, instructions: Mapping[str, str],
                protocol: Protocol, report, keep: Callable[[dict], dict] | None = None) -> tuple[list[dict], dict]:
    """Lock-step rounds: every live episode gets its observation answered by one batched policy call.

    Jobs go to free workers in worker order, so the batches are the same on every run of a protocol. A policy
    whose ``act_batch`` takes ``seeds`` gets one per row, :func:`noise_seed` of the episode's seed and its
    replanning step, so an episode draws the same noise whatever else runs (other tasks, other worker counts)."""
    n = len(workers.conns)
    queue, records = collections.deque(jobs), []
    predicting = _prediction(policy, protocol)[0]
    seeded = _takes_seeds(policy.act_and_predict_batch if predicting else policy.act_batch)
    calls = {"calls": 0, "rows": 0, "seconds": 0.0, "first_call_s": None, "chunk_length": None, "future": None,
             "seeded": seeded}
    chunk = [0] * n                    # replanning steps of each worker's current episode
    pending = []
    for i in range(n):
        if queue:
            workers.send(i, ("reset", queue.popleft()))
            pending.append(i)
    while pending:
        observations: dict[int, dict] = {}
        while pending:                 # finished episodes are replaced before the round's policy call
            restarted = []
            for i in pending:
                kind, payload = workers.recv(i)
                if kind == "obs":
                    observations[i] = payload
                else:
                    records.append(keep(payload) if keep is not None else payload)
                    report("policy", payload)
                    if queue:
                        workers.send(i, ("reset", queue.popleft()))
                        chunk[i] = 0
                        restarted.append(i)
            pending = restarted
        if not observations:
            break
        live = sorted(observations)
        obs = [observations[i] for i in live]
        texts = [instructions[workers.jobs[i]["task"]] for i in live]
        pad = n - len(live)            # one batch size for the whole run: no recompilation at the tail
        seeds = [noise_seed(workers.jobs[i]["seed"], chunk[i]) for i in live]
        kw = {"seeds": seeds + [seeds[-1]] * pad} if seeded else {}
        t0 = time.perf_counter()
        if predicting:
            chunks, future = policy.act_and_predict_batch(obs + [obs[-1]] * pad, texts + [texts[-1]] * pad,
                                                          protocol.video_view, **kw)
            chunks, future = np.asarray(chunks), np.asarray(future)
            if future.dtype != np.uint8 or future.ndim != 5 or future.shape[0] != n or future.shape[-1] != 3:
                raise ValueError(f"policy.act_and_predict_batch: predicted future {future.dtype} "
                                 f"{list(future.shape)}, expected uint8 [{n}, frames, H, W, 3]")
            calls["future"] = list(future.shape[1:4])
        else:
            chunks, future = np.asarray(policy.act_batch(obs + [obs[-1]] * pad, texts + [texts[-1]] * pad, **kw)), None
        dt = time.perf_counter() - t0
        if chunks.ndim != 3 or chunks.shape[0] != n or chunks.shape[2] != 7:
            raise ValueError(f"policy.act_batch returned {list(chunks.shape)}, expected [{n}, chunk, 7] "
                             f"(xyz delta, rotation, gripper 1 = open)")
        if chunks.shape[1] < protocol.steps_per_chunk:
            raise ValueError(f"steps_per_chunk: {protocol.steps_per_chunk} exceeds the policy's chunk of "
                             f"{chunks.shape[1]} actions")
        calls["calls"] += 1
        calls["rows"] += len(live)
        calls["chunk_length"] = int(chunks.shape[1])
        if calls["first_call_s"] is None:
            calls["first_call_s"] = dt  # compilation included
        else:
            calls["seconds"] += dt
        for row, i in enumerate(live):
            chunk[i] += 1
            actions = to_env_action(chunks[row, :protocol.steps_per_chunk])
            workers.send(i, ("step", actions, None if future is None else future[row]))
        pending = live
    return sorted(records, key=lambda r: (r["task"], r["episode"])), calls


# ---- DAgger relabelling ----------------------------------------------------------------------------

RELABEL_INDEX = "relabelled.json"


def write_relabelled(folder: str, rec: Mapping, arrays: Mapping[str, np.ndarray], instruction: str) -> str:
    """One policy episode with the expert's labels -> ``folder/<task>/ep<episode>.npz`` (atomic); returns its
    path relative to ``folder``. Arrays over the T visited states: ``image`` / ``wrist_image`` uint8
    [T, r, r, 3] (the demo data's cameras, before each step), ``state`` float32 [T, 39] (Meta-World's
    observation), ``action`` float32 [T, 4] (the scripted expert's clipped action at that state: the label),
    ``policy_action`` float32 [T, 4] (what the policy executed); scalars ``task``, ``instruction``, ``episode``,
    ``seed``, ``goal``, ``success``."""
    name = f"{rec['task']}/ep{rec['episode']:03d}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(arrays[k]) for k in RELABEL_KEYS}, task=rec["task"],
                        instruction=instruction, episode=rec["episode"], seed=rec["seed"], goal=rec["goal"],
                        success=rec["success"])
    paths.write_bytes(paths.join(folder, name), buf.getvalue())
    return name


def _write_relabel_index(folder: str, protocol: Protocol, summary: Mapping, records: list[dict]) -> dict:
    """``folder/relabelled.json``, written last: what ``launch.make_demo_data --relabelled`` checks and reads."""
    index = {"format": 1, "resolution": protocol.resolution, "cameras": dict(RELABEL_CAMERAS),
             "labels": "metaworld.policies scripted expert, clip(get_action(state), -1, 1), at every state the "
                       "policy visited (the policy's own actions executed)",
             "policy": summary["policy"], "protocol": {k: summary["protocol"][k] for k in
                                                       ("tasks", "episodes_per_task", "horizon", "steps_per_chunk",
                                                        "seed", "policy_noise")},
             "episodes": {t: sorted(r["relabelled"] for r in records if r["task"] == t) for t in protocol.tasks},
             "steps": int(sum(r["steps"] for r in records)),
             "policy_success": {t: summary["tasks"][t]["successes"] for t in protocol.tasks}}
    paths.write_text(paths.join(folder, RELABEL_INDEX), json.dumps(index, indent=1))
    return {"folder": folder, "episodes": len(records), "steps": index["steps"]}


def relabelled_index(folder: str, size: int | None = None) -> dict:
    """``folder/relabelled.json``, checked: a finished ``--relabel_out`` folder of this format whose frames are
    ``size`` px (when given); otherwise FileNotFoundError / ValueError naming the file."""
    index_path = paths.join(folder, RELABEL_INDEX)
    if not paths.exists(index_path):
        raise FileNotFoundError(f"{index_path} is missing: not a finished launch.evaluate --relabel_out folder")
    index = json.loads(paths.read_text(index_path))
    if index.get("format") != 1:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, this version reads 1")
    if size is not None and index["resolution"] != size:
        raise ValueError(f"{index_path}: frames of {index['resolution']} px, the data needs {size} px (run "
                         f"launch.evaluate --resolution={size})")
    return index


def read_relabelled(folder: str, size: int | None = None):
    """Yields the relabelled episodes of :func:`write_relabelled` (``relabelled.json``'s order) as dicts of
    arrays and scalars; :func:`relabelled_index` checks the folder first."""
    index = relabelled_index(folder, size)
    for task, names in index["episodes"].items():
        for name in names:
            path = paths.join(folder, name)
            with np.load(io.BytesIO(paths.read_bytes(path))) as z:
                ep = {k: z[k] for k in z.files}
            missing = [k for k in RELABEL_KEYS if k not in ep]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}")
            T = len(ep["action"])
            bad = [k for k in RELABEL_KEYS if len(ep[k]) != T]
            if T == 0 or bad:
                raise ValueError(f"{path}: {T} labelled steps; arrays of another length: {bad}")
            yield {k: (v.item() if v.ndim == 0 else v) for k, v in ep.items()}


# ---- reporting -----------------------------------------------------------------------------------

def _rates(records: list[dict], task: str) -> dict:
    rows = [r for r in records if r["task"] == task]
    k, n = sum(r["success"] for r in rows), len(rows)
    lo, hi = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "success": k / n if n else float("nan"), "wilson95": [lo, hi]}


def _prediction(policy, protocol: Protocol) -> tuple[bool, str | None]:
    """Whether this run shows and scores the GFDM's predicted future, and if not, why."""
    if not protocol.predict_future:
        return False, "off (predict_future=False)"
    if not callable(getattr(policy, "act_and_predict_batch", None)):
        return False, (f"{type(policy).__name__} computes actions only (no act_and_predict_batch); the GFDM's "
                       f"predicted future needs the JAX policy (launch.evaluate --backend=jax)")
    if protocol.video_view not in policy.views:
        return False, f"the policy predicts its views {list(policy.views)}, not video_view {protocol.video_view!r}"
    return True, None


def _attribution(protocol: Protocol, records: list[dict], reason: str | None) -> dict:
    """attribution.attribute over the episodes (each record gets its label), or why there is none."""
    if reason is not None:
        return {"available": False, "reason": reason}
    ordered = sorted(records, key=lambda r: (protocol.tasks.index(r["task"]), r["episode"]))   # table: task order
    result = attribution.attribute(ordered, percentile=protocol.attribution_percentile)
    for rec, label in zip(ordered, result.pop("labels")):
        rec["attribution"] = label
    return {"available": True, **result}


def _summary(protocol: Protocol, policy, policy_info, instructions, records, expert_records, calls,
             workers: int) -> dict:
    import importlib.metadata

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    predicting, reason = _prediction(policy, protocol)
    proto = {
        "suite": "metaworld", "benchmark": "Meta-World v3, MT1 goal sets (gym.make('Meta-World/MT1', seed=seed))",
        "tasks": list(protocol.tasks), "episodes_per_task": protocol.episodes, "horizon": protocol.horizon,
        "chunk_length": calls["chunk_length"], "steps_per_chunk": protocol.steps_per_chunk, "seed": protocol.seed,
        "episode_seed": "SeedSequence((seed, crc32(task), episode)).generate_state(1)[0]",
        "goal": f"permutation of the {NUM_GOALS} goals by SeedSequence((seed, crc32(task))), [episode % {NUM_GOALS}]",
        "cameras": dict(protocol.cameras), "flip": FLIP, "resolution": protocol.resolution,
        "policy_views": list(policy.views), "policy_resolution": int(policy.resolution),
        "rendering": "offscreen MuJoCo, shadows / reflections / multisampling off (data_pipelines/demo.py)",
        "instructions": dict(instructions),
        "action_conversion": "env = [clip(xyz), clip(1 - 2 * gripper)] from 7-D (xyz, rotation, gripper 1 = open)",
        "success": "info['success'] at any step; the episode ends at the first success",
        "expert": "metaworld.policies scripted expert, one action per step, same seeds and goals" if protocol.expert
        else None,
        "workers": workers,
        "batch": (f"one {'act_and_predict_batch' if predicting else 'act_batch'} per round over all live episodes, "
                  f"padded to the worker count"),
        "policy_noise": ("per row: seeds = SeedSequence((episode seed, replanning step)).generate_state(1)[0]; an "
                         "episode's draws do not depend on the other tasks or the worker count"
                         if calls["seeded"] else
                         "the policy's own (its act_batch takes no seeds): an episode's draws can depend on the "
                         "rows it shares a call with, so workers and tasks are part of the protocol"),
        "videos": {"view": protocol.video_view, "camera": protocol.cameras[protocol.video_view],
                   "frame_ms": protocol.gif_frame_ms, "per_task": protocol.videos_per_task,
                   "layout": VIDEO_LAYOUT if predicting else "the real frames of the view, one per env step"},
        "predict_future": {"requested": protocol.predict_future, "used": predicting, "unavailable": reason,
                           "stride": protocol.future_stride, "frames_resolution": calls["future"],
                           "score": "PSNR (dB) of predicted vs real next frames at the policy's resolution "
                                    "(defi_jax/evaluation/attribution.py)"},
        "versions": {p: version(p) for p in ("metaworld", "mujoco", "gymnasium", "defi-jax")},
    }
    tasks = {}
    for t in protocol.tasks:
        row = _rates(records, t)
        if protocol.expert:
            row["expert"] = _rates(expert_records, t)
        tasks[t] = row
    mean = float(np.mean([tasks[t]["success"] for t in protocol.tasks]))
    pooled = _rates([dict(r, task="*") for r in records], "*")
    summary = {"protocol": proto, "policy": dict(policy_info or {}), "mean_success": mean,
               "pooled": pooled, "tasks": tasks}
    if protocol.expert:
        summary["mean_expert_success"] = float(np.mean([tasks[t]["expert"]["success"] for t in protocol.tasks]))
        summary["pooled_expert"] = _rates([dict(r, task="*") for r in expert_records], "*")
    summary["attribution"] = _attribution(protocol, records, reason)
    expert_by = {(r["task"], r["episode"]): r for r in expert_records}
    summary["episodes"] = [dict(r, expert_success=expert_by[(r["task"], r["episode"])]["success"]
                                if expert_by else None) for r in records]
    return summary


def _throughput(worker_stats: list[dict], calls: dict, policy_phase_s: float, expert_s: float, wall_s: float):
    per_worker = []
    for i, s in enumerate(worker_stats):
        steps, secs = s.get("env_steps", 0), s.get("env_s", 0.0)
        e_steps, e_secs = s.get("expert_steps", 0), s.get("expert_s", 0.0)
        per_worker.append({"worker": i, "env_steps": steps, "env_s": round(secs, 3),
                           "env_steps_per_s": steps / secs if secs else None,
                           "expert_steps": e_steps, "expert_steps_per_s": e_steps / e_secs if e_secs else None,
                           "env_setup_s": round(s.get("setup_s", 0.0), 3), "video_s": round(s.get("video_s", 0.0), 3),
                           "prediction_scoring_s": round(s.get("score_s", 0.0), 3)})
    rates = [w["env_steps_per_s"] for w in per_worker if w["env_steps_per_s"]]
    steady = calls["calls"] - 1
    return {"workers": per_worker, "env_steps_per_s_per_worker": float(np.mean(rates)) if rates else 0.0,
            "env_steps_per_s": sum(w["env_steps"] for w in per_worker) / policy_phase_s if policy_phase_s else None,
            "policy_calls": calls["calls"], "mean_batch_rows": calls["rows"] / max(calls["calls"], 1),
            "policy_first_call_s": calls["first_call_s"],
            "policy_call_ms": 1e3 * calls["seconds"] / steady if steady > 0 else None,
            "policy_phase_s": policy_phase_s, "expert_phase_s": expert_s, "wall_s": wall_s}


CSV_PROTOCOL = ("horizon", "chunk_length", "steps_per_chunk", "seed", "episodes_per_task", "resolution",
                "policy_resolution", "workers")


# The JAX policy's sampler (launch.evaluate records it in summary["policy"]; other backends leave it empty).
SAMPLER = ("gfdm_steps", "sample_steps", "sample_sigma_min")


def _write_csv(path: str, summary: dict):
    proto = summary["protocol"]
    cameras = ";".join(f"{v}={c}" for v, c in proto["cameras"].items())
    fields = ["task", "episodes", "successes", "success", "wilson95_low", "wilson95_high", "expert_successes",
              "expert_success", "expert_wilson95_low", "expert_wilson95_high", "suite", *CSV_PROTOCOL, "cameras",
              "flip", "checkpoint", *SAMPLER]
    common = {"suite": proto["suite"], **{k: proto[k] for k in CSV_PROTOCOL}, "cameras": cameras,
              "flip": "rot180", "checkpoint": summary["policy"].get("source", ""),
              **{k: summary["policy"].get(k, "") for k in SAMPLER}}
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for task, r in summary["tasks"].items():
        e = r.get("expert")
        w.writerow({"task": task, "episodes": r["episodes"], "successes": r["successes"],
                    "success": f"{r['success']:.4f}", "wilson95_low": f"{r['wilson95'][0]:.4f}",
                    "wilson95_high": f"{r['wilson95'][1]:.4f}",
                    "expert_successes": e["successes"] if e else "", "expert_success":
                    f"{e['success']:.4f}" if e else "", "expert_wilson95_low": f"{e['wilson95'][0]:.4f}" if e
                    else "", "expert_wilson95_high": f"{e['wilson95'][1]:.4f}" if e else "", **common})
    # Every task has the same episode count, so the mean of the task rates is the pooled rate.
    p, e = summary["pooled"], summary.get("pooled_expert")
    w.writerow({"task": "mean", "episodes": p["episodes"], "successes": p["successes"],
                "success": f"{summary['mean_success']:.4f}", "wilson95_low": f"{p['wilson95'][0]:.4f}",
                "wilson95_high": f"{p['wilson95'][1]:.4f}", "expert_successes": e["successes"] if e else "",
                "expert_success": f"{summary['mean_expert_success']:.4f}" if e else "",
                "expert_wilson95_low": f"{e['wilson95'][0]:.4f}" if e else "",
                "expert_wilson95_high": f"{e['wilson95'][1]:.4f}" if e else "", **common})
    paths.write_text(path, f.getvalue())


def _write_attribution_csv(path: str, result: dict):
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=attribution.COLUMNS)
    w.writeheader()
    for row in attribution.table_rows(result):
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    paths.write_text(path, f.getvalue())
