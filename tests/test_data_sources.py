"""Each source on fixtures written in its real on-disk format: TFDS RLDS (-> ArrayRecord), SSv2, Ego4D."""

import json
import os

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines import convert, rlds, video


def _cfg(root, mixture, **kw):
    cfg = dp.default_data_config()
    cfg.data_dir = str(root)
    cfg.mixture = mixture
    cfg.resolution = 16
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _bridge_step(e, t, instruction):
    """An OXE "bridge" step: nested action dict, instruction in the observation, image colour = 10 t + e."""
    return {"observation": {"image": np.full((24, 32, 3), 10 * t + e, np.uint8),
                            "natural_language_instruction": instruction,
                            "state": np.zeros(7, np.float32)},
            "action": {"world_vector": np.array([t, 0.1 * e, -t], np.float32),
                       "rotation_delta": np.array([0.01 * t, 0, 0], np.float32),
                       "open_gripper": np.bool_(t % 2 == 0), "terminate_episode": np.float32(0)}}


@pytest.fixture(scope="module")
def bridge_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oxe")
    train = [{"steps": [_bridge_step(e, t, f"task {e}") for t in range(6 + e)]} for e in range(4)]
    train.append({"steps": [_bridge_step(9, t, "") for t in range(5)]})      # empty instruction: skipped
    test = [{"steps": [_bridge_step(7, t, "held out") for t in range(5)]}]
    rlds.write_rlds(str(root), "bridge", {"train": train, "test": test})
    summary = convert.convert("bridge", str(root / "bridge"), max_failure_fraction=0.5)
    return root, summary


def test_rlds_convert_standardizes_and_counts_bad_episodes(bridge_root):
    root, summary = bridge_root
    assert summary["splits"]["train"] == {"episodes": 4, "steps": 6 + 7 + 8 + 9, "skipped": 1}
    assert summary["splits"]["eval"]["episodes"] == 1
    assert "empty instruction" in summary["failures"][0]
    d = os.path.join(root, "bridge", "arrayrecord")
    stats = json.load(open(os.path.join(d, "action_stats.json")))
    assert set(stats) >= {"mean", "std", "q01", "q99"} and len(stats["q99"]) == 7
    actions = np.load(os.path.join(d, "train_actions.npy"))
    index = json.load(open(os.path.join(d, "train_index.json")))
    for ep in index["episodes"]:
        e = int(ep["instruction"].split()[-1])
        a = actions[ep["start"]:ep["start"] + ep["length"]]
        t = np.arange(ep["length"])
        np.testing.assert_allclose(a[:, :3], np.stack([t, 0.1 * e + 0 * t, -t], 1), atol=1e-6)
        np.testing.assert_allclose(a[:, 3], 0.01 * t, atol=1e-6)
        np.testing.assert_array_equal(a[:, 6], (t % 2 == 0).astype(np.float32))   # open_gripper: 1 = open


def test_rlds_samplers_read_the_right_frames(bridge_root):
    root, _ = bridge_root
    index = json.load(open(os.path.join(root, "bridge", "arrayrecord", "train_index.json")))
    starts = np.array([ep["start"] for ep in index["episodes"]])
    it = dp.make_loader("gfdm_clip", _cfg(root, "bridge", num_frames=3, frame_stride=2, eval_fraction=0.0),
                        global_batch_size=16)
    b = next(it)
    assert b["frames"].shape == (16, 4, 16, 16, 3)
    for frames, item, text in zip(b["frames"], b["item_id"], b["instruction"]):
        ep = int(np.searchsorted(starts, item, side="right") - 1)
        e, t, L = int(text.split()[-1]), int(item - starts[ep]), index["episodes"][ep]["length"]
        want = [10 * min(t + 2 * k, L - 1) + e for k in range(4)]
        np.testing.assert_allclose(frames.reshape(4, -1).mean(1), want, atol=2.5)   # JPEG of a flat colour
    pair = next(dp.make_loader("gidm_pair", _cfg(root, "bridge", pair_seconds=0.6), global_batch_size=4))
    assert pair["actions"].shape == (4, 3, 7)   # round(0.6 s x 5 Hz)
    assert pair["has_actions"].all()
    pol = next(dp.make_loader("policy_window", _cfg(root, "bridge"), global_batch_size=4))
    assert pol["frames"].shape == (4, 2, 1, 16, 16, 3)
    assert (pol["view_mask"] == [True, False]).all() and not pol["frames"][:, 1].any()   # bridge: no wrist camera
    assert np.abs(pol["actions"]).max() <= 1.0 and set(np.unique(pol["actions"][..., 6])) <= {-1.0, 1.0}
    ev = next(dp.make_loader("gfdm_clip", _cfg(root, "bridge", num_frames=1), global_batch_size=2, split="eval"))
    assert set(ev["instruction"]) == {"held out"}


def test_rlds_without_conversion_says_how_to_convert(tmp_path):
    os.makedirs(tmp_path / "kuka")
    with pytest.raises(FileNotFoundError, match="launch.convert_rlds --dataset kuka"):
        dp.make_loader("gfdm_clip", _cfg(tmp_path, "kuka"), global_batch_size=2)


