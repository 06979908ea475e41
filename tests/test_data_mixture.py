"""Mixtures: proportions, human-video fraction, data fraction, disjoint process shards, exact resume."""

import json
import os

import numpy as np
import pytest

import data_pipelines as dp
from data_pipelines import loader, mixtures


def _cfg(root, **kw):
    cfg = dp.default_data_config()
    cfg.data_dir = root
    cfg.resolution = 8
    cfg.num_frames = 1
    cfg.pair_seconds = 0.1
    for k, v in kw.items():
        cfg[k] = v
    return cfg


class _Which:
    def __init__(self, k):
        self.k = k

    def __call__(self, i, rng):
        return self.k


def test_mixture_proportions_within_2_percent_over_10k():
    weights = mixtures.apply_human_video_fraction(mixtures.resolve("gidm_paper"), None)
    names = sorted(weights)
    ds = loader.mix([50 + 7 * k for k in range(len(names))], [_Which(k) for k in range(len(names))],
                    [weights[n] for n in names], seed=0)
    counts = np.bincount([ds[i] for i in range(10_000)], minlength=len(names)) / 10_000
    for k, n in enumerate(names):
        assert abs(counts[k] - weights[n]) <= 0.02 * max(weights[n], 0.05), (n, counts[k], weights[n])
    assert abs(counts[names.index("fractal20220817_data")] - 0.163) < 0.005


def test_presets_and_human_video_fraction():
    assert mixtures.resolve("gfdm_released") == {"ssv2": 0.4, "bridge": 0.2, "fractal20220817_data": 0.2,
                                                 "calvin": 0.2}
    assert abs(sum(mixtures.GIDM_PAPER.values()) - 100.0) < 0.2
    w = mixtures.apply_human_video_fraction(mixtures.resolve("gfdm_paper"), 0.5)
    assert abs(w["ssv2"] + w["ego4d"] - 0.5) < 1e-9 and abs(w["ssv2"] - w["ego4d"]) < 1e-9
    assert abs(w["fractal20220817_data"] / w["bridge"] - 3.0) < 1e-9       # robot ratios kept
    assert "ssv2" not in mixtures.apply_human_video_fraction(mixtures.resolve("gfdm_paper"), 0.0)
    assert set(mixtures.apply_human_video_fraction(mixtures.resolve("gfdm_paper"), 1.0)) == {"ssv2", "ego4d"}
    assert mixtures.resolve("bridge:2,ssv2:1") == {"bridge": 2.0, "ssv2": 1.0}


def test_config_validation_names_the_key():
    cfg = dp.default_data_config()
    dp.validate_data_config(cfg)
    cfg.mixture = {"bridge": 1.0, "not_a_dataset": 1.0}
    with pytest.raises(ValueError, match=r"data\.mixture.*'not_a_dataset'"):
        dp.validate_data_config(cfg)
    cfg.mixture = "gfdm_paper"
    cfg.human_video_fraction = 1.5
    with pytest.raises(ValueError, match=r"data\.human_video_fraction"):
        dp.validate_data_config(cfg)
    cfg.human_video_fraction = None
    cfg.paths = {"brige": "/x"}
    with pytest.raises(ValueError, match=r"data\.paths.*'brige'"):
        dp.validate_data_config(cfg)


@pytest.mark.parametrize("fraction,expect", [(0.0, {"demo"}), (1.0, {"demo_human"})])
def test_human_video_fraction_end_to_end(demo_data_dir, fraction, expect):
    it = dp.make_loader("gfdm_clip", _cfg(demo_data_dir, human_video_fraction=fraction), global_batch_size=24)
    assert set(next(it)["dataset"]) == expect


def test_mixture_end_to_end_roughly_follows_weights(demo_data_dir):
    it = dp.make_loader("gidm_pair", _cfg(demo_data_dir, human_video_fraction=0.25), global_batch_size=40)
    human = np.mean([np.mean(next(it)["dataset"] == "demo_human") for _ in range(5)])
    assert abs(human - 0.25) <= 0.03


def _train_lengths(root):
    index = json.load(open(os.path.join(root, "demo", "arrayrecord", "train_index.json")))
    return [ep["length"] for ep in index["episodes"]][:-1]     # the last episode is the eval hold-out


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover(demo_data_dir, process_count):
    seen = []
    for p in range(process_count):
        it = dp.make_loader("gidm_pair", _cfg(demo_data_dir, mixture="demo_robot"), global_batch_size=process_count,
                            process_index=p, process_count=process_count, seed=5)
        n = len(it.sources["demo"])
        ids = np.concatenate([next(it)["item_id"] for _ in range(n)])
        assert len(set(ids.tolist())) == n          # one pass over this process's shard, no repeats
        seen.append(set(ids.tolist()))
    for a in range(process_count):
        for b in range(a + 1, process_count):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == set(range(sum(_train_lengths(demo_data_dir))))


