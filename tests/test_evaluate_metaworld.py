"""Closed-loop Meta-World evaluation with stand-in policies (the DeFIPolicy interface, numpy inside).

The stand-in replays the scripted experts of reach-v3 and handle-press-v3 (re-derived here in numpy from
``metaworld.policies``, so this process never imports MuJoCo) through the policy's 7-D action convention: with
one action per chunk its episodes must equal the scripted expert's, which the evaluation runs on the same
seeds in its workers. That checks the seeds, the goals, the 7-D -> 4-D conversion and the success bookkeeping
at once. Also: the summary records the protocol, GIFs are written, two runs agree to the byte, each chunk runs
``steps_per_chunk`` actions, and batches are padded to the worker count.

The predicted future: a stand-in "predicts" a static world (every future frame = the frame it observed), so the
scores the workers compute must equal the PSNR between frames this stand-in saw (which checks that predicted
frame k meets the real frame k steps later); the GIF layout is checked on synthetic frames; and
``DeFIPolicy.act_and_predict_batch`` on a tiny random policy acts exactly like ``act_batch`` and returns the
decoded x0 estimate of the same GFDM step.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import random_model
from PIL import Image

from data_pipelines import demo
from defi_jax.evaluation import attribution as at
from defi_jax.evaluation import metaworld as mw

REPO = Path(__file__).resolve().parents[1]

TASKS = ("reach-v3", "handle-press-v3")
RES = 32


def _reach(state):      # metaworld.policies.SawyerReachV3Policy
    return np.append(5.0 * (state[-3:] - state[:3]), 0.0)


def _handle_press(state):   # metaworld.policies.SawyerHandlePressV3Policy
    hand, button = state[:3], state[4:7] + np.array([0.0, -0.02, 0.0])
    target = button + ([0.0, 0.0, 0.2] if np.linalg.norm(hand[:2] - button[:2]) > 0.02 else [0.0, 0.0, -0.5])
    return np.append(25.0 * (target - hand), -1.0)


class ExpertStandIn:
    """``act_batch`` -> [B, 10, 7]: the scripted expert's action for the observed state, as a demo-data row."""

    views = ("primary", "wrist")
    resolution = RES

    def __init__(self):
        self.rule = {demo.instruction("reach-v3"): _reach, demo.instruction("handle-press-v3"): _handle_press}
        self.batches = []

    def act_batch(self, observations, instructions):
        self.batches.append(len(observations))
        chunks = []
        for obs, text in zip(observations, instructions):
            for v in self.views:
                assert obs[v].dtype == np.uint8 and obs[v].shape == (RES, RES, 3), (v, obs[v].shape)
            a4 = np.clip(self.rule[text](obs["state"]), -1, 1).astype(np.float32)
            chunks.append(np.repeat(mw.from_env_action(a4[None]), 10, axis=0))
        return np.stack(chunks)


class StaticWorldStandIn(ExpertStandIn):
    """The expert stand-in, plus a prediction of a static world: ``frames`` copies of the observed view."""

    def __init__(self, frames=3):
        super().__init__()
        self.frames, self.seen = frames, []

    def act_and_predict_batch(self, observations, instructions, view):
        self.seen += [o[view].copy() for o in observations]
        future = np.stack([np.repeat(o[view][None], self.frames, axis=0) for o in observations])
        return self.act_batch(observations, instructions), future


class ConstantStandIn:
    views = ("primary", "wrist")
    resolution = RES

    def __init__(self, chunk=10):
        self.chunk, self.calls = chunk, []

    def act_batch(self, observations, instructions):
        self.calls.append([o["state"][:3].copy() for o in observations])
        out = np.zeros((len(observations), self.chunk, 7), np.float32)
        out[..., 0] = 1.0       # +x at full speed, gripper closed
        return out


class SeededStandIn:
    """Moves the hand in a direction drawn from each row's noise seed; remembers where the hand was per seed."""

    views = ("primary", "wrist")
    resolution = RES

    def __init__(self):
        self.hand_at = {}

    def act_batch(self, observations, instructions, *, seeds):
        out = np.zeros((len(observations), 10, 7), np.float32)
        for row, (obs, seed) in enumerate(zip(observations, seeds)):
            self.hand_at.setdefault(int(seed), obs["state"][:3].copy())
            out[row, :, :3] = np.random.default_rng(int(seed)).uniform(-1, 1, 3)
            out[row, :, 6] = 1.0
        return out