def _ramp(n, h=48, w=64, scale=8):
    return np.stack([np.full((h, w, 3), min(255, scale * i), np.uint8) for i in range(n)])


@pytest.fixture(scope="module")
def ssv2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssv2")
    vids = os.path.join(root, video.SSV2_VIDEOS)
    for i in range(3):
        video.write_video(os.path.join(vids, f"{i}.webm"), _ramp(24), fps=12)
    os.makedirs(vids, exist_ok=True)
    with open(os.path.join(vids, "3.webm"), "wb") as f:                       # undecodable
        f.write(os.urandom(2000))
    os.makedirs(root / "labels")
    train = [{"id": str(i), "label": f"moving something {i}", "template": "Moving [something]",
              "placeholders": ["something"]} for i in range(4)]
    json.dump(train, open(root / "labels" / "train.json", "w"))
    json.dump(train[:1], open(root / "labels" / "validation.json", "w"))
    return root


def test_ssv2_clips_resample_and_skip_corrupt_file(ssv2_root):
    root = os.path.dirname(ssv2_root)
    cfg = _cfg(root, {"ssv2": 1.0}, num_frames=4, frame_stride=2, max_failure_fraction=0.5,
               paths={"ssv2": str(ssv2_root)})
    it = dp.make_loader("gfdm_clip", cfg, global_batch_size=12)
    b = next(it)
    assert b["frames"].shape == (12, 5, 16, 16, 3)
    means = b["frames"].reshape(12, 5, -1).mean(-1)
    np.testing.assert_allclose(np.diff(means, axis=1), 16, atol=4)   # 12 fps source, stride 2 -> +2 frames
    assert set(b["instruction"]) <= {f"moving something {i}" for i in range(3)}
    failed, attempted, files = it.failures()["ssv2"]
    assert failed >= 1 and attempted >= 12 + failed   # (read-ahead may have attempted more)
    assert all("3.webm" in f for f in files)
    pair = next(dp.make_loader("gidm_pair", cfg, global_batch_size=2, split="eval"))
    assert not pair["has_actions"].any() and pair["instruction"][0] == "moving something 0"
    np.testing.assert_allclose(pair["frames"][:, 1].mean((1, 2, 3)) - pair["frames"][:, 0].mean((1, 2, 3)),
                               96, atol=6)   # 1 s apart at 12 fps = 12 frames


def test_failure_fraction_stops_naming_the_files(ssv2_root, tmp_path):
    bad = tmp_path / "ssv2"
    os.makedirs(bad / video.SSV2_VIDEOS)
    os.makedirs(bad / "labels")
    os.symlink(os.path.join(ssv2_root, video.SSV2_VIDEOS, "0.webm"), bad / video.SSV2_VIDEOS / "0.webm")
    for i in range(1, 4):
        (bad / video.SSV2_VIDEOS / f"{i}.webm").write_bytes(b"not a video")
    json.dump([{"id": str(i), "label": "x"} for i in range(4)], open(bad / "labels" / "train.json", "w"))
    cfg = _cfg(tmp_path, "ssv2", num_frames=1, max_failure_fraction=0.25, min_failures_checked=8)
    it = dp.make_loader("gfdm_clip", cfg, global_batch_size=4)
    with pytest.raises(Exception, match=r"(?s)max_failure_fraction=0.25.*[123]\.webm"):
        for _ in range(20):
            next(it)


def test_ego4d_windows_around_narrations(tmp_path):
    root = tmp_path / "ego4d"
    narr = {}
    for k, uid in enumerate(["a0", "b1", "c2"]):
        video.write_video(os.path.join(root, video.EGO4D_VIDEOS, f"{uid}.mp4"), _ramp(180, scale=1), fps=30)
        narr[uid] = {"narration_pass_1": {"narrations": [
            {"timestamp_sec": 3.0, "narration_text": f"#C C picks up the cup {k}"},
            {"timestamp_sec": 4.5, "narration_text": ""}]}}                  # empty: skipped and counted
    os.makedirs(os.path.dirname(root / video.EGO4D_NARRATIONS))
    json.dump(narr, open(root / video.EGO4D_NARRATIONS, "w"))
    it = dp.make_loader("gfdm_clip", _cfg(tmp_path, "ego4d", num_frames=4, max_failure_fraction=0.6),
                        global_batch_size=6)
    b = next(it)
    assert set(b["instruction"]) <= {"picks up the cup 0", "picks up the cup 1"}   # c2 is the held-out video
    means = b["frames"].reshape(6, 5, -1).mean(-1)
    np.testing.assert_allclose(np.diff(means, axis=1), 3, atol=1.5)        # 30 fps resampled to 10 fps
    assert (means[:, 0] >= 30 - 3).all() and (means[:, -1] <= 150 + 3).all()   # inside 3.0 s +- 2 s
    assert it.failures()["ego4d"][0] >= 1
    ev = next(dp.make_loader("gfdm_clip", _cfg(tmp_path, "ego4d", num_frames=1), global_batch_size=1, split="eval"))
    assert ev["instruction"][0] == "picks up the cup 2"


