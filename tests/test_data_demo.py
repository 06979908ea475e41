"""The demo-data generator writes real RLDS that the RLDS source reads back, and make_loader serves it."""

import json
import os

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines import demo


def _cfg(root, **kw):
    cfg = dp.default_data_config()
    cfg.data_dir = root
    cfg.resolution = 32
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_demo_rlds_reads_back_with_tfds(demo_data_dir):
    from data_pipelines import rlds

    episodes = [ep for _, ep in rlds.read_rlds(os.path.join(demo_data_dir, "demo"), "demo")]
    assert len(episodes) == 9 and not any(isinstance(e, Exception) for e in episodes)
    texts = {demo.instruction(t) for t in ("reach-v3", "push-v3", "button-press-v3")}
    assert {e["instruction"] for e in episodes} == texts
    for e in episodes:
        T = len(e["views"]["primary"])
        assert len(e["views"]["wrist"]) == T > 10
        assert e["actions"].shape == (T, 7)
        assert np.all(e["actions"][:, 3:6] == 0)                       # no rotation in Meta-World
        assert np.all((e["actions"][:, 6] >= 0) & (e["actions"][:, 6] <= 1))
    # The converted copy holds the same episodes and step counts.
    with open(os.path.join(demo_data_dir, "demo", "arrayrecord", "train_index.json")) as f:
        index = json.load(f)
    assert sorted(ep["length"] for ep in index["episodes"]) == sorted(len(e["views"]["primary"]) for e in episodes)
    assert index["views"] == ["primary", "wrist"]
    # The demo data is generated in a temporary folder and renamed: episode sources must name files that exist.
    for ep in index["episodes"]:
        shard = ep["source"].rsplit("[", 1)[0]
        assert ".demo-" not in ep["source"] and os.path.exists(os.path.join(demo_data_dir, "demo", shard))
    # Only the scripted experts' successful episodes are kept; their success is recorded.
    done = json.load(open(os.path.join(demo_data_dir, demo.DONE)))
    assert set(done["expert_success"]) == {"reach-v3", "push-v3", "button-press-v3"}
    assert all(e["successes"] == 3 and e["attempts"] >= 3 for e in done["expert_success"].values())
    labels = json.load(open(os.path.join(demo_data_dir, "demo_human", "labels", "train.json")))
    assert labels and all(lab["label"] == demo.instruction("drawer-close-v3") for lab in labels)


@pytest.mark.parametrize("spec", dp.SPECS)
def test_demo_loader_specs(demo_data_dir, spec):
    cfg = _cfg(demo_data_dir, num_frames=4, frame_stride=2, pair_seconds=0.25,
               mixture="demo_robot" if spec == "policy_window" else "demo")
    it = dp.make_loader(spec, cfg, global_batch_size=8, seed=3)
    b = next(it)
    n_frames = {"gfdm_clip": 5, "gidm_pair": 2}.get(spec)
    if spec == "policy_window":
        assert b["frames"].shape == (8, 2, 1, 32, 32, 3)
        assert b["actions"].shape == (8, 10, 7) and np.abs(b["actions"]).max() <= 1.0
        assert b["view_mask"].all()
    else:
        assert b["frames"].shape == (8, n_frames, 32, 32, 3)
    assert b["frames"].dtype == np.uint8 and b["frames"].std() > 5   # real rendered pixels, not blank
    if spec == "gidm_pair":
        robot = b["dataset"] == "demo"
        assert (b["has_actions"] == robot).all()
        assert b["actions"].shape == (8, 20, 7)                         # round(0.25 s x 80 Hz)
        assert (b["num_actions"][~robot] == 0).all() and not b["actions"][~robot].any()
    assert set(b["instruction"]) <= {demo.instruction(t) for t in demo.INSTRUCTIONS}
    # Same seed -> identical batch; other seed -> different order.
    again = next(dp.make_loader(spec, cfg, global_batch_size=8, seed=3))
    assert all(np.array_equal(b[k], again[k]) for k in b)
    other = next(dp.make_loader(spec, cfg, global_batch_size=8, seed=4))
    assert not np.array_equal(b["item_id"], other["item_id"])


def test_demo_transform_makes_batches_numeric(demo_data_dir):
    cfg = _cfg(demo_data_dir, num_frames=2)
    b = next(dp.make_loader("gfdm_clip", cfg, global_batch_size=4, transform=_TokenizeLength()))
    assert set(b) == {"frames", "tokens", "dataset_id", "item_id"}
    assert all(v.dtype != object for v in b.values())


class _TokenizeLength:
    """A stand-in tokenizer: picklable, runs per sample in the grain workers."""

    def __call__(self, sample):
        sample = dict(sample)
        text = sample.pop("instruction")
        sample.pop("dataset")
        sample["tokens"] = np.frombuffer(text.encode()[:16].ljust(16, b"\0"), np.uint8).astype(np.int32)
        return sample


