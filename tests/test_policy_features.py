"""The policy on precomputed GFDM features: launch.precompute_features writes the frozen GFDM's one-step features of
the windows, the trainer reads them (data.source=features), model.center_features subtracts the store's mean, and
the checkpoint still takes raw features (test_export_torch: a centred policy served from frames and exported to
PyTorch with the mean folded in acts the same)."""

import functools
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from _helpers import random_model, save_random_workdir
from flax import nnx

from defi_jax import checkpoint, config_validation, records, trainer
from defi_jax.policy import features
from defi_jax.policy import stage as policy_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_data_dir, tiny_config, subprocess_env):
    tmp = tmp_path_factory.mktemp("policy_features")
    for seed, stage in enumerate(("gfdm", "gidm")):   # random stand-ins for the pretrained stages
        save_random_workdir(stage, tiny_config(stage), str(tmp / stage), seed=seed)
    sources = {"init.sources.gfdm.path": str(tmp / "gfdm"), "init.sources.gidm.path": str(tmp / "gidm"),
               "data.data_dir": demo_data_dir}
    out = str(tmp / "features")
    run = subprocess.run([sys.executable, "-m", "launch.precompute_features", "--config=configs/policy.py:tiny",
                          f"--out={out}", "--train_windows=12", "--eval_windows=8", "--batch=4",
                          *(f"--config.{k}={v}" for k, v in sources.items())],
                         cwd=REPO, env=subprocess_env(devices=0), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    c = tiny_config("policy", batch_size=4)
    for k, v in sources.items():
        section, _, key = k.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[key] = v
    config_validation.resolve(c)
    return dict(tmp=tmp, out=out, config=c, stdout=run.stdout)


def _records(out, split):
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(features.shard_paths(out, split)[0])
    try:
        return [records.decode_arrays(r) for r in reader.read_all()]
    finally:
        reader.close()


def test_the_store_holds_the_frozen_gfdms_features_of_the_windows(store, one_device_mesh, fast_compile):
    c, out = store["config"], store["out"]
    assert "train 12 / 12 windows" in store["stdout"] and f"--config.data.features_dir={out}" in store["stdout"]
    got = _records(out, "train")
    assert len(got) == 12 and len(_records(out, "eval")) == 8
    # The same windows (the loader is seeded) through the GFDM of the run's sources, with the store's draws.
    # The run's source weights over host-drawn ones (the policy's own layers do not enter the features): the
    # trainer's random init would compile a program of its own.
    loaded = trainer.Trainer(c, mesh=one_device_mesh).load_init_params()
    model = random_model("policy", c)
    variables = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, value in loaded.items():
        variables[path].set_value(value)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=fast_compile)   # one batch shape, three calls
    def gfdm_features(state, batch, rng):
        m = nnx.merge(graphdef, state)
        return m.features(batch["frames"], policy_stage.encode_instruction(m, batch)["gfdm"], rng)

    data = policy_stage.make_data(c, 0, 1, "train")
    key = jax.random.fold_in(jax.random.key(c.seed + 29), zlib.crc32(b"train") % 2**31)
    for i in range(3):
        batch = next(data)
        want = np.asarray(gfdm_features(state, batch, jax.random.fold_in(key, i)))
        for r in range(4):
            rec = got[4 * i + r]
            np.testing.assert_allclose(rec["feats"], want[r], rtol=1e-4, atol=1e-4)
            for k in ("actions",) + features.TOKEN_KEYS:
                np.testing.assert_array_equal(rec[k], batch[k][r], err_msg=k)
    # The per-channel mean and standard deviation of the train windows, written last; the run's action statistics
    # travel with the store.
    stats = features.read_stats(out)
    all_feats = np.stack([g["feats"] for g in got]).astype(np.float64).reshape(-1, want.shape[-1])
    np.testing.assert_allclose(stats["mean"], all_feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], all_feats.std(0), rtol=1e-4, atol=1e-6)
    meta = features.read_meta(out, "train")
    assert meta["feature_shape"] == list(policy_stage.feature_shape(c)) == list(want.shape[1:])
    assert meta["assets"] == policy_stage.assets(c) and meta["fingerprint"] == features.fingerprint(c)


def test_training_on_the_store_centres_the_features_with_the_stores_mean(store, one_device_mesh, fast_compile):
    c = store["config"].copy_and_resolve_references()
    c.data.source, c.data.features_dir, c.model.center_features = "features", store["out"], True
    config_validation.resolve(c)
    assert c.init.sources.feature_stats.path == store["out"]          # the store's own mean
    c.train.num_steps, c.train.save_every, c.train.log_every, c.eval.batches = 4, 4, 2, 1
    workdir = str(store["tmp"] / "run")
    result = trainer.Trainer(c, mesh=one_device_mesh).fit(workdir)
    assert np.isfinite(result.metrics["eval_action_mse"]) and "eval_obs_info_gap" in result.metrics
    assert "eval_latent_swap_change" in result.metrics    # the probes run on stored features as on frames
    params = checkpoint.restore_params(workdir)
    mean = features.read_stats(store["out"])["mean"]
    np.testing.assert_array_equal(np.asarray(params["feature_stats/mean"]), mean)   # loaded, frozen
    assert np.abs(mean).max() > 0.1
    stats = json.loads(open(os.path.join(workdir, "assets", "action_stats.json")).read())
    assert stats == json.loads(features.read_meta(store["out"], "train")["assets"]["action_stats.json"])

    # The checkpoint takes raw features: centring is inside the model, and folding it into the two input layers'
    # biases is the same function (what the PyTorch export writes).
    model = trainer.restore_model(c, workdir, mesh=one_device_mesh)
    rec = _records(store["out"], "eval")[:2]
    feats = np.stack([r["feats"] for r in rec])
    tokens = {k: np.stack([r[k] for r in rec]) for k in features.TOKEN_KEYS}

    def context(model):
        """``feats -> context`` of ``model``, one program (op by op, the eager calls compiled hundreds)."""
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, feats, tokens: (m := nnx.merge(graphdef, state)).context(
            feats, policy_stage.encode_instruction(m, tokens))[0], compiler_options=fast_compile)
        return lambda feats: np.asarray(fn(state, feats, tokens))

    centred = context(model)(feats)
    model.fold_feature_stats()
    assert model.feature_stats is None
    folded = context(model)
    np.testing.assert_allclose(folded(feats), centred, rtol=1e-4, atol=1e-4)
    raw = folded(feats + mean)                                        # without centring, another context
    assert np.abs(raw - centred).max() > 1e-3