def test_clean_narration():
    assert video.clean_narration("#C C opens the drawer #unsure") == "opens the drawer"
    assert video.clean_narration("#c C  cuts onion") == "cuts onion"


def test_rlds_corrupt_shard_loses_only_that_file(tmp_path):
    """An OXE dataset with a flat action vector, a wrist camera and step-level instructions (e.g. fmb)."""
    def step(e, t):
        return {"observation": {"image_side_1": np.full((16, 16, 3), 40 + e, np.uint8),
                                "image_wrist_1": np.full((16, 16, 3), 90 + e, np.uint8)},
                "action": np.full(7, 0.5, np.float32), "language_instruction": f"insert peg {e}"}
    eps = [{"steps": [step(e, t) for t in range(4)]} for e in range(6)]
    rlds.write_rlds(str(tmp_path), "fmb", {"train": eps}, num_shards=2)
    shards = sorted(str(p) for p in (tmp_path / "fmb" / "1.0.0").glob("fmb-train.tfrecord-*"))
    assert len(shards) == 2
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2])                       # truncated file
    summary = convert.convert("fmb", str(tmp_path / "fmb"), max_failure_fraction=0.9)
    assert summary["splits"]["train"]["episodes"] >= 1
    assert len(summary["failures"]) == 1 and os.path.basename(shards[1]) in summary["failures"][0]
    b = next(dp.make_loader("policy_window", _cfg(tmp_path, "fmb", eval_fraction=0.0), global_batch_size=2))
    assert b["view_mask"].all() and b["frames"][:, 1].mean() > b["frames"][:, 0].mean() + 40   # wrist = 90 + e
    assert (b["actions"][..., 6] == 0).all()    # "closed" convention: 1 - 0.5 = 0.5 open -> 0 in [-1, 1]


def test_truncated_episode_at_read_time_is_skipped(bridge_root, tmp_path):
    import shutil

    src, _ = bridge_root
    shutil.copytree(os.path.join(src, "bridge"), tmp_path / "bridge")
    path = tmp_path / "bridge" / "arrayrecord" / "train_index.json"
    index = json.load(open(path))
    index["episodes"][-1]["length"] += 50                                     # claims steps that are not there
    json.dump(index, open(path, "w"))
    it = dp.make_loader("gfdm_clip", _cfg(tmp_path, "bridge", num_frames=1, eval_fraction=0.0,
                                          max_failure_fraction=0.9), global_batch_size=32)
    b = next(it)
    failed, _, files = it.failures()["bridge"]
    assert failed >= 1 and all("step" in f for f in files)
    assert len(b["frames"]) == 32


def test_reference_pair_spacing_and_instruction_text(tmp_path):
    """data.pair_spacing="reference": fractal pairs are the ends of a random 3-5 step window (n = 2..4 steps apart);
    data.normalize_instructions: the reference GIDM's lower-case text without punctuation."""
    def step(e, t):
        return {"observation": {"image": np.full((16, 16, 3), 20 * t + e, np.uint8),
                                "natural_language_instruction": f"Pick up the Coke can, #{e}!"},
                "action": {"world_vector": np.array([t, 0, 0], np.float32), "rotation_delta": np.zeros(3, np.float32),
                           "gripper_closedness_action": np.zeros(1, np.float32)}}
    rlds.write_rlds(str(tmp_path), "fractal20220817_data",
                    {"train": [{"steps": [step(e, t) for t in range(12)]} for e in range(3)]})
    convert.convert("fractal20220817_data", str(tmp_path / "fractal20220817_data"))
    cfg = _cfg(tmp_path, "fractal", pair_spacing="reference", normalize_instructions=True, eval_fraction=0.0)
    assert dp.validate_data_config(cfg) is None
    it = dp.make_loader("gidm_pair", cfg, global_batch_size=16, seed=2)
    gaps = []
    for _ in range(4):
        b = next(it)
        assert b["actions"].shape == (16, 4, 7)                          # padded to the largest n: W = 5
        assert set(b["instruction"]) <= {f"pick up the coke can {e}" for e in range(3)}
        v = b["frames"].reshape(16, 2, -1).mean(-1)
        t1, t2 = np.round((v[:, 0] - 1) / 20).astype(int), np.round((v[:, 1] - 1) / 20).astype(int)  # 20 t + e
        n = b["num_actions"]
        np.testing.assert_array_equal(t2 - t1, n)
        last = b["actions"][np.arange(16), np.maximum(n - 1, 0), 0]          # action of step t2 - 1 (x = t)
        np.testing.assert_array_equal(last[n > 0], (t1 + n - 1)[n > 0])
        gaps += n[t1 + 4 <= 11].tolist()                                  # windows not clamped at the episode end
    assert set(gaps) == {2, 3, 4}
    assert dp.normalize_instruction("Put the Block in the drawer.") == "put the block in the drawer"
    cfg.pair_spacing = "frames"
    with pytest.raises(ValueError, match=r"data\.pair_spacing='frames'"):
        dp.validate_data_config(cfg)
