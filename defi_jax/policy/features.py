"""Precomputed GFDM features of policy training windows: the adapter trains without a GFDM forward per step.

    python -m launch.precompute_features --config=configs/policy.py:demo --out=/tmp/demo_features \\
        --train_windows=4096 --eval_windows=512
    python -m launch.train --config=configs/policy.py:demo --workdir=/tmp/policy_cached \\
        --config.data.source=features --config.data.features_dir=/tmp/demo_features \\
        --config.model.center_features=True --config.train.num_steps=800 --config.train.batch_size=64

With the GFDM frozen (``policy.finetune`` gidm_adapter or adapter_only) its features of a window depend on the window
and one noise draw only, so they can be computed once: :func:`precompute` draws ``policy_window`` batches of
``config.data``, runs the frozen GFDM's one-step features on each (one fresh noise draw per window) and stores them
with the window's actions and instruction tokens. Training on the store then costs the adapter's forward and
backward only (the demo's 800 x 64 recipe, BENCHMARKS.md). The store holds a fixed set of windows and one noise draw
each: more windows, not more epochs, is what the adapter needs to learn to read the scene.

Layout of a features directory (local or ``gs://``; :mod:`defi_jax.records` shards)::

    train-00000-of-00001.array_record     one record per window: feats float32 [V, T, h*w, C], actions float32
    eval-00000-of-00001.array_record      [horizon, action_dim], {gfdm,goal,gidm}_{ids,mask} int32
    <split>-....json                      count, feature_shape, run id, the config keys the features depend on
                                          (FINGERPRINT), the policy's action statistics (its assets)
    feature_stats.safetensors             {"mean", "std": float32 [C]}: the train windows' per-channel mean and
                                          standard deviation (over windows and tokens), written last

The run reading it (``config.data.source=features``) refuses a store written for another GFDM, resolution, views,
action normalization or tokenizer (naming the key), an unfinished store and a mix of two runs' splits. With
``model.center_features`` the policy subtracts the store's mean from the features (a frozen parameter loaded through
``config.init.sources.feature_stats``, which defaults to the store) and so keeps taking raw features at inference;
``model.scale_features`` also divides them by the store's standard deviation.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from defi_jax import paths, records

STATS_FILE = "feature_stats.safetensors"
STD_FLOOR = 1e-6   # a channel constant over the train windows is divided by this, not by zero
_KEY, _WRITER = "config.data.features_dir", "python -m launch.precompute_features"
TOKEN_KEYS = ("gfdm_ids", "gfdm_mask", "goal_ids", "goal_mask", "gidm_ids", "gidm_mask")
BATCH_KEYS = ("feats", "actions") + TOKEN_KEYS
# The config keys a store's features and records depend on: a run reading it must agree on every one.
FINGERPRINT = ("model.gfdm", "model.gfdm_steps", "model.num_views", "model.goal_text", "model.gidm.max_text_len",
               "model.gidm.text_encoder", "model.horizon", "model.action_dim", "data.views", "data.resolution",
               "data.obs_frames", "data.action_horizon", "data.normalize_actions", "policy.gfdm_init",
               "init.sources.gfdm.path", "init.sources.gfdm.step", "init.sources.svd_unet.path",
               "init.sources.svd_vae.path", "init.sources.svd_clip.path", "init.tokenizer_path")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node.to_dict() if hasattr(node, "to_dict") else node


def fingerprint(config) -> dict:
    """FINGERPRINT's values in ``config`` (JSON-normalized, so a store's sidecar compares equal)."""
    return json.loads(json.dumps({k: _get(config, k) for k in FINGERPRINT}, sort_keys=True, default=list))


def gfdm_identity(config) -> str:
    """Which GFDM weights make the features: ``<workdir>@<step>`` of a pretrained source (the latest step when
    ``init.sources.gfdm.step`` is -1), else ``initial`` with the ``svd_unet`` source's path (``random``: drawn from
    ``model.INITIAL_GFDM_SEED``, the same weights for every ``config.seed``; the VAE / CLIP paths are FINGERPRINT
    keys)."""
    src = config.init.sources.get("gfdm")
    if config.policy.gfdm_init == "pretrained" and src is not None and src.path:
        from defi_jax.checkpoint import Checkpointer
        step = src.step
        if step < 0:
            ckpt = Checkpointer(src.path, read_only=True)
            try:
                step = ckpt.latest_step()
            finally:
                ckpt.close()
        return f"{src.path}@{step}"
    unet = config.init.sources.get("svd_unet")
    return "initial:" + (unet.path if unet is not None and unet.path else "random")


# ---- writing ------------------------------------------------------------------------------------------
def one_device_mesh(config):
    """The config's mesh axes over the first local device."""
    import jax
    import ml_collections

    from defi_jax import sharding
    shape = tuple(1 for _ in config.mesh.shape)
    return sharding.make_mesh(ml_collections.ConfigDict(dict(config.mesh.to_dict(), shape=shape)),
                              devices=jax.local_devices()[:1])