def test_protocol_pieces():
    rows = np.random.default_rng(0).uniform(-1.5, 1.5, (64, 4)).astype(np.float32)
    np.testing.assert_allclose(mw.to_env_action(mw.from_env_action(rows)), np.clip(rows, -1, 1), atol=1e-6)
    # gripper 1 = open in the policy's rows; Meta-World's effort +1 = close
    np.testing.assert_array_equal(mw.to_env_action(np.array([[0, 0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, 0.0]]))[:, 3],
                                  [-1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[chunk, 7\]"):
        mw.to_env_action(np.zeros((10, 4)))
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (10, 10): (0.7225, 1.0),
                             (1, 2): (0.0945, 0.9055)}.items():
        np.testing.assert_allclose(mw.wilson_interval(k, n), (lo, hi), atol=1e-4)
    seeds = {mw.episode_seed(0, t, e) for t in TASKS for e in range(50)}
    assert len(seeds) == 100 and mw.episode_seed(0, "reach-v3", 3) == mw.episode_seed(0, "reach-v3", 3)
    assert mw.episode_seed(1, "reach-v3", 3) != mw.episode_seed(0, "reach-v3", 3)
    assert sorted(mw.goal_index(0, "reach-v3", e) for e in range(50)) == list(range(50))
    assert mw.task_list("demo") == demo.ROBOT_TASKS and len(mw.task_list("mt50")) == 50
    assert mw.task_list("mt10")[:2] == ("reach-v3", "push-v3") and mw.task_list("a-v3, b-v3") == ("a-v3", "b-v3")
    with pytest.raises(ValueError, match="tasks: unknown"):
        mw.Protocol(tasks=("reach-v3", "no-such-task-v3")).check()
    with pytest.raises(ValueError, match="steps_per_chunk"):
        mw.Protocol(tasks=TASKS, steps_per_chunk=0).check()


def _run(out, policy, **kw):
    protocol = mw.Protocol(**{"tasks": TASKS, "episodes": 2, "horizon": 60, "steps_per_chunk": 1, "workers": 2,
                              "resolution": RES, "gif_frame_ms": 30, **kw})
    return mw.evaluate(policy, protocol, str(out), policy_info={"source": "stand-in"}, progress=None)


def test_stand_in_expert_matches_the_scripted_expert_and_runs_agree(tmp_path):
    policy = ExpertStandIn()
    summary = _run(tmp_path / "a", policy)

    episodes = summary["episodes"]
    assert [(r["task"], r["episode"]) for r in episodes] == [(t, e) for t in sorted(TASKS) for e in range(2)]
    for r in episodes:
        assert r["success"] == r["expert_success"]
        assert r["steps"] == (r["success_step"] + 1 if r["success"] else 60)
    assert all(r["success"] for r in episodes), episodes      # both experts solve these goals within 60 steps
    with open(tmp_path / "a" / "summary.json") as f:
        saved = json.load(f)
    assert saved["episodes"] == episodes
    for task in TASKS:
        row = saved["tasks"][task]
        assert row["episodes"] == 2 and 0.0 <= row["success"] <= 1.0
        assert row["wilson95"][0] <= row["success"] <= row["wilson95"][1]
        assert row["expert"]["success"] == row["success"]
    assert saved["mean_success"] == pytest.approx(np.mean([saved["tasks"][t]["success"] for t in TASKS]))
    proto = saved["protocol"]
    assert proto["tasks"] == list(TASKS) and proto["episodes_per_task"] == 2 and proto["horizon"] == 60
    assert proto["chunk_length"] == 10 and proto["steps_per_chunk"] == 1 and proto["seed"] == 0
    assert proto["resolution"] == RES and proto["cameras"] == {"primary": "corner", "wrist": "gripperPOV"}
    assert "180" in proto["flip"] and proto["workers"] == 2
    assert proto["instructions"]["reach-v3"] == demo.instruction("reach-v3") == "reach the red goal"
    assert saved["policy"] == {"source": "stand-in"}
    # one padded batch per round: every call had the worker count's rows
    assert set(policy.batches) == {2} and len(policy.batches) == saved["throughput"]["policy_calls"]
    assert all(w["env_steps_per_s"] > 0 for w in saved["throughput"]["workers"])

    with open(tmp_path / "a" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == [*TASKS, "mean"]
    for r in rows:
        assert (r["horizon"], r["steps_per_chunk"], r["chunk_length"], r["resolution"], r["seed"]) == (
            "60", "1", "10", str(RES), "0")
        assert r["cameras"] == "primary=corner;wrist=gripperPOV" and r["checkpoint"] == "stand-in"
        assert (r["gfdm_steps"], r["sample_steps"], r["sample_sigma_min"]) == ("", "", "")   # a stand-in: no sampler
    assert float(rows[-1]["success"]) == saved["mean_success"] and rows[0]["expert_success"] == "1.0000"

    for r in episodes:
        path = tmp_path / "a" / r["video"]
        assert path.name == f"ep{r['episode']:03d}_success.gif"
        with Image.open(path) as gif:
            assert gif.size == (RES, RES) and gif.n_frames == r["steps"] + 1
            assert gif.info["duration"] == 30

    # the second run on one worker (each episode depends on its job alone; one worker spawn and two env builds
    # fewer): the same episodes, the same GIFs to the byte
    again = _run(tmp_path / "b", ExpertStandIn(), workers=1)
    assert again["episodes"] == episodes and again["protocol"]["workers"] == 1
    for r in episodes:
        assert (tmp_path / "a" / r["video"]).read_bytes() == (tmp_path / "b" / r["video"]).read_bytes()


def test_chunks_run_steps_per_chunk_actions(tmp_path):
    policy = ConstantStandIn()
    # one episode per task: one pair of episodes (rolling over to the next jobs is checked in the tests above and
    # below; a second pair would cost two more env builds)
    summary = _run(tmp_path, policy, episodes=1, horizon=25, steps_per_chunk=10, expert=False, videos_per_task=0)
    # 2 episodes live at a time (2 workers), each asking at steps 0, 10 and 20: 3 calls per pair of episodes
    assert [len(c) for c in policy.calls] == [2] * 3 and len(summary["episodes"]) == 2
    for r in summary["episodes"]:
        assert r["video"] is None and r["expert_success"] is None
        assert r["steps"] == 25 or r["success"]
    # between two calls of one episode the hand moved +x (the chunk's 10 actions ran)
    first, second = policy.calls[0][0], policy.calls[1][0]
    assert second[0] > first[0] + 0.02 and abs(second[1] - first[1]) < 0.02
    assert summary["throughput"]["policy_calls"] == 3 and "expert" not in summary["tasks"]["reach-v3"]
    assert summary["protocol"]["policy_noise"].startswith("the policy's own (its act_batch takes no seeds)")
    assert not (tmp_path / "videos").exists()
    # a policy without act_and_predict_batch: no prediction, no attribution, and the summary says why
    assert summary["protocol"]["predict_future"]["used"] is False
    assert "ConstantStandIn computes actions only" in summary["protocol"]["predict_future"]["unavailable"]
    assert summary["attribution"] == {"available": False,
                                      "reason": summary["protocol"]["predict_future"]["unavailable"]}
    assert not (tmp_path / "attribution.csv").exists() and "prediction_score" not in summary["episodes"][0]

    with pytest.raises(ValueError, match="steps_per_chunk: 10 exceeds the policy's chunk of 5"):
        _run(tmp_path / "short", ConstantStandIn(chunk=5), tasks=("reach-v3",), episodes=1, workers=1, horizon=20,
             steps_per_chunk=10, expert=False, videos_per_task=0)


def test_policy_noise_is_seeded_per_episode_whatever_else_runs(tmp_path):
    """Each row's noise seed is noise_seed(episode seed, replanning step): a task's episodes play alike alone on
    one worker and beside another task on two."""
    kw = dict(horizon=20, steps_per_chunk=5, expert=False, videos_per_task=0)
    alone, beside = SeededStandIn(), SeededStandIn()
    summary = _run(tmp_path / "alone", alone, tasks=("reach-v3",), episodes=2, workers=1, **kw)
    # one episode per task: reach-v3's first episode shares every call with handle-press-v3's (with two each, it
    # would share them with reach-v3's second)
    _run(tmp_path / "beside", beside, tasks=TASKS, episodes=1, workers=2, **kw)
    expected = {mw.noise_seed(mw.episode_seed(0, "reach-v3", e), c) for e in range(2) for c in range(4)}
    assert set(alone.hand_at) == expected
    assert set(beside.hand_at) == {mw.noise_seed(mw.episode_seed(0, t, 0), c) for t in TASKS for c in range(4)}
    for seed in expected & set(beside.hand_at):   # the same seed met the hand where it was in the other run
        np.testing.assert_allclose(beside.hand_at[seed], alone.hand_at[seed], atol=1e-6)
    moved = [alone.hand_at[mw.noise_seed(mw.episode_seed(0, "reach-v3", 0), c)] for c in range(4)]
    assert np.linalg.norm(moved[3] - moved[0]) > 0.01   # the draws steer the hand
    assert "SeedSequence((episode seed, replanning step))" in summary["protocol"]["policy_noise"]


def test_relabel_out_keeps_policy_episodes_labelled_by_the_expert_for_the_demo_data(tmp_path, subprocess_env):
    """DAgger: the states the policy visits (a constant +x push, not the expert's) carry the scripted expert's
    action there; launch.make_demo_data --relabelled adds those episodes, labels as actions, to the RLDS."""
    rel = tmp_path / "relabelled"
    # one worker (the worker count is not the point here): one env process spawned, not two
    summary = mw.evaluate(ConstantStandIn(), mw.Protocol(tasks=TASKS, episodes=1, horizon=12, steps_per_chunk=4,
                                                         workers=1, resolution=RES, expert=False,
                                                         videos_per_task=0),
                          str(tmp_path / "eval"), policy_info={"source": "stand-in", "gfdm_steps": 1,
                                                               "sample_steps": 4, "sample_sigma_min": 0.002},
                          progress=None, relabel_out=str(rel))
    with open(tmp_path / "eval" / "summary.csv") as f:   # the sampler the policy reported, on every row
        assert {(r["gfdm_steps"], r["sample_steps"], r["sample_sigma_min"]) for r in csv.DictReader(f)} == {
            ("1", "4", "0.002")}
    index = json.loads((rel / mw.RELABEL_INDEX).read_text())
    assert index["episodes"] == {t: [f"{t}/ep000.npz"] for t in TASKS} and index["resolution"] == RES
    assert summary["relabelled"] == {"folder": str(rel), "episodes": 2, "steps": 24} == \
        json.loads((tmp_path / "eval" / "summary.json").read_text())["relabelled"]
    rules = {"reach-v3": _reach, "handle-press-v3": _handle_press}
    episodes = list(mw.read_relabelled(str(rel), RES))
    for ep in episodes:
        T = len(ep["action"])
        assert T == 12 and not ep["success"] and ep["instruction"] == demo.instruction(ep["task"])
        assert ep["image"].shape == ep["wrist_image"].shape == (T, RES, RES, 3) and ep["image"].dtype == np.uint8
        assert not np.array_equal(ep["image"][0], ep["wrist_image"][0]) and ep["image"].std() > 5
        # the policy's push was executed: the hand moved +x; each label is the expert's action at that state
        np.testing.assert_array_equal(ep["policy_action"], np.tile([1.0, 0.0, 0.0, 1.0], (T, 1)))
        assert ep["state"][-1, 0] > ep["state"][0, 0] + 0.02
        expected = np.clip([rules[ep["task"]](x) for x in ep["state"].astype(np.float64)], -1, 1)
        np.testing.assert_allclose(ep["action"], expected, atol=1e-5)
        assert np.abs(ep["action"] - ep["policy_action"]).max() > 0.5
    with pytest.raises(ValueError, match="frames of 32 px, the data needs 64 px"):
        next(mw.read_relabelled(str(rel), 64))
    bad = subprocess.run([sys.executable, "-m", "launch.make_demo_data", "--out", str(tmp_path / "bad"),
                          "--relabelled", str(tmp_path / "eval")], cwd=REPO, env=subprocess_env(devices=0),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "relabelled.json is missing" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "launch.make_demo_data", "--out", str(out), "--tasks", "reach-v3",
                           "--human_tasks", "drawer-close-v3", "--episodes", "1", "--human_episodes", "1",
                           "--size", str(RES), "--max_steps", "150", "--relabelled", str(rel)],
                          cwd=REPO, env=subprocess_env(devices=0), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from data_pipelines import rlds
    read = [e for _, e in rlds.read_rlds(str(out / "demo"), "demo")]
    assert len(read) == 3 and not any(isinstance(e, Exception) for e in read)
    for ep in episodes:        # each relabelled episode, its labels as the dataset's 7-D actions
        match = [e for e in read if len(e["actions"]) == 12 and np.array_equal(e["actions"][:, :3], ep["action"][:, :3])]
        assert len(match) == 1 and match[0]["instruction"] == ep["instruction"]
        np.testing.assert_allclose(match[0]["actions"][:, 6], (1 - ep["action"][:, 3]) / 2, atol=1e-6)
    done = json.loads((out / demo.DONE).read_text())
    assert done["relabelled"] == {str(rel): {"reach-v3": 1, "handle-press-v3": 1}}


def test_predicted_future_is_scored_against_the_frames_that_followed(tmp_path):
    policy = StaticWorldStandIn(frames=3)
    summary = _run(tmp_path, policy, tasks=("reach-v3",), horizon=12, workers=1, expert=False, videos_per_task=1)
    proto = summary["protocol"]
    assert proto["predict_future"]["used"] and proto["predict_future"]["frames_resolution"] == [3, RES, RES]
    assert proto["predict_future"]["stride"] == 1 and "two panels" in proto["videos"]["layout"]
    # one worker: the episodes ran one after the other, every step a replanning step (steps_per_chunk 1)
    start = 0
    for rec in summary["episodes"]:
        seen = policy.seen[start:start + rec["steps"]]       # the frames after 0 .. steps - 1 env steps
        start += rec["steps"]
        steps = rec["prediction_steps"]
        assert [s["step"] for s in steps] == list(range(rec["steps"]))
        assert [s["frames"] for s in steps] == [min(2, rec["steps"] - r) for r in range(rec["steps"])]
        for r in range(rec["steps"] - 2):                     # both predicted frames' real ones were observed
            expected = at.psnr(np.stack([seen[r]] * 2), np.stack(seen[r + 1:r + 3]))
            assert steps[r]["psnr"] == pytest.approx(expected, rel=1e-9), r
        assert rec["prediction_score"] == pytest.approx(np.mean([s["psnr"] for s in steps]))
        # two episodes: fewer than the 3 successes a threshold needs, so a failure is counted, not attributed
        assert rec["attribution"] == (None if rec["success"] else "unattributed")
    assert start == len(policy.seen)
    with Image.open(tmp_path / summary["episodes"][0]["video"]) as gif:
        assert gif.size == (2 * RES, RES) and gif.n_frames == summary["episodes"][0]["steps"] + 1
    assert summary["episodes"][1]["video"] is None

    table = summary["attribution"]
    assert table["available"] and table["paper_calvin"] == {"forward_dynamics": 0.62, "inverse_dynamics": 0.38}
    row = table["tasks"]["reach-v3"]
    assert row["failures"] == sum(not r["success"] for r in summary["episodes"]) == row["unattributed"]
    assert row["calibration"].startswith("none") and row["forward_dynamics"] == row["inverse_dynamics"] == 0
    with open(tmp_path / "attribution.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["reach-v3", "all"] and rows[0]["failures"] == str(row["failures"])
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["attribution"] == table


def test_outputs_to_gs_are_staged_and_uploaded_summary_last(gcs, tmp_path):
    from defi_jax import paths
    out = "gs://bucket/runs/policy/eval_metaworld"
    paths.write_text(paths.join(out, "videos", "reach-v3", "ep005_success.gif"), "an older run's outcome")
    paths.write_text(paths.join(out, "notes.txt"), "kept")
    uploads = []
    real_copy = paths.copy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "copy", lambda src, dst: (uploads.append(dst), real_copy(src, dst)))
        summary = _run(out, StaticWorldStandIn(frames=2), tasks=("reach-v3",), episodes=1, horizon=12, workers=1,
                       expert=False, videos_per_task=1)
    assert uploads[-1] == out + "/summary.json"                   # found complete by whoever reads the summary
    assert json.loads(paths.read_text(paths.join(out, "summary.json")))["episodes"] == summary["episodes"]
    names = paths.listdir(out)
    assert {"summary.json", "summary.csv", "attribution.csv", "videos", "notes.txt"} <= set(names), names
    video = summary["episodes"][0]["video"]                        # relative to the output folder
    assert paths.listdir(paths.join(out, "videos", "reach-v3")) == [os.path.basename(video)]   # the old GIF gone
    assert paths.read_bytes(paths.join(out, video))[:6] == b"GIF89a"


def test_gif_layout_real_beside_predicted():
    real = [np.full((4, 4, 3), 10 * t, np.uint8) for t in range(7)]
    futures = [(0, np.stack([np.full((2, 2, 3), 100 + k, np.uint8) for k in range(3)])),
               (4, np.stack([np.full((2, 2, 3), 200 + k, np.uint8) for k in range(3)]))]
    frames = mw._beside_predictions(real, futures, stride=2)
    assert len(frames) == 7 and all(f.shape == (4, 8, 3) for f in frames)
    for t, f in enumerate(frames):
        np.testing.assert_array_equal(f[:, :4], real[t])
    # step t shows frame (t - r) // 2 of the latest prediction made at r <= t, enlarged to 4 x 4
    assert [int(f[0, 4, 0]) for f in frames] == [100, 100, 101, 101, 200, 200, 201]
    held = mw._beside_predictions(real, futures[:1], stride=1)
    assert [int(f[3, 7, 0]) for f in held] == [100, 101, 102, 51, 51, 51, 51]   # past frame 2: held, half bright


def test_defi_policy_act_and_predict_acts_like_act_batch_and_decodes_the_features_step(fast_compile):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import policy as policy_configs
    from defi_jax import inference
    from defi_jax.gfdm.evaluation import to_uint8
    from defi_jax.inference import DeFIPolicy, stack_views

    c = policy_configs.get_config("tiny")
    c.init.sources.gfdm.path = c.init.sources.gidm.path = ""
    c.policy.gfdm_init, c.policy.gidm_init = "initial", "random"
    rs = np.random.default_rng(0)
    model = random_model("policy", c)
    obs, other = ({v: rs.integers(0, 256, (RES, RES, 3), dtype=np.uint8) for v in ("primary", "wrist")}
                  for _ in range(2))
    text = demo.instruction("reach-v3")
    # One batch size and view for act_and_predict (~15 CPU-s a compile): three rows, the first and last alike but
    # for their noise, another observation and instruction between them.
    batch, texts = [obs, other, obs], [text, demo.instruction("push-v3"), text]

    plain = DeFIPolicy(c, model, {"normalized": False}, seed=5, compiler_options=fast_compile)
    predicting = DeFIPolicy(c, model, {"normalized": False}, seed=5, compiler_options=fast_compile)
    for _ in range(2):   # the i-th call of either draws the same noise: the same actions
        actions = plain.act_batch(batch, texts)
        both, future = predicting.act_and_predict_batch(batch, texts, "wrist")
        np.testing.assert_allclose(both, actions, rtol=1e-4, atol=1e-5)
    T = c.model.gfdm.num_frames
    assert future.dtype == np.uint8 and future.shape == (3, T, RES, RES, 3)

    # the prediction is the decoded x0 estimate of the GFDM step the features came from (DeFIPolicyModel.act
    # draws them with the first half of the row's key), for the wrist view (row 1 of the stacked views); rows 0
    # and 2 (one observation, two seeds) each from their own key
    frames_VHW3 = jnp.asarray(stack_views([obs], plain.views, RES)[0], jnp.float32) / 127.5 - 1.0
    gfdm_text = jnp.repeat(predicting.encode_instructions([text])["gfdm"], 2, axis=0)
    graphdef, state = nnx.split(model)

    def wrist_prediction(state, frames_VHW3, gfdm_text, key):   # jitted: 3x faster than eager on a CPU
        gfdm = nnx.merge(graphdef, state).gfdm
        _, latents = gfdm.one_step_features(frames_VHW3, gfdm_text, key, denoise_steps=model.gfdm_steps)
        return gfdm.decode(latents[1:])

    keys = [jax.random.split(jax.random.key(s))[0] for s in inference.call_seeds(5, 1, 3)]
    reference = jax.jit(wrist_prediction).lower(state, frames_VHW3, gfdm_text, keys[0]).compile(fast_compile)
    for row in (0, 2):
        got = to_uint8(reference(state, frames_VHW3, gfdm_text, keys[row]))[0]
        assert np.abs(future[row].astype(int) - got.astype(int)).max() <= 1, row
    with pytest.raises(ValueError, match=r"view 'side': the policy reads \['primary', 'wrist'\]"):
        predicting.act_and_predict_batch([obs], [text], "side")

    # noise per row: a row acts on its own seed alone, whatever shares its call; another seed, other actions
    rows = plain.act_batch(batch, texts, seeds=[7, 8, 2**32 - 1])
    single = plain.act_batch([obs], [text], seeds=[7])
    np.testing.assert_allclose(rows[0], single[0], rtol=1e-4, atol=1e-5)
    assert np.abs(rows[2] - rows[0]).max() > 1e-3
    rows_p, future_p = predicting.act_and_predict_batch(batch, texts, "wrist", seeds=[7, 8, 2**32 - 1])
    np.testing.assert_allclose(rows_p, rows, rtol=1e-4, atol=1e-5)
    assert future_p.shape == (3, T, RES, RES, 3)
    assert len(predicting._predict_fns) == 1 and not predicting._act_fns   # compiled once, apart from act
    # without a view: the first (primary), seen where the program is picked rather than compiled a second time
    picked = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predicting, "_predict_fn", lambda b, v: picked.append((b, v)) or {}[(b, v)])
        with pytest.raises(KeyError):
            predicting.act_and_predict_batch(batch, texts)
    assert picked == [(3, 0)]
    with pytest.raises(ValueError, match=r"seeds: expected 1 integers \(one per row\)"):
        plain.act_batch([obs], [text], seeds=[1, 2])
    with pytest.raises(ValueError, match=r"seeds: each must be in \[0, 2\*\*32\)"):
        plain.act_batch([obs], [text], seeds=[-1])


def test_torch_backend_acts_row_by_row_from_seeded_generators(monkeypatch):
    import torch

    import defi_jax_torch
    from defi_jax import inference

    class FakeTorchPolicy:   # DeFIPolicyTorch's interface: act on one observation, noise from a generator
        views, resolution = ("primary", "wrist"), RES
        time_pos_emb = torch.zeros(1)

        def act(self, images, instruction, *, generator=None):
            return torch.randn((10, 7), generator=generator).numpy() + images["primary"][0, 0, 0]

    loaded = []
    monkeypatch.setattr(defi_jax_torch.DeFIPolicyTorch, "from_pretrained",
                        classmethod(lambda cls, path, device=None: loaded.append((path, device)) or FakeTorchPolicy()))
    obs = [{v: np.full((RES, RES, 3), i, np.uint8) for v in ("primary", "wrist")} for i in range(3)]
    policy = inference.load_torch("folder", seed=4, device="cpu")
    assert loaded == [(os.path.abspath("folder"), "cpu")] and policy.views == ("primary", "wrist")
    assert policy.device == "cpu"
    first, second = policy.act_batch(obs, ["a"] * 3), policy.act_batch(obs[:1], ["a"])

    def draw(seed):
        return torch.randn((10, 7), generator=torch.Generator().manual_seed(int(seed))).numpy()

    # rows seeded like the JAX backends: call_seeds(seed, call, batch), or the caller's seeds
    np.testing.assert_array_equal(first, np.stack([draw(s) + i for i, s in enumerate(inference.call_seeds(4, 0, 3))]))
    np.testing.assert_array_equal(second, draw(inference.call_seeds(4, 1, 1)[0])[None])
    np.testing.assert_array_equal(policy.act_batch(obs[1:], ["a"] * 2, seeds=[9, 9]), np.stack([draw(9) + 1,
                                                                                              draw(9) + 2]))
    assert first.shape == (3, 10, 7) and not hasattr(policy, "act_and_predict_batch")


def _eval_summary(tasks, wins, *, episodes=10, noise="per row: seeds = ...", workers=2):
    proto = {"tasks": list(tasks), "episodes_per_task": episodes, "horizon": 200, "steps_per_chunk": 10, "seed": 0,
             "resolution": 128, "cameras": dict(mw.CAMERAS), "flip": mw.FLIP, "workers": workers,
             "policy_noise": noise}
    return {"protocol": proto, "episodes": [{"task": t, "episode": e, "success": e in wins.get(t, ())}
                                            for t in tasks for e in range(episodes)]}


def test_compare_pairs_episodes_and_refuses_other_protocols(tmp_path, subprocess_env):
    a = _eval_summary(["reach-v3", "push-v3"], {"reach-v3": set(range(9)), "push-v3": {0, 1}})
    b = _eval_summary(["push-v3"], {"push-v3": {0, 1, 2, 3, 4}}, workers=1)   # shared noise: tasks, workers may differ
    got = mw.compare(a, b)
    assert got["shared_noise"] and list(got["tasks"]) == ["push-v3", "all"]
    assert got["tasks"]["push-v3"] == {"episodes": 10, "a_successes": 2, "b_successes": 5, "only_a": 0, "only_b": 3,
                                       "mcnemar_p": pytest.approx(0.25)}
    old = _eval_summary(["push-v3"], {}, noise="the policy's own (its act_batch takes no seeds)", workers=1)
    with pytest.raises(ValueError, match=r"different protocols: tasks .*workers \(2 vs 1\).*the batches decide"):
        mw.compare(a, old)
    with pytest.raises(ValueError, match=r"horizon \(200 vs 100\)"):
        mw.compare(a, dict(b, protocol=dict(b["protocol"], horizon=100)))
    with pytest.raises(ValueError, match="share no task"):
        mw.compare(a, _eval_summary(["drawer-close-v3"], {}))

    for name, s in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    cmd = [sys.executable, "-m", "launch.compare_evals", f"--a={tmp_path / 'a'}",
           f"--b={tmp_path / 'b' / 'summary.json'}", f"--out={tmp_path / 'cmp.csv'}"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "policy noise: shared per episode" in out.stdout
    assert (tmp_path / "cmp.csv").read_text().splitlines()[1:] == ["push-v3,10,2,5,0,3,0.25", "all,10,2,5,0,3,0.25"]
    out = subprocess.run(cmd[:4] + [f"--b={tmp_path / 'missing'}"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip() == (f"launch.compare_evals: {tmp_path / 'missing'}/summary.json: "
                                                          f"no such file (give a launch.evaluate --out folder or its "
                                                          f"summary.json)")

    # several pairs (e.g. one per fine-tuning seed), pooled: a discordant episode of any pair counts once
    c = _eval_summary(["push-v3"], {"push-v3": {7, 8}})
    pooled = mw.compare_pooled([(a, b), (c, a)])
    assert [r["all"]["only_a"] for r in pooled["pairs"]] == [0, 2] and pooled["pairs"][0] == got["tasks"]
    assert pooled["tasks"]["push-v3"] == {"episodes": 20, "a_successes": 4, "b_successes": 7, "only_a": 2,
                                          "only_b": 5, "mcnemar_p": pytest.approx(0.453125)}
    with pytest.raises(ValueError, match=r"pair 2: the two evaluations ran different protocols: horizon"):
        mw.compare_pooled([(a, b), (a, dict(b, protocol=dict(b["protocol"], horizon=100)))])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "summary.json").write_text(json.dumps(c))
    out = subprocess.run(cmd[:3] + [f"--a={tmp_path / 'a'},{tmp_path / 'c'}", f"--b={tmp_path / 'b'},{tmp_path / 'a'}",
                                    f"--out={tmp_path / 'pooled.csv'}"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pooled over the 2 pairs" in out.stdout
    assert (tmp_path / "pooled.csv").read_text().splitlines()[-1] == "pooled,all,20,4,7,2,5,0.453"


def test_sampler_overrides_and_the_evaluate_flags(tmp_path, subprocess_env):
    """``with_sampler`` (``DeFIPolicy.from_checkpoint(sample_steps=, sample_sigma_min=, gfdm_steps=)``, ``launch.evaluate
    --sample_steps / --sample_sigma_min / --gfdm_steps``) replaces the sampler keys; bad values and a backend that
    cannot take them are refused by name."""
    from configs import policy as policy_configs
    from defi_jax.inference import with_sampler

    c = policy_configs.get_config("tiny")
    assert (c.model.sample_steps, c.model.sample_sigma_min, c.model.gfdm_steps) == (10, 1.0, 1)
    changed = with_sampler(c, sample_steps=4, sample_sigma_min=0.002, gfdm_steps=2)
    assert c.model.sample_sigma_min == 1.0                            # a copy: the given config is left alone
    c = changed
    assert (c.model.sample_steps, c.model.sample_sigma_min, c.model.gfdm_steps) == (4, 0.002, 2)
    assert with_sampler(c).model.sample_sigma_min == 0.002          # None leaves a key as it is
    steps = c.model.gfdm.feature_steps
    for kwargs, message in ((dict(sample_sigma_min=0.0), r"sample_sigma_min=0.0 must be in \(0, "),
                            (dict(sample_sigma_min=80.0), r"sigma_max=80\)"),
                            (dict(sample_steps=0), "sample_steps=0 must be >= 1"),
                            (dict(gfdm_steps=0), r"gfdm_steps=0 must be in \[1, "),
                            (dict(gfdm_steps=steps + 1), rf"model.gfdm.feature_steps={steps}\]")):
        with pytest.raises(ValueError, match=message):
            with_sampler(c, **kwargs)
    proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--exported={tmp_path}", "--sample_sigma_min=0.1",
                           f"--out={tmp_path / 'eval'}"], cwd=REPO, env=subprocess_env(devices=0),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--sample_sigma_min change(s) a checkpoint's config: --backend=jax only" \
        in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "eval").exists()