def test_inspect_data_prints_json_lines_and_contact_sheets(demo_data_dir, tmp_path, capsys):
    from launch import inspect_data

    inspect_data.main(["--dataset", "demo", "--data_dir", demo_data_dir, "--num", "2", "--out", str(tmp_path),
                       "--size", "32"])
    inspect_data.main(["--dataset", "demo_human", "--data_dir", demo_data_dir, "--num", "1", "--out",
                       str(tmp_path), "--size", "32"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["dataset"] for x in lines] == ["demo", "demo", "demo_human"]
    robot = lines[0]
    T = robot["actions"][0]
    assert robot["frames"] == {"primary": [T, 32, 32, 3], "wrist": [T, 32, 32, 3]} and robot["actions"] == [T, 7]
    assert len(robot["first_action"]) == 7 and lines[2]["actions"] is None
    from PIL import Image

    assert Image.open(robot["contact_sheet"]).size == (8 * 96, 2 * 96)   # 8 frames x (primary, wrist)
    stats = dp.action_stats("demo", _cfg(demo_data_dir))
    assert len(stats["q99"]) == 7 and stats["num_steps"] > 100


def test_demo_rollouts_are_deterministic_for_a_seed():
    # Rendered in a spawned process, as make_demo_data does (MuJoCo's EGL and TensorFlow cannot share one).
    a, b, c = demo._rollouts([("reach-v3", 1, 24, 0, False), ("reach-v3", 1, 24, 0, False),
                              ("reach-v3", 1, 24, 1, False)], max_steps=12)
    np.testing.assert_array_equal(a[0]["frames"], b[0]["frames"])
    np.testing.assert_array_equal(a[0]["actions"], b[0]["actions"])
    assert a[0]["frames"].shape == (12, 24, 24, 3) and a[0]["frames"].std() > 5
    assert not np.array_equal(a[0]["states"], c[0]["states"])                  # another seed, another goal


def test_default_demo_tasks_and_the_generation_knobs_reach_the_generator(monkeypatch, tmp_path):
    """The demo's robot tasks (closed-loop evaluated) and human-video tasks are distinct, each has its
    instruction, and ensure_demo_data generates with this module's episode counts (not the CLI's)."""
    import subprocess

    assert not set(demo.ROBOT_TASKS) & set(demo.HUMAN_TASKS)
    assert all(t in demo.INSTRUCTIONS for t in demo.ROBOT_TASKS + demo.HUMAN_TASKS)
    calls = []

    def generator(args, **kwargs):     # stands in for the launch.make_demo_data process
        calls.append(args)
        return subprocess.CompletedProcess(args, 1, "", "generator stopped by the test")

    monkeypatch.setattr(demo.subprocess, "run", generator)
    for kwargs, episodes, human in (({}, demo.EPISODES, demo.HUMAN_EPISODES), ({"episodes": 2}, 2, demo.HUMAN_EPISODES),
                                    ({"episodes": 2, "human_episodes": 1}, 2, 1)):
        with pytest.raises(RuntimeError, match="generator stopped by the test"):
            demo.ensure_demo_data(str(tmp_path / "demo"), **kwargs)
        args = calls[-1]
        assert args[args.index("--episodes") + 1] == str(episodes), kwargs
        assert args[args.index("--human_episodes") + 1] == str(human), kwargs
    assert not os.path.exists(tmp_path / "demo")


def test_expert_noise_perturbs_the_path_and_keeps_the_experts_labels(subprocess_env):
    """DART: with ``expert_noise`` the executed actions are noisy, so the states leave the clean expert's path,
    while every recorded action is the expert's own (clipped) action at the recorded state; seeded."""
    import subprocess
    import sys

    code = r"""
import numpy as np
from metaworld.policies import ENV_POLICY_MAP
from data_pipelines import demo
run = lambda noise: demo.rollout_task("reach-v3", 1, 16, 0, wrist=False, max_steps=25, expert_noise=noise)[0]
clean, noisy, again = run(0.0), run(0.5), run(0.5)
expert = ENV_POLICY_MAP["reach-v3"]()
labels = np.stack([np.clip(expert.get_action(s), -1, 1) for s in noisy["states"]]).astype(np.float32)
np.testing.assert_allclose(noisy["actions"], labels, atol=1e-5)   # (states recorded as float32)
np.testing.assert_array_equal(noisy["states"], again["states"])
assert np.array_equal(clean["states"][0], noisy["states"][0])          # the same reset
gap = np.abs(clean["states"][1:, :3] - noisy["states"][1:, :3]).max()
assert gap > 1e-3, gap                                               # then another path
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices=0, MUJOCO_GL="egl"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