def test_a_store_for_another_config_an_unfinished_one_or_a_mix_is_refused(store, error_message, tmp_path):
    c = store["config"].copy_and_resolve_references()
    c.data.source, c.data.features_dir = "features", store["out"]
    other = c.copy_and_resolve_references()
    other.data.resolution = 16
    msg = error_message(policy_stage.check_data, other, exc=ValueError)
    assert "config.data.features_dir" in msg and "data.resolution: store 32, this run 16" in msg
    policy_stage.check_data(c)                                         # the store's own config passes

    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(store["out"], unfinished)
    os.remove(os.path.join(unfinished, features.STATS_FILE))
    c.data.features_dir = unfinished
    assert "feature_stats.safetensors is missing" in error_message(policy_stage.check_data, c, exc=FileNotFoundError)

    mixed = str(tmp_path / "mixed")
    shutil.copytree(store["out"], mixed)
    side = os.path.join(mixed, "eval-00000-of-00001.json")
    meta = json.load(open(side))
    json.dump(meta | {"run": "another"}, open(side, "w"))
    c.data.features_dir = mixed
    assert "different precompute runs" in error_message(policy_stage.check_data, c, exc=ValueError)

    bad = c.copy_and_resolve_references()
    bad.policy.finetune = "all"
    assert "finetune='all'" in error_message(policy_stage.validate, bad, exc=ValueError)
    bad = store["config"].copy_and_resolve_references()
    bad.model.scale_features = True                                  # scaled but not centred
    assert "config.model.scale_features=True needs" in error_message(policy_stage.validate, bad, exc=ValueError)
    bad.model.center_features, bad.init.allow_random = True, False   # frames, and no store to take a mean from
    assert "init.sources.feature_stats.path is empty" in error_message(policy_stage.validate, bad, exc=ValueError)
    bad.data.source = "latents"
    assert "config.data.source='latents'" in error_message(policy_stage.validate, bad, exc=ValueError)


class _Count:
    def __init__(self):
        self.n = 0

    def __call__(self, example):
        self.n += 1
        return example


def test_the_loader_reads_ahead_a_few_batches_not_the_whole_store(store):
    """A store's records are large (1.2 MB per demo window): the loader decodes a bounded number ahead of the
    batch it returns (grain's default read-ahead, 500 batches, took 24 GB and was OOM-killed at batch 64)."""
    import time
    count = _Count()
    it = records.make_loader(features.shard_paths(store["out"], "train"), records.decode_arrays, global_batch_size=2,
                             process_index=0, process_count=1, seed=0, transform=count)
    first = next(it)
    assert first["feats"].shape[0] == 2
    time.sleep(1.0)                       # the read-ahead threads fill their buffer
    assert 2 <= count.n <= 2 + 2 * 2 + 4, count.n   # this batch + two ahead + the threads' in-flight records


def test_a_run_on_frames_computes_its_gfdms_statistics_once_and_refuses_another_gfdms(store, error_message):
    """``model.center_features`` on frames (the demo recipe): the run's ``prepare`` computes the statistics of its
    own GFDM into ``init.sources.feature_stats.path`` when none are there, checks them when they are, and refuses
    statistics of another GFDM or other inputs, naming what differs."""
    c = store["config"].copy_and_resolve_references()
    c.model.center_features = c.model.scale_features = True
    c.init.sources.feature_stats.path = str(store["tmp"] / "stats")
    c.policy.feature_stats_windows = 4
    config_validation.resolve(c)
    assert c.init.sources.feature_stats.path == str(store["tmp"] / "stats")   # frames: the path stays
    policy_stage.prepare(c)
    stats = features.read_stats(c.init.sources.feature_stats.path)
    assert stats["mean"].shape == stats["std"].shape == (policy_stage.feature_shape(c)[-1],)
    assert (stats["std"] > 0).all() and not os.path.exists(os.path.join(c.init.sources.feature_stats.path,
                                                                         "train-00000-of-00001.array_record"))
    written = os.path.getmtime(os.path.join(c.init.sources.feature_stats.path, features.STATS_FILE))
    policy_stage.prepare(c)                                            # found and checked, not recomputed
    assert os.path.getmtime(os.path.join(c.init.sources.feature_stats.path, features.STATS_FILE)) == written

    other = c.copy_and_resolve_references()
    other.policy.gfdm_init = "initial"                                 # another GFDM: the initial weights
    config_validation.resolve(other)
    msg = error_message(policy_stage.prepare, other, exc=ValueError)
    assert "config.init.sources.feature_stats.path" in msg and "GFDM weights" in msg and "initial:" in msg
    other = c.copy_and_resolve_references()
    other.data.resolution = 16                                         # other inputs
    assert "data.resolution: statistics 32, this run 16" in error_message(policy_stage.prepare, other, exc=ValueError)