def precompute(config, out: str, windows: Mapping[str, int], *, batch_size: int = 64, stats_only: bool = False,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Writes ``windows[split]`` windows of each split's GFDM features into ``out``; returns each split's sidecar.

    ``config``: a resolved policy config (``config_validation.resolve``) whose GFDM sources are the ones the
    policy will train with. Its ``data.source`` / ``model.center_features`` are ignored (the features are raw and
    drawn from the windows). ``stats_only``: only ``feature_stats.safetensors`` of the train windows (what a policy
    training on frames with ``model.center_features`` reads), no records. One process."""
    import jax
    from flax import nnx

    from defi_jax.policy import stage
    from defi_jax.trainer import Trainer

    if jax.process_count() > 1:
        raise ValueError(f"precompute_features runs in one process ({jax.process_count()} were started)")
    if config.policy.finetune == "all":
        raise ValueError("config.policy.finetune='all' trains the GFDM: its features cannot be precomputed")
    c = config.copy_and_resolve_references()
    c.data.source, c.model.center_features, c.model.scale_features = "frames", False, False
    if c.init.sources.get("feature_stats") is not None:
        c.init.sources.feature_stats.path = ""
    c.train.batch_size = batch_size
    if stage.STAGE.prepare is not None:
        stage.STAGE.prepare(c)          # tiny: trains the demo's GFDM / GIDM first when missing
    trainer = Trainer(c, mesh=one_device_mesh(c))   # the windows go through one device, any batch size
    parts = trainer.init_params()
    graphdef, state = nnx.split(nnx.merge(trainer.graphdef, parts["params"], parts["frozen"], parts["extra"]))

    from defi_jax.stage import jit_kwargs

    @functools.partial(jax.jit, **jit_kwargs(c))   # the run's XLA options (config.train.compiler_options)
    def features(state, batch, rng):
        model = nnx.merge(graphdef, state)
        return model.features(batch["frames"], stage.encode_instruction(model, batch)["gfdm"], rng)

    paths.makedirs(out)
    stats_path = paths.join(out, STATS_FILE)
    if paths.exists(stats_path):
        paths.remove(stats_path)        # the completion mark goes first: a reader sees an unfinished store
    run = uuid.uuid4().hex
    meta = {"run": run, "fingerprint": fingerprint(config), "assets": stage.assets(c), "seed": int(c.seed),
            "batch_size": batch_size}
    key = jax.random.key(c.seed + 29)   # per split (crc32 of its name), then per batch
    metas, total_C, total_sq_C, count = {}, None, None, 0
    for split, n in windows.items():
        if n < 1:
            continue
        if stats_only and split != "train":
            continue
        data = stage.make_data(c, 0, 1, split)
        writer = None if stats_only else records.ShardWriter(out, split, 0, 1, shape_key="feature_shape", meta=meta)
        done, t0, next_log = 0, time.time(), 0.0
        for i in range(-(-n // batch_size)):
            batch = next(data)
            rng = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(split.encode()) % 2**31), i)
            feats = np.asarray(features(state, {k: batch[k] for k in stage.FRAMES_BATCH_KEYS}, rng))
            take = min(len(feats), n - done)
            for r in range(take if writer is not None else 0):
                arrays = {"feats": feats[r]} | {k: np.asarray(batch[k][r]) for k in ("actions",) + TOKEN_KEYS}
                writer.add(records.encode_arrays(arrays), feats.shape[1:])
            if split == "train":
                s = feats[:take].astype(np.float64).reshape(-1, feats.shape[-1])
                total_C = s.sum(0) if total_C is None else total_C + s.sum(0)
                total_sq_C = (s * s).sum(0) if total_sq_C is None else total_sq_C + (s * s).sum(0)
                count += len(s)
            done += take
            if done == n or time.time() - t0 >= next_log:
                rate = done / max(time.time() - t0, 1e-9)
                log(f"precompute_features: {split} {done} / {n} windows ({rate:.1f} windows/s)")
                next_log = time.time() - t0 + 30.0
        close = getattr(data, "close", None)
        if callable(close):
            close()
        if writer is not None:
            writer.close()
            metas[split] = writer.meta
        else:
            metas[split] = dict(meta, num_records=done, feature_shape=list(feats.shape[1:]))
    if total_C is None:
        raise ValueError("precompute_features: no train windows (the feature mean comes from the train split)")
    from safetensors.numpy import save
    mean = total_C / count
    std = np.sqrt(np.maximum(total_sq_C / count - mean * mean, 0.0))
    stats = {"mean": mean.astype(np.float32), "std": np.maximum(std, STD_FLOOR).astype(np.float32)}
    paths.write_bytes(stats_path, save(stats, metadata={
        "run": run, "windows": str(metas["train"]["num_records"]), "gfdm": gfdm_identity(c),
        "fingerprint": json.dumps(fingerprint(config), sort_keys=True)}))
    return metas


# ---- reading ------------------------------------------------------------------------------------------
def shard_paths(features_dir: str, split: str) -> list[str]:
    return records.shard_paths(features_dir, split, key=_KEY, writer=_WRITER)


def read_meta(features_dir: str, split: str) -> dict:
    """A split's merged sidecar (the shards must agree on shape, run and fingerprint)."""
    return records.read_meta(shard_paths(features_dir, split), features_dir, split,
                             ("feature_shape", "run", "fingerprint"))


def _read_stats_file(features_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load

    path = paths.join(features_dir, STATS_FILE)
    if not paths.exists(path):
        raise FileNotFoundError(f"{path} is missing: the features store is unfinished (rerun {_WRITER})")
    raw = paths.read_bytes(path)
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])   # safetensors: u64 length + JSON header
    return load(raw), header.get("__metadata__") or {}


