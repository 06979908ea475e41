"""The embedded default data: Meta-World scripted-expert episodes, made locally (nothing is downloaded).

Layout under the demo root (``$DEFI_JAX_DEMO_DIR`` or ``~/.cache/defi_jax/demo``):
  demo/1.0.0/            a real TFDS RLDS dataset (TFRecord): two cameras ("image" = corner camera,
                         "wrist_image" = gripper camera), the raw 4-D Meta-World action, a language
                         instruction per task, proprioceptive state
  demo/arrayrecord/      its conversion (what training reads) + action_stats.json
  demo_human/            action-free videos of OTHER tasks in the Something-Something-v2 layout
                         (20bn-something-something-v2/<id>.webm, labels/{train,validation}.json): the
                         human-video stand-in.
Deterministic for a seed (Meta-World task sampling and the scripted policies are seeded; rendering is
offscreen MuJoCo with shadows and reflections off).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

# Robot tasks: what the demo policy learns and is evaluated on closed-loop. Each one's target is an object in
# view that a 32 px image policy can find (Meta-World randomises its position): reach-v3's and push-v3's goals
# are a few pixels at most and invisible at 32 px, so the policy cannot know them; the tiny policy never learned
# window-close-v3 (getting behind its handle) or button-press-topdown-v3 (hitting its small button) from 20
# episodes (BENCHMARKS.md, Meta-World closed loop), so door-close-v3 (the door) and plate-slide-v3 (the net: the
# goal) replaced them. The scripted experts solve every episode of these (launch.evaluate's expert column).
# Human videos: related tasks, not the robot's.
ROBOT_TASKS = ("drawer-close-v3", "door-close-v3", "handle-press-v3", "plate-slide-v3")
HUMAN_TASKS = ("drawer-open-v3", "window-open-v3", "door-open-v3")
EPISODES, HUMAN_EPISODES = 20, 5   # per robot task (successful expert episodes), per human-video task
INSTRUCTIONS = {
    "reach-v3": "reach the red goal", "push-v3": "push the puck to the goal",
    "drawer-open-v3": "open the drawer", "drawer-close-v3": "close the drawer",
    "button-press-v3": "press the button", "button-press-topdown-v3": "press the button from the top",
    "door-open-v3": "open the door", "door-close-v3": "close the door",
    "window-open-v3": "slide the window open", "window-close-v3": "slide the window closed",
    "pick-place-v3": "pick up the puck and place it at the goal", "coffee-push-v3": "push the mug under the coffee machine",
    "faucet-open-v3": "turn the faucet on", "faucet-close-v3": "turn the faucet off",
    "handle-press-v3": "press the handle down", "lever-pull-v3": "pull the lever up",
    "plate-slide-v3": "slide the plate into the goal", "sweep-into-v3": "sweep the puck into the hole",
}
PRIMARY_CAMERA, WRIST_CAMERA = "corner", "gripperPOV"
DONE = "DEMO_COMPLETE.json"
VERSION = 4   # 2: robot tasks keep the scripted expert's successful episodes; expert success recorded
#               3: tasks with visible targets, 20 episodes per robot task
#               4: door-close and plate-slide instead of window-close and button-press-topdown


def instruction(task: str) -> str:
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


class _Renderer:
    def __init__(self, env, size: int):
        import mujoco

        self._mj = mujoco
        self.env = env
        env.unwrapped.model.vis.quality.offsamples = 0  # no multisampling: ~2x faster software rendering
        self.r = mujoco.Renderer(env.unwrapped.model, size, size)

    def __call__(self, camera: str) -> np.ndarray:
        self.r.update_scene(self.env.unwrapped.data, camera=camera)
        # Shadows and reflections cost most of the software-rendering time and add nothing here.
        self.r.scene.flags[self._mj.mjtRndFlag.mjRND_SHADOW] = 0
        self.r.scene.flags[self._mj.mjtRndFlag.mjRND_REFLECTION] = 0
        # Meta-World's cameras render upside down: rotate by 180 degrees.
        return np.ascontiguousarray(self.r.render()[::-1, ::-1])

    def close(self):
        self.r.close()


def rollout_task(task: str, episodes: int, size: int, seed: int, *, wrist: bool = True,
                 max_steps: int = 200, extra_steps: int = 10, successful_only: bool = False,
                 max_attempts: int | None = None, expert_noise: float = 0.0) -> list[dict]:
    """Scripted-expert episodes of one Meta-World v3 task: frames, raw 4-D actions, states.

    ``successful_only``: keep drawing episodes (at most ``max_attempts``, default 4 x ``episodes``) until
    ``episodes`` of them succeeded, and return only those (Meta-World v3's scripted experts fail on some
    seeds). Every episode dict carries ``attempts``: the episodes run for this task in all.

    ``expert_noise`` (DART, Laskey et al. 2017): the environment executes the expert's action plus Gaussian noise
    of this standard deviation on the x, y, z hand deltas (clipped to [-1, 1]; the gripper's untouched), while the
    episode records the expert's own action: states off the expert's path, each labelled with how the expert
    recovers from it. Seeded per episode."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    import gymnasium as gym
    import metaworld  # noqa: F401 - registers the Meta-World gymnasium envs
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise ValueError(f"--tasks: unknown Meta-World task {task!r}; e.g. {sorted(ENV_POLICY_MAP)[:8]}")
    env = gym.make("Meta-World/MT1", env_name=task, seed=seed)
    policy = ENV_POLICY_MAP[task]()
    render = _Renderer(env, size)
    out, attempts = [], 0
    max_attempts = max_attempts or (4 * episodes if successful_only else episodes)
    try:
        for e in range(max_attempts):
            if len(out) == episodes:
                break
            attempts += 1
            obs, _ = env.reset(seed=seed * 1000 + e)
            noise = np.random.default_rng([seed, e, 7]) if expert_noise > 0 else None
            frames, wrist_frames, actions, states = [], [], [], []
            success_at = None
            for t in range(max_steps):
                frames.append(render(PRIMARY_CAMERA))
                if wrist:
                    wrist_frames.append(render(WRIST_CAMERA))
                a = np.clip(policy.get_action(obs), -1, 1).astype(np.float32)
                states.append(np.asarray(obs, np.float32))
                actions.append(a)
                if noise is not None:
                    a = a.copy()
                    a[:3] = np.clip(a[:3] + expert_noise * noise.standard_normal(3), -1, 1)
                obs, _, _, _, info = env.step(a)
                if success_at is None and info.get("success"):
                    success_at = t
                if success_at is not None and t >= success_at + extra_steps:
                    break
            if successful_only and success_at is None:
                continue
            out.append({"task": task, "frames": np.stack(frames),
                        "wrist_frames": np.stack(wrist_frames) if wrist else None,
                        "actions": np.stack(actions), "states": np.stack(states),
                        "success": success_at is not None})
    finally:
        render.close()
        env.close()
    for ep in out:
        ep["attempts"] = attempts
    return out


def _rollouts(jobs: list[tuple], max_steps: int, expert_noise: float = 0.0) -> list[list[dict]]:
    """``rollout_task`` for each (task, episodes, size, seed, wrist) in one fresh process: MuJoCo's EGL
    (Mesa llvmpipe) and TensorFlow crash when loaded into one process, in either order."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_jobs, jobs, max_steps, expert_noise).result()


def _run_jobs(jobs, max_steps, expert_noise=0.0):
    # Robot tasks (with a wrist view) keep the expert's successful episodes only: the policy learns from them.
    # The human videos show the expert's own motion (no noise: nothing is labelled in them).
    return [rollout_task(task, n, size, seed, wrist=wrist, max_steps=max_steps, successful_only=wrist,
                         expert_noise=expert_noise if wrist else 0.0)
            for task, n, size, seed, wrist in jobs]


def make_demo_data(out: str, *, tasks=ROBOT_TASKS, human_tasks=HUMAN_TASKS, episodes: int = EPISODES,
                   human_episodes: int | None = HUMAN_EPISODES, size: int = 128, seed: int = 0,
                   max_steps: int = 200, relabelled: Sequence[str] = (), expert_noise: float = 0.0) -> str:
    """Write the demo data to ``out`` (see the module docstring) and convert the RLDS part. Returns ``out``.

    ``expert_noise``: the robot episodes are recorded with noise injected into the executed actions (DART; see
    :func:`rollout_task`), labelled with the expert's clean actions.

    ``relabelled``: folders of ``launch.evaluate --relabel_out`` (DAgger): their policy episodes, each state
    labelled with the scripted expert's action, join the expert episodes in the robot dataset (one dataset, so
    one set of action statistics)."""
    import tensorflow_datasets as tfds

    from data_pipelines import convert, rlds, video
    from defi_jax.evaluation import metaworld

    tfds.disable_progress_bar()
    for folder in relabelled:     # before the rollouts: a bad folder fails in seconds, not after the rendering
        metaworld.relabelled_index(folder, size)
    if expert_noise < 0:
        raise ValueError(f"expert_noise={expert_noise}: a standard deviation, >= 0")
    human_episodes = episodes if human_episodes is None else human_episodes
    overlap = set(tasks) & set(human_tasks)
    if overlap:
        raise ValueError(f"--human_tasks must differ from --tasks (overlap: {sorted(overlap)})")
    os.makedirs(out, exist_ok=True)
    jobs = [(task, episodes, size, seed + k, True) for k, task in enumerate(tasks)]
    jobs += [(task, human_episodes, size, seed + 100 + k, False) for k, task in enumerate(human_tasks)]
    rollouts = _rollouts(jobs, max_steps, expert_noise)
    expert = {}
    for k, task in enumerate(tasks):
        got = rollouts[k]
        attempts = got[0]["attempts"] if got else 4 * episodes
        expert[task] = {"successes": len(got), "attempts": attempts}
        logging.warning("demo: %s scripted expert solved %d of %d episodes (kept the successful ones)", task,
                        len(got), attempts)
    failed = [t for t, e in expert.items() if e["successes"] == 0]
    if failed:
        raise RuntimeError(f"demo data: the scripted expert solved no episode of {failed} in "
                           f"{4 * episodes} attempts; choose other --tasks")
    split_eps: dict[str, list] = {"train": []}
    for k, task in enumerate(tasks):
        for i, ep in enumerate(rollouts[k]):
            text = instruction(task)
            steps = [{"observation": {"image": ep["frames"][t], "wrist_image": ep["wrist_frames"][t],
                                      "state": ep["states"][t].astype(np.float32)},
                      "action": ep["actions"][t], "language_instruction": text}
                     for t in range(len(ep["actions"]))]
            split_eps["train"].append({"steps": steps,
                                       "episode_metadata": {"file_path": f"metaworld/{task}/seed{seed + k}/ep{i}"}})
        logging.info("demo: %s x %d episodes", task, len(rollouts[k]))
    added: dict[str, dict[str, int]] = {}
    for folder in relabelled:
        counts = added.setdefault(folder, {})
        for ep in metaworld.read_relabelled(folder, size):
            steps = [{"observation": {"image": ep["image"][t], "wrist_image": ep["wrist_image"][t],
                                      "state": ep["state"][t].astype(np.float32)},
                      "action": ep["action"][t].astype(np.float32), "language_instruction": ep["instruction"]}
                     for t in range(len(ep["action"]))]
            split_eps["train"].append({"steps": steps, "episode_metadata": {
                "file_path": f"relabelled/{ep['task']}/seed{ep['seed']}/ep{ep['episode']}"}})
            counts[ep["task"]] = counts.get(ep["task"], 0) + 1
        logging.warning("demo: + relabelled policy episodes from %s: %s", folder, counts)
    rlds.write_rlds(out, "demo", split_eps, description="Meta-World v3 scripted-expert episodes (defi-jax demo data)")
    convert.convert("demo", os.path.join(out, "demo"), os.path.join(out, "demo"))

    human_root = os.path.join(out, "demo_human")
    labels: dict[str, list] = {"train": [], "validation": []}
    vid = 0
    for k, task in enumerate(human_tasks):
        eps = rollouts[len(tasks) + k]
        for i, ep in enumerate(eps):
            vid += 1
            video.write_video(os.path.join(human_root, video.SSV2_VIDEOS, f"{vid}.webm"), ep["frames"], fps=80.0)
            split = "validation" if i == len(eps) - 1 and len(eps) > 1 else "train"
            labels[split].append({"id": str(vid), "label": instruction(task), "template": instruction(task),
                                  "placeholders": []})
    os.makedirs(os.path.join(human_root, "labels"), exist_ok=True)
    for split, entries in labels.items():
        with open(os.path.join(human_root, "labels", f"{split}.json"), "w") as f:
            json.dump(entries, f, indent=1)
    shutil.rmtree(os.path.join(out, "downloads"), ignore_errors=True)  # TFDS's empty download cache
    with open(os.path.join(out, DONE), "w") as f:
        json.dump({"tasks": list(tasks), "human_tasks": list(human_tasks), "episodes": episodes,
                   "human_episodes": human_episodes, "size": size, "seed": seed,
                   "expert_success": expert, "relabelled": added, "expert_noise": expert_noise,
                   "version": VERSION}, f)
    return out


def _complete(root: str) -> bool:
    """A finished generation of this version (older demo data is regenerated)."""
    try:
        with open(os.path.join(root, DONE)) as f:
            return json.load(f).get("version") == VERSION
    except (OSError, ValueError):
        return False


def default_root() -> str:
    return os.environ.get("DEFI_JAX_DEMO_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "defi_jax", "demo")


def ensure_demo_data(root: str | None = None, **kwargs) -> str:
    """The embedded demo data dir, generated on first use (about two minutes on 2 CPU cores).

    Safe when several processes call it at once: each generates into a private temp dir and the first to
    finish renames it into place.
    """
    root = root or default_root()
    if _complete(root):
        return root
    kwargs = {"episodes": EPISODES, "human_episodes": HUMAN_EPISODES} | kwargs
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    logging.warning("defi-jax: generating the Meta-World demo data into %s (first use only)", root)
    try:
        # A subprocess: the caller may already hold TensorFlow or MuJoCo's EGL renderer, which cannot share
        # a process (see _rollouts).
        args = [sys.executable, "-m", "launch.make_demo_data", "--out", tmp]
        for k, v in kwargs.items():
            args += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"demo data generation failed ({' '.join(args)}):\n{proc.stderr[-4000:]}")
        if os.path.exists(root) and not _complete(root):
            shutil.rmtree(root, ignore_errors=True)  # a half-written dir, or an older version's data
        try:
            os.rename(tmp, root)
        except OSError:
            if not _complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
