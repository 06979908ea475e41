"""LeRobot datasets (v2.1 and v3.0 layouts, written here) as a robot source for every sampler."""

import fractions
import io
import json
import os

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines import actions, arrayrecord, lerobot, oxe_table

FPS = 10
LENGTHS = (20, 20, 20)
TASKS = ("pick up the cube", "open the drawer", "stack the blocks")
SIZE = 32


def _rgb(ep: int, t: int, cam: int) -> tuple[int, int, int]:
    """A flat colour that encodes (episode, step, camera) and survives lossy coding (+-4)."""
    return 10 + 11 * t, 40 + 60 * ep, 60 + 120 * cam


def _decode(frame_HW3: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(c))) for c in frame_HW3.reshape(-1, 3).mean(0))
    ep, t, cam = round((g - 40) / 60), round((r - 10) / 11), round((b - 60) / 120)
    assert np.abs(np.asarray(_rgb(ep, t, cam)) - (r, g, b)).max() <= 4, (r, g, b)
    return ep, t, cam


def _image(ep, t, cam):
    return np.broadcast_to(np.array(_rgb(ep, t, cam), np.uint8), (SIZE, SIZE, 3))


def _raw_action(ep: int, t: int, width: int) -> np.ndarray:
    """Action of (episode, step): component k = 100 ep + t + k / 10; the last of width 8 is a +-1 gripper."""
    a = 100 * ep + t + np.arange(width) / 10
    if width == 8:
        a[7] = 1.0 if t % 3 else -1.0
    return a.astype(np.float32)


def _encoder(codec: str) -> str | None:
    import av

    names = {"h264": ("libx264", "h264"), "av1": ("libsvtav1", "libaom-av1")}[codec]
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - not in this FFmpeg build
            continue
    return None


def _write_video(path, frames_THWC, encoder):
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(encoder, rate=fractions.Fraction(FPS))
        s.width = s.height = SIZE
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = 8            # several keyframes: windows deep in a file need a real seek
        for f in frames_THWC:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _png(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ep, width, start, inline_key=None):
    rows = {"action": [_raw_action(ep, t, width).tolist() for t in range(LENGTHS[ep])],
            "observation.state": [[float(t)] * 2 for t in range(LENGTHS[ep])],
            "timestamp": [t / FPS for t in range(LENGTHS[ep])], "frame_index": list(range(LENGTHS[ep])),
            "episode_index": [ep] * LENGTHS[ep], "index": list(range(start, start + LENGTHS[ep])),
            "task_index": [ep] * LENGTHS[ep]}
    if inline_key:
        rows[inline_key] = [{"bytes": _png(_image(ep, t, 1)), "path": None} for t in range(LENGTHS[ep])]
    return rows


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(rows), str(path))


def _features(width, cameras):
    f = {"action": {"dtype": "float32", "shape": [width]}, "observation.state": {"dtype": "float32", "shape": [2]}}
    for key, dtype in cameras:
        f[key] = {"dtype": dtype, "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"]}
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        f[key] = {"dtype": "float32" if key == "timestamp" else "int64", "shape": [1]}
    return f


