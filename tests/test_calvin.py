"""CALVIN in its released layout (task_ABC_D/{training,validation}/episode_XXXXXXX.npz + annotations), read in place."""

import json
import os

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines import actions, arrayrecord, calvin

# (first, last) frame of each recorded episode and (first, last, text) of each annotation, per split folder.
_LAYOUT = {
    "training": ([(0, 39), (40, 79), (80, 119)],
                 [(2, 37, "open the drawer"), (45, 79, "Push the Block, left!")]),
    "validation": ([(200, 239)], [(200, 235, "lift the red block")]),
}


def _rel_action(f: int) -> np.ndarray:
    """rel_actions of frame f: 6 deltas in [-1, 1] that encode f, gripper -1 (close) / 1 (open)."""
    return np.array([f / 250, -f / 250, 0.5, (f % 7) / 7, 0.0, -0.25, 1.0 if f % 3 else -1.0], np.float64)


def _write_split(folder, episodes, annotations):
    os.makedirs(folder / "lang_annotations")
    for first, last in episodes:
        for f in range(first, last + 1):
            # Frame f: rgb_static is flat grey f, rgb_gripper flat 255 - f (a resize keeps a flat image's value).
            np.savez_compressed(folder / calvin.frame_name(f),
                                rgb_static=np.full((200, 200, 3), f, np.uint8),
                                rgb_gripper=np.full((84, 84, 3), 255 - f, np.uint8),
                                rel_actions=_rel_action(f), actions=np.zeros(7), robot_obs=np.zeros(15),
                                scene_obs=np.zeros(24))
    np.save(folder / "ep_start_end_ids.npy", np.array(episodes, np.int64))
    ann = {"language": {"ann": [a[2] for a in annotations], "task": ["task"] * len(annotations),
                        "emb": np.zeros((len(annotations), 1, 4), np.float32)},
           "info": {"episodes": [], "indx": [(a[0], a[1]) for a in annotations]}}
    np.save(folder / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    (folder / "statistics.yaml").write_text("act_min_bound: [-1, -1, -1, -1, -1, -1, 0]\n"
                                            "act_max_bound: [1, 1, 1, 1, 1, 1, 1]\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    task = tmp_path_factory.mktemp("calvin") / "task_ABC_D"
    for split, (episodes, annotations) in _LAYOUT.items():
        _write_split(task / split, episodes, annotations)
    return task


def _cfg(task, **kw):
    cfg = dp.calvin_data_config(str(task))
    cfg.resolution = 16
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _starts(split):
    """Allowed start frame -> instruction: every frame of a segment but its last 21 (the reference's windows)."""
    return {t: text for first, last, text in _LAYOUT[split][1] for t in range(first, last + 1 - calvin.MIN_WINDOW)}


def test_policy_window_reads_released_layout(task_dir):
    starts = _starts("training")
    it = dp.make_loader("policy_window", _cfg(task_dir), global_batch_size=8, seed=0)
    assert len(it.sources["calvin_abc_d"]) == len(starts) == (36 - 21) + (35 - 21)
    seen = set()
    for _ in range(4):
        b = next(it)
        assert b["frames"].shape == (8, 2, 1, 16, 16, 3) and b["frames"].dtype == np.uint8
        assert b["actions"].shape == (8, 10, 7) and b["actions"].dtype == np.float32
        assert b["view_mask"].all() and b["action_mask"].all()
        for frames, acts, text in zip(b["frames"], b["actions"], b["instruction"]):
            t = int(frames[0, 0, 0, 0, 0])                          # static view = frame id
            assert (frames[0] == t).all() and (frames[1] == 255 - t).all()   # gripper view of the same frame
            assert starts[t] == text                                # the annotation that covers t
            want = np.stack([_rel_action(f) for f in range(t, t + 10)]).astype(np.float32)
            np.testing.assert_array_equal(acts, want)               # raw rel_actions of frames t..t+9
            seen.add(t)
    assert len({starts[t] for t in seen}) == 2
    ev = next(dp.make_loader("policy_window", _cfg(task_dir), global_batch_size=4, split="eval"))
    assert set(ev["instruction"]) == {"lift the red block"}
    assert set(ev["frames"][:, 0, 0, 0, 0, 0].tolist()) <= set(_starts("validation"))


def test_normalized_actions_and_instructions(task_dir, monkeypatch):
    # Statistics come from rel_actions alone: no frame is read or decoded on the way.
    monkeypatch.setattr(calvin.FrameReader, "records", lambda *a: pytest.fail("read frames for statistics"))
    stats = dp.compute_action_stats("calvin_abc_d", _cfg(task_dir))
    monkeypatch.undo()
    frames = sorted({f for first, last, _ in _LAYOUT["training"][1] for f in range(first, last + 1)})
    want = arrayrecord.action_stats(np.stack([_rel_action(f) for f in frames]).astype(np.float32))
    for k in ("mean", "q01", "q99"):
        np.testing.assert_allclose(stats[k], want[k], rtol=1e-6, atol=1e-7)
    assert stats["num_steps"] == len(frames)
    cfg = _cfg(task_dir, normalize_actions=True, normalize_instructions=True)
    b = next(dp.make_loader("policy_window", cfg, global_batch_size=8, seed=1))
    assert set(b["instruction"]) <= {"open the drawer", "push the block left"}
    for frames, acts in zip(b["frames"], b["actions"]):
        t = int(frames[0, 0, 0, 0, 0])
        raw = np.stack([_rel_action(f) for f in range(t, t + 10)]).astype(np.float32)
        np.testing.assert_allclose(acts, actions.normalize(raw, stats), atol=1e-6)
    assert np.abs(b["actions"]).max() <= 1.0


def test_clip_and_pair_specs_stay_inside_the_segment(task_dir):
    starts = _starts("training")
    ends = {t: last for first, last, _ in _LAYOUT["training"][1] for t in range(first, last + 1)}
    clip = next(dp.make_loader("gfdm_clip", _cfg(task_dir, views=("primary",), num_frames=4, frame_stride=8),
                               global_batch_size=8))
    assert clip["frames"].shape == (8, 5, 16, 16, 3)
    for frames in clip["frames"]:
        t = int(frames[0, 0, 0, 0])
        assert t in starts
        np.testing.assert_array_equal(frames[:, 0, 0, 0], [min(t + 8 * k, ends[t]) for k in range(5)])
    pair = next(dp.make_loader("gidm_pair", _cfg(task_dir, pair_spacing="reference"), global_batch_size=8))
    assert pair["actions"].shape == (8, 9, 7) and (pair["num_actions"] == 9).all()   # W = 10: 9 steps apart
    t = pair["frames"][:, 0, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(pair["frames"][:, 1, 0, 0, 0], t + 9)
    for ti, acts in zip(t, pair["actions"]):
        np.testing.assert_array_equal(acts, np.stack([_rel_action(f) for f in range(ti, ti + 9)]).astype(np.float32))


def test_missing_or_partial_layout_names_the_folder(task_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.paths\.calvin_abc_d.*task_ABC_D"):
        dp.make_loader("policy_window", _cfg(tmp_path / "nowhere"), global_batch_size=2)
    # A root that holds the task folder works as well as the task folder itself; the paths key exists already, so
    # a locked config (what --config.data.paths.calvin_abc_d=... overrides) takes it.
    cfg = dp.default_data_config()
    cfg.mixture, cfg.resolution, cfg.normalize_actions = "calvin_abc_d", 16, False
    cfg.lock()
    cfg.paths.calvin_abc_d = os.path.dirname(task_dir)
    assert len(dp.make_loader("policy_window", cfg, global_batch_size=2).sources["calvin_abc_d"]) == 29


def test_inspect_data_reads_calvin(task_dir, tmp_path, capsys):
    from launch import inspect_data

    inspect_data.main(["--dataset", "calvin_abc_d", "--data_dir", str(task_dir), "--num", "2", "--size", "16",
                       "--out", str(tmp_path)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["instruction"] for x in lines] == ["open the drawer", "Push the Block, left!"]
    assert lines[0]["frames"] == {"primary": [36, 16, 16, 3], "wrist": [36, 16, 16, 3]}
    assert lines[0]["actions"] == [36, 7] and lines[0]["source"].endswith(calvin.frame_name(2))
    np.testing.assert_allclose(lines[0]["first_action"], _rel_action(2), atol=1e-5)
    assert os.path.exists(lines[0]["contact_sheet"])