def read_stats(features_dir: str, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"mean": float32 [C], "std": float32 [C]}`` of a store (the ``feature_stats`` init source kind; a store
    written before ``std`` existed has ``mean`` only, which ``model.scale_features`` names as missing)."""
    del prefix
    return _read_stats_file(features_dir)[0]


def check_stats(config) -> None:
    """The statistics in ``init.sources.feature_stats.path`` (a policy centring features of frames) were computed
    from this run's GFDM weights and inputs; raises naming every disagreeing key otherwise."""
    root = config.init.sources.feature_stats.path
    _, meta = _read_stats_file(root)
    bad, gfdm = [], gfdm_identity(config)
    if "gfdm" in meta and meta["gfdm"] != gfdm:
        bad.append(f"GFDM weights: statistics of {meta['gfdm']}, this run {gfdm}")
    if "fingerprint" in meta:
        want, got = fingerprint(config), json.loads(meta["fingerprint"])
        bad += [f"{k}: statistics {json.dumps(got.get(k))}, this run {json.dumps(want[k])}" for k in FINGERPRINT
                if not k.startswith("init.sources.gfdm.") and got.get(k) != want[k]]
    if bad:
        raise ValueError(f"config.init.sources.feature_stats.path={root!r} holds another GFDM's feature statistics; "
                         "remove that folder (the run then recomputes them, config.policy.feature_stats_windows) or "
                         "point the key elsewhere; differing:\n  " + "\n  ".join(bad))


def check(config) -> dict:
    """The store of ``config.data.features_dir`` is finished, one run's, and written for this config; returns the
    train split's sidecar. Raises naming the store and every disagreeing key."""
    root = config.data.features_dir
    metas = {split: read_meta(root, split) for split in ("train", "eval")}
    _, stats_meta = _read_stats_file(root)
    runs = {metas["train"]["run"], metas["eval"]["run"], stats_meta.get("run")}
    if len(runs) > 1:
        raise ValueError(f"{_KEY}={root!r}: its train / eval shards and {STATS_FILE} come from different "
                         f"precompute runs; rerun {_WRITER} into an empty folder")
    want, got = fingerprint(config), metas["train"]["fingerprint"]
    bad = [f"{k}: store {json.dumps(got.get(k))}, this run {json.dumps(want[k])}" for k in FINGERPRINT
           if got.get(k) != want[k]]
    if bad:
        raise ValueError(f"{_KEY}={root!r} was written for another config; differing keys:\n  " + "\n  ".join(bad))
    return metas["train"]


def make_data(config, process_index: int, process_count: int, split: str):
    """Batches ``{feats, actions, tokens}`` of the store's ``split`` (a global shuffle, repeated, disjoint per
    process, checkpointable)."""
    from defi_jax.stage import NumericBatches

    seed = config.seed + (0 if split == "train" else 1_000_003)
    it = records.make_loader(shard_paths(config.data.features_dir, split), records.decode_arrays,
                             global_batch_size=config.train.batch_size, process_index=process_index,
                             process_count=process_count, seed=seed, worker_count=config.data.num_workers)
    return NumericBatches(it, BATCH_KEYS)