def test_data_fraction_and_hold_out_spread_over_the_tasks(demo_data_dir):
    # 3 tasks x 3 episodes: a contiguous fraction or hold-out would cover some tasks only
    lengths = _train_lengths(demo_data_dir)
    it = dp.make_loader("gidm_pair", _cfg(demo_data_dir, mixture="demo_robot", data_fraction=0.5),
                        global_batch_size=16)
    src = it.sources["demo"]
    kept = src.episodes.tolist()
    assert len(kept) == 4                                              # ceil(8 x 0.5)
    assert len(src) == sum(lengths[e] for e in kept)
    tasks = {src.reader.index["episodes"][e]["instruction"] for e in src.episodes}
    assert len(tasks) == 3
    ids = np.concatenate([next(it)["item_id"] for _ in range(5)])   # what the loader yields: kept episodes only
    assert ids.max() < len(src) and set(src.item_ep[ids].tolist()) <= set(kept)
    assert loader._holdout(80, "eval", 0.05, 1.0).tolist() == [19, 39, 59, 79]   # one per block of 20
    train = loader._holdout(80, "train", 0.05, 0.25)
    assert len(train) == 19 and all(np.sum((train >= 20 * k) & (train < 20 * k + 20)) >= 4 for k in range(4))
    assert not set(train) & {19, 39, 59, 79}
    assert loader._holdout(80, "train", 0.05, 1.0).tolist() == sorted(set(range(80)) - {19, 39, 59, 79})
    assert loader._holdout(3, "eval", 0.05, 1.0).tolist() == [2] and loader._holdout(1, "eval", 0.05, 1.0).size == 0


def test_hold_out_and_fraction_stratified_by_task_in_any_stored_order():
    # the demo's converted episodes come shuffled: spreading over the stored order held out 2 drawer-close and
    # 2 door-close episodes and kept no handle-press label at a tenth; spread over the tasks, each gets its share
    tasks = np.random.default_rng(0).permutation(np.repeat(["drawer", "door", "handle", "plate"], 20)).tolist()
    held = loader._holdout(80, "eval", 0.05, 1.0, tasks)
    assert sorted(tasks[e] for e in held) == ["door", "drawer", "handle", "plate"]
    for fraction, per_task in ((1.0, 19), (0.25, 4), (0.1, 2)):
        train = loader._holdout(80, "train", 0.05, fraction, tasks)
        assert not set(train) & set(held) and list(train) == sorted(train)
        counts = {t: sum(tasks[e] == t for e in train) for t in set(tasks)}
        assert min(counts.values()) >= per_task and max(counts.values()) <= per_task + 1, (fraction, counts)
    assert np.sort(loader._holdout(80, "train", 0.05, 1.0, tasks)).tolist() == sorted(set(range(80)) - set(held))
    with pytest.raises(ValueError, match="3 group labels for 80 episodes"):
        loader._holdout(80, "eval", 0.05, 1.0, tasks[:3])


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_yields_the_identical_next_batch(demo_data_dir, workers):
    cfg = _cfg(demo_data_dir, num_workers=workers, num_frames=2, resolution=16)
    it = dp.make_loader("gfdm_clip", cfg, global_batch_size=6, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it.close()
    fresh = dp.make_loader("gfdm_clip", cfg, global_batch_size=6, seed=1)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        assert set(got) == set(w)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    fresh.close()


def test_epoch_shuffle_is_safe_under_concurrent_prefetch_threads():
    """grain's prefetch threads call the per-epoch permutation concurrently; with three items an epoch ends every
    third index, so threads evict epochs under each other (CI hit a KeyError here before the lock)."""
    import pickle
    import sys
    from concurrent.futures import ThreadPoolExecutor

    n, count = 3, 30_000
    shuffle = loader.EpochShuffle(n, seed=0)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: shuffle(i, None), range(count)))
    finally:
        sys.setswitchinterval(interval)
    want = [int(np.random.default_rng([0, i // n]).permutation(n)[i % n]) for i in range(count)]
    assert got == want
    assert pickle.loads(pickle.dumps(shuffle))(count - 1, None) == want[-1]   # grain workers get a pickled copy