def write_v21(root, encoder):
    """v2.1: one parquet and one video per episode; camera 0 a video, camera 1 PNG images inline; 6-D actions;
    stats.json without quantiles (the reader computes them)."""
    info = {"codebase_version": "v2.1", "fps": FPS, "chunks_size": 1000, "total_episodes": len(LENGTHS),
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": _features(6, [("observation.images.top", "video"), ("observation.images.wrist", "image")]),
            "splits": {"train": f"0:{len(LENGTHS)}"}}
    os.makedirs(root / "meta")
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": e, "tasks": [TASKS[e]], "length": n}) + "\n" for e, n in enumerate(LENGTHS)))
    (root / "meta" / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": e, "task": t}) + "\n" for e, t in enumerate(TASKS)))
    start = 0
    for ep, n in enumerate(LENGTHS):
        _write_parquet(root / f"data/chunk-000/episode_{ep:06d}.parquet",
                       _rows(ep, 6, start, inline_key="observation.images.wrist"))
        _write_video(root / f"videos/chunk-000/observation.images.top/episode_{ep:06d}.mp4",
                     np.stack([_image(ep, t, 0) for t in range(n)]), encoder)
        start += n
    all_actions = np.stack([_raw_action(e, t, 6) for e, n in enumerate(LENGTHS) for t in range(n)])
    (root / "meta" / "stats.json").write_text(json.dumps({"action": {
        "mean": all_actions.mean(0).tolist(), "std": all_actions.std(0).tolist(), "min": all_actions.min(0).tolist(),
        "max": all_actions.max(0).tolist(), "count": [len(all_actions)]}}))
    return root


V30_STATS_Q = (-50.0, 400.0)     # stats.json q01 / q99 of every action component (unlike the data's own)


def write_v30(root, encoder):
    """v3.0: episodes 0-1 in data/video file-000, episode 2 in file-001; two video cameras; 8-D actions;
    stats.json with quantiles."""
    cams = ("observation.images.top", "observation.images.wrist")
    info = {"codebase_version": "v3.0", "fps": FPS, "chunks_size": 1000, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 500, "total_episodes": len(LENGTHS),
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": _features(8, [(k, "video") for k in cams]), "splits": {"train": f"0:{len(LENGTHS)}"}}
    os.makedirs(root / "meta")
    (root / "meta" / "info.json").write_text(json.dumps(info))
    files = {0: [0, 1], 1: [2]}
    episodes = {k: [] for k in ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                                "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
                                "meta/episodes/file_index"] + [f"videos/{c}/{x}" for c in cams for x in (
                                    "chunk_index", "file_index", "from_timestamp", "to_timestamp")]}
    start = 0
    for file_index, eps in files.items():
        rows: dict = {}
        for ep in eps:
            for k, v in _rows(ep, 8, start).items():
                rows.setdefault(k, []).extend(v)
            from_ts = sum(LENGTHS[e] for e in eps[:eps.index(ep)]) / FPS
            episodes["episode_index"].append(ep)
            episodes["tasks"].append([TASKS[ep]])
            episodes["length"].append(LENGTHS[ep])
            episodes["data/chunk_index"].append(0)
            episodes["data/file_index"].append(file_index)
            episodes["dataset_from_index"].append(start)
            episodes["dataset_to_index"].append(start + LENGTHS[ep])
            episodes["meta/episodes/chunk_index"].append(0)
            episodes["meta/episodes/file_index"].append(0)
            for c in cams:
                episodes[f"videos/{c}/chunk_index"].append(0)
                episodes[f"videos/{c}/file_index"].append(file_index)
                episodes[f"videos/{c}/from_timestamp"].append(from_ts)
                episodes[f"videos/{c}/to_timestamp"].append(from_ts + LENGTHS[ep] / FPS)
            start += LENGTHS[ep]
        _write_parquet(root / f"data/chunk-000/file-{file_index:03d}.parquet", rows)
        for cam, key in enumerate(cams):
            _write_video(root / f"videos/{key}/chunk-000/file-{file_index:03d}.mp4",
                         np.stack([_image(ep, t, cam) for ep in eps for t in range(LENGTHS[ep])]), encoder)
    _write_parquet(root / "meta/episodes/chunk-000/file-000.parquet", episodes)
    _write_parquet(root / "meta/tasks.parquet", {"task_index": list(range(len(TASKS))), "task": list(TASKS)})
    q = {"q01": [V30_STATS_Q[0]] * 8, "q99": [V30_STATS_Q[1]] * 8}
    (root / "meta" / "stats.json").write_text(json.dumps({"action": {
        "mean": [0.0] * 8, "std": [1.0] * 8, "min": [-60.0] * 8, "max": [500.0] * 8, "count": [60], **q}}))
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    h264 = _encoder("h264")
    if h264 is None:
        pytest.skip("this FFmpeg build has no H.264 encoder")
    root = tmp_path_factory.mktemp("lerobot")
    out = {"v21": write_v21(root / "v21", h264), "v30": write_v30(root / "v30", h264)}
    av1 = _encoder("av1")
    out["v30_av1"] = write_v30(root / "v30_av1", av1) if av1 else None
    return out


@pytest.fixture
def registered(datasets):
    """Both datasets registered (v2.1 with its 6-D actions padded, v3.0 picking 7 of 8 with a +-1 gripper)."""
    lerobot.register_lerobot("lr_v21", str(datasets["v21"]))
    lerobot.register_lerobot("lr_v30", str(datasets["v30"]), action_dims=(0, 1, 2, 3, 4, 5, 7), gripper="signed")
    yield datasets
    for name in ("lr_v21", "lr_v30", "lr_av1", "lr_cli"):
        oxe_table.LEROBOT_DATASETS.pop(name, None)


def _cfg(mixture, **kw):
    cfg = dp.default_data_config()
    cfg.mixture, cfg.resolution, cfg.read_threads = mixture, 16, 2
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _want_actions(ep, ts, width):
    raw = np.stack([_raw_action(ep, min(t, LENGTHS[ep] - 1), width) for t in ts])
    out = np.zeros((len(ts), 7), np.float32)
    if width == 6:
        out[:, :6] = raw                              # zero-padded; the gripper stays 0
    else:
        out[:, :6], out[:, 6] = raw[:, :6], (raw[:, 7] + 1) / 2   # "signed": -1 closed .. 1 open
    return out


def test_register_checks_names_keys_and_layout(registered, tmp_path):
    assert oxe_table.known_datasets()[-2:] == ["lr_v21", "lr_v30"]          # built-in dataset ids unchanged
    assert oxe_table.control_hz("lr_v30") == FPS and oxe_table.has_actions("lr_v21")
    assert dict(oxe_table.LEROBOT_DATASETS["lr_v21"].image_keys) == {
        "primary": "observation.images.top", "wrist": "observation.images.wrist"}
    with pytest.raises(ValueError, match="observation.images.side.*cameras"):
        lerobot.register_lerobot("lr_bad", str(registered["v21"]), image_keys={"primary": "observation.images.side"})
    with pytest.raises(ValueError, match="built-in"):
        lerobot.register_lerobot("bridge", str(registered["v21"]))
    with pytest.raises(FileNotFoundError, match="meta/info.json"):
        lerobot.register_lerobot("lr_none", str(tmp_path))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.0", "fps": 10}))
    with pytest.raises(ValueError, match="v2.0"):
        lerobot.register_lerobot("lr_old", str(tmp_path))


@pytest.mark.parametrize("name,width", [("lr_v21", 6), ("lr_v30", 8)])
def test_policy_window_frames_and_actions(registered, name, width):
    it = dp.make_loader("policy_window", _cfg(name, obs_frames=2, action_horizon=4, normalize_actions=False),
                        global_batch_size=8, seed=0)
    src = it.sources[name]
    assert len(src) == 40                     # 3 episodes, the last held out (eval_fraction)
    seen = set()
    for _ in range(3):
        b = next(it)
        assert b["frames"].shape == (8, 2, 2, 16, 16, 3) and b["actions"].shape == (8, 4, 7)
        assert b["view_mask"].all() and (b["dataset_id"] == oxe_table.known_datasets().index(name)).all()
        for frames, acts, mask, text in zip(b["frames"], b["actions"], b["action_mask"], b["instruction"]):
            ep, t, cam = _decode(frames[0, 1])
            assert cam == 0 and ep in (0, 1) and text == TASKS[ep]
            assert _decode(frames[1, 1]) == (ep, t, 1)                    # wrist: same step, other camera
            assert _decode(frames[0, 0]) == (ep, max(0, t - 1), 0)        # the observation before
            np.testing.assert_allclose(acts, _want_actions(ep, range(t, t + 4), width), atol=1e-5)
            np.testing.assert_array_equal(mask, np.arange(t, t + 4) < LENGTHS[ep])
            seen.add((ep, t))
    assert len({ep for ep, _ in seen}) == 2
    ev = next(dp.make_loader("policy_window", _cfg(name, normalize_actions=False), global_batch_size=4,
                             split="eval"))
    assert set(ev["instruction"]) == {TASKS[2]}
    assert {_decode(f[0, 0])[0] for f in ev["frames"]} == {2}


def test_action_statistics_json_quantiles_or_computed(registered):
    # v3.0: stats.json has q01/q99: used as they are (dims 0-5 and 7 picked).
    cfg = _cfg("lr_v30", action_horizon=3)
    it = dp.make_loader("policy_window", cfg, global_batch_size=4)
    stats = it.sources["lr_v30"].stats
    assert stats["q01"] == [V30_STATS_Q[0]] * 7 and stats["q99"] == [V30_STATS_Q[1]] * 7
    b = next(it)
    for frames, acts in zip(b["frames"], b["actions"]):
        ep, t, _ = _decode(frames[0, 0])
        np.testing.assert_allclose(acts, actions.normalize(_want_actions(ep, range(t, t + 3), 8), stats), atol=1e-5)
    # v2.1: stats.json lacks quantiles: computed from the train episodes' parquet actions, no frame decoded.
    src = dp.make_loader("policy_window", _cfg("lr_v21"), global_batch_size=4).sources["lr_v21"]
    want = arrayrecord.action_stats(np.concatenate([_want_actions(e, range(LENGTHS[e]), 6) for e in (0, 1)]))
    for k in ("mean", "q01", "q99", "min", "max"):
        np.testing.assert_allclose(src.stats[k], want[k], rtol=1e-6)
    assert src.stats["num_steps"] == 40


def test_action_stats_tools_and_inspect_data(registered, tmp_path, capsys):
    from data_pipelines import loader
    from launch import inspect_data

    for name, width in (("lr_v21", 6), ("lr_v30", 8)):
        cfg = _cfg(name)
        # compute_action_stats: the train episodes' parquet actions alone (stats.json not read), no frame decoded
        got = dp.compute_action_stats(name, cfg)
        want = arrayrecord.action_stats(np.concatenate([_want_actions(e, range(LENGTHS[e]), width) for e in (0, 1)]))
        for k in ("mean", "std", "q01", "q99", "min", "max"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=f"{name} {k}")
        assert got["num_steps"] == 40
        # action_stats: what policy_window normalizes with (v3.0: stats.json's quantiles; v2.1: computed)
        stats = dp.action_stats(name, cfg)
        assert stats == loader.open_source(name, cfg, "train", with_stats=True).stats
        assert stats["q01"] == ([V30_STATS_Q[0]] * 7 if name == "lr_v30" else got["q01"])

    inspect_data.main(["--dataset", "lr_v30", "--num", "2", "--size", "16", "--out", str(tmp_path / "sheets")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["instruction"] for line in lines] == list(TASKS[:2])
    for ep, line in enumerate(lines):
        assert line["frames"] == {"primary": [20, 16, 16, 3], "wrist": [20, 16, 16, 3]} and line["actions"] == [20, 7]
        np.testing.assert_allclose(line["first_action"], _want_actions(ep, [0], 8)[0], atol=1e-5)
        assert os.path.isfile(line["contact_sheet"])
    # --lerobot registers a folder as --dataset (a fresh process knows no LeRobot dataset otherwise); v2.1's wrist
    # camera is PNG images inline in the parquet
    inspect_data.main(["--dataset", "lr_cli", "--lerobot", str(registered["v21"]), "--num", "1", "--size", "16"])
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["instruction"] == TASKS[0] and line["frames"] == {"primary": [20, 16, 16, 3], "wrist": [20, 16, 16, 3]}
    np.testing.assert_allclose(line["first_action"], _want_actions(0, [0], 6)[0], atol=1e-5)
    with pytest.raises(SystemExit, match=r"--lerobot=.*nothing: no LeRobot dataset at .*meta/info.json is missing"):
        inspect_data.main(["--dataset", "lr_none", "--lerobot", str(tmp_path / "nothing")])


@pytest.mark.parametrize("name", ["lr_v21", "lr_v30"])
def test_gfdm_clip_and_gidm_pair(registered, name):
    clip = next(dp.make_loader("gfdm_clip", _cfg(name, views=("primary",), num_frames=4, frame_stride=3),
                               global_batch_size=8, seed=2))
    assert clip["frames"].shape == (8, 5, 16, 16, 3)
    for frames in clip["frames"]:
        ep, t, cam = _decode(frames[0])
        assert cam == 0 and [_decode(f) for f in frames] == [(ep, min(t + 3 * k, LENGTHS[ep] - 1), 0)
                                                             for k in range(5)]
    width = 6 if name == "lr_v21" else 8
    pair = next(dp.make_loader("gidm_pair", _cfg(name, pair_seconds=0.5), global_batch_size=8, seed=3))
    n = round(0.5 * FPS)
    assert pair["actions"].shape == (8, n, 7) and pair["has_actions"].all()
    for frames, acts, k in zip(pair["frames"], pair["actions"], pair["num_actions"]):
        ep, t, _ = _decode(frames[0])
        t2 = min(t + n, LENGTHS[ep] - 1)
        assert _decode(frames[1]) == (ep, t2, 0) and k == t2 - t
        np.testing.assert_allclose(acts[:k], _want_actions(ep, range(t, t2), width), atol=1e-5)
        assert not acts[k:].any()


def test_one_seek_per_window_and_camera(registered, monkeypatch):
    import av

    row = oxe_table.LEROBOT_DATASETS["lr_v30"]
    reader = lerobot.EpisodeReader(str(registered["v30"]), row)
    opened, seeks = [], []
    real_open = av.open

    def counting_open(path, *a, **kw):
        c = real_open(path, *a, **kw)
        opened.append(str(path))
        real_seek = c.seek

        class Counted:               # the container, with its seeks counted
            def __getattr__(self, k):
                return getattr(c, k)

            def seek(self, *sa, **skw):
                seeks.append(sa)
                return real_seek(*sa, **skw)

            def __enter__(self):
                c.__enter__()
                return self

            def __exit__(self, *e):
                return c.__exit__(*e)

        return Counted()

    monkeypatch.setattr(av, "open", counting_open)
    ep1 = reader.index["episodes"][1]            # the second episode of file-000: a window deep into the video
    recs = reader.records([ep1["start"] + t for t in (15, 3, 9, 19)])
    got = [_decode(r["primary"]) for r in recs] + [_decode(r["wrist"]) for r in recs]
    assert got == [(1, t, cam) for cam in (0, 1) for t in (15, 3, 9, 19)]
    assert len(opened) == 2 and len(seeks) == 2          # one open + one seek per camera for the whole window
    assert opened[0].endswith("observation.images.top/chunk-000/file-000.mp4")
    # What a grain worker process gets: the reader pickled without its caches, reading the same steps.
    import pickle

    copy = pickle.loads(pickle.dumps(reader))
    ids = [ep1["start"] + t for t in (2, 7)]
    assert [_decode(r["wrist"]) for r in copy.records(ids)] == [(1, 2, 1), (1, 7, 1)]
    np.testing.assert_array_equal(copy.actions[ids], reader.actions[ids])


def test_av1_videos(datasets):
    if datasets["v30_av1"] is None:
        pytest.skip("no AV1 encoder in this FFmpeg build (tried libsvtav1, libaom-av1; libdav1d only decodes)")
    lerobot.register_lerobot("lr_av1", str(datasets["v30_av1"]), action_dims=(0, 1, 2, 3, 4, 5, 7))
    try:
        import av

        with av.open(os.path.join(datasets["v30_av1"], "videos/observation.images.top/chunk-000/file-000.mp4")) as c:
            assert c.streams.video[0].codec_context.name in ("av1", "libdav1d", "libaom-av1")
        clip = next(dp.make_loader("gfdm_clip", _cfg("lr_av1", views=("wrist",), num_frames=3, frame_stride=2),
                                   global_batch_size=4))
        for frames in clip["frames"]:
            ep, t, cam = _decode(frames[0])
            assert cam == 1 and [_decode(f) for f in frames] == [(ep, min(t + 2 * k, 19), 1) for k in range(4)]
    finally:
        oxe_table.LEROBOT_DATASETS.pop("lr_av1", None)


def test_mixture_and_check_sources(registered, tmp_path):
    cfg = _cfg("lr_v21:1,lr_v30:1")                    # the mixture string form: name:weight
    dp.check_sources(cfg, "policy_window")               # both splits of both datasets open
    it = dp.make_loader("gidm_pair", cfg, global_batch_size=8, seed=4)
    assert sorted(it.sources) == ["lr_v21", "lr_v30"] and it.weights == {"lr_v21": 0.5, "lr_v30": 0.5}
    b = next(it)
    assert set(b["dataset"]) <= {"lr_v21", "lr_v30"} and b["frames"].shape == (8, 2, 16, 16, 3)
    cfg = _cfg("lr_v21")
    cfg.paths["lr_v21"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"lr_v21.*missing"):
        dp.check_sources(cfg, "gfdm_clip")
