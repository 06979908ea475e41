"""GFDM stage: metrics vs TensorFlow, tokenizer, precomputed-latent round trip, and a short real training run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import save_random_workdir
from flax import nnx

from configs.gfdm import get_config
from defi_jax import stage as stage_lib, trainer, weights
from defi_jax.gfdm import evaluation, latents, stage
from defi_jax.models import byte_tokenizer


def test_psnr_ssim_match_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rs = np.random.default_rng(0)
    a = rs.uniform(size=(2, 3, 24, 20, 3)).astype(np.float32)
    b = np.clip(a + 0.1 * rs.standard_normal(a.shape), 0, 1).astype(np.float32)
    np.testing.assert_allclose(evaluation.ssim(a, b), tf.image.ssim(a, b, 1.0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(evaluation.psnr(a, b), tf.image.psnr(a, b, 1.0).numpy(), rtol=1e-5)
    assert float(evaluation.ssim(a, a).min()) == pytest.approx(1.0, abs=1e-5)


def test_noise_share_is_the_noise_draws_part_of_the_energy():
    """0 for a function of the input alone, ~1 for the noise alone, |n|^2 / (|s|^2 + |n|^2) in between."""
    rs = np.random.default_rng(0)
    s = rs.standard_normal((3, 64, 32)).astype(np.float32)
    n1, n2 = (rs.standard_normal(s.shape).astype(np.float32) for _ in range(2))
    np.testing.assert_array_equal(evaluation.noise_share(s, s), np.zeros(3, np.float32))
    np.testing.assert_allclose(evaluation.noise_share(n1, n2), 1.0, atol=0.02)
    np.testing.assert_allclose(evaluation.noise_share(s + 0.5 * n1, s + 0.5 * n2), 0.25 / 1.25, atol=0.02)


def test_byte_tokenizers_keep_their_ids():
    """Both byte schemes, id for id (tiny checkpoints were trained on them), and the exported artifacts' copies."""
    from defi_jax import inference

    ids, mask = byte_tokenizer.clip_bytes("Open  the Drawer", 20)
    assert ids.shape == mask.shape == (20,) and ids.dtype == mask.dtype == np.int32
    assert list(ids[:5]) == [1, ord("o") + 3, ord("p") + 3, ord("e") + 3, ord("n") + 3]
    assert ids[16] == 2 and mask.sum() == 17 and ids[17:].tolist() == [2, 2, 2]  # eos, then eos-padding
    ids, mask = byte_tokenizer.clip_bytes("x" * 40, 20)
    assert ids[-1] == 2 and mask.all()  # truncated: end-of-text kept as the last token

    ids, mask = byte_tokenizer.gidm_bytes("Open  it", 10)
    assert ids.tolist() == [ord(c) + 1 for c in "Open  it"] + [0, 0] and mask.tolist() == [1] * 8 + [0, 0]
    assert byte_tokenizer.gidm_bytes("", 4)[0].tolist() == [33, 0, 0, 0]        # empty: one space
    assert byte_tokenizer.gidm_bytes("é" * 3, 4)[0].tolist() == [196, 170, 196, 170]  # bytes, cut at max_length

    for text in ("Open  the Drawer", "", "x" * 40, "Ünïcode  ➜ text"):
        for ours, exported in ((byte_tokenizer.clip_bytes, inference._clip_bytes),
                               (byte_tokenizer.gidm_bytes, inference._gidm_bytes)):
            for a, b in zip(ours(text, 20), exported(text, 20)):
                np.testing.assert_array_equal(a, b, err_msg=text)


def test_tokenize_transform_pickles_without_its_tokenizers():
    """The one data-worker transform: pickled into grain workers without built tokenizers, numeric output."""
    import pickle

    config = get_config("tiny")
    transform = stage_lib.Tokenize(config, {("input_ids", "attention_mask"): stage.tokenizer})
    sample = {"frames": np.zeros((4, 8, 8, 3), np.uint8), "instruction": b"Open the drawer", "dataset": "demo"}
    out = transform(sample)
    assert transform._tokenizers is not None and set(out) == {"frames", "input_ids", "attention_mask"}
    np.testing.assert_array_equal(out["input_ids"], byte_tokenizer.clip_bytes("Open the drawer", 20)[0])
    copy = pickle.loads(pickle.dumps(transform))
    assert copy._tokenizers is None                     # built again in the worker, on first use
    np.testing.assert_array_equal(copy(sample)["attention_mask"], out["attention_mask"])


def _tiny_vae(config):
    from defi_jax.models.svd_vae import AutoencoderKLTemporalDecoder, VAEConfig
    return AutoencoderKLTemporalDecoder(VAEConfig.from_dict(dict(config.model.vae)), rngs=nnx.Rngs(3))


def test_precompute_latents_round_trip(demo_data_dir, tmp_path):
    from launch.precompute_latents import encode_split

    config = get_config("tiny")
    config.data.data_dir = demo_data_dir
    vae = _tiny_vae(config)
    meta = encode_split(config, vae, str(tmp_path), "train", num_clips=5, batch_per_device=1)
    assert meta["num_records"] == 5 and meta["latent_shape"] == [4, 16, 16, 4]
    assert latents.read_meta(str(tmp_path), "train")["scaling_factor"] == pytest.approx(0.18215)

    # The records are the scaled VAE modes of the loader's clips, in order: re-encode the same clips here.
    import data_pipelines
    n_dev = len(jax.local_devices())
    clips = next(data_pipelines.make_loader("gfdm_clip", stage.loader_config(config), global_batch_size=n_dev,
                                            seed=config.seed, split="train"))
    frames = clips["frames"][:5]
    want = vae.encode(jnp.asarray(frames.reshape(-1, 32, 32, 3), jnp.float32) / 127.5 - 1.0) * 0.18215
    want = np.asarray(want).reshape(5, 4, 16, 16, 4)
    from array_record.python import array_record_module
    reader = array_record_module.ArrayRecordReader(latents.shard_paths(str(tmp_path), "train")[0])
    got = [latents.decode_record(r) for r in reader.read_all()]
    np.testing.assert_allclose(np.stack([g["latents"] for g in got]), want, rtol=1e-4, atol=1e-5)
    assert [g["instruction"] for g in got] == [str(s) for s in clips["instruction"][:5]]

    # The stage reads them with a config switch: latents + tokens, no frames.
    config.data.source, config.data.latents_dir = "latents", str(tmp_path)
    config.train.batch_size = 4
    stage.validate(config)
    it = stage.make_data(config, 0, 1, "train")
    batch = next(it)
    assert set(batch) == {"latents", "input_ids", "attention_mask"}
    assert batch["latents"].shape == (4, 4, 16, 16, 4) and batch["input_ids"].shape == (4, 20)
    state = it.get_state()
    nxt = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["latents"], nxt["latents"])  # checkpointable position
    assert {k: v.shape for k, v in stage.batch_spec(config).items()} == {k: v.shape for k, v in batch.items()}


def test_tiny_training_run_learns_compiles_evaluation_once_and_writes_gif(demo_data_dir, tmp_path, tiny_config,
                                                                          one_device_mesh, count_compiles,
                                                                          monkeypatch):
    """``configs/gfdm.py:tiny`` on the demo data through the real trainer (in this process, on one device; the
    entry point ``launch.train`` is covered by test_entry_points): the validation loss falls, the evaluation
    compiles at its first call only, and the sampled clips are written as a GIF.

    The run starts from weights, as the released recipe starts from SVD's and CLIP's: a host-drawn tiny GFDM saved
    as a workdir (``config.init``). A random init compiled by XLA would cost ~40 s of CPU here; ``make demo`` (and
    CI's smoke of it) trains the tiny GFDM from a random UNet and text tower (its VAE from the VAE stage)."""
    compiles = []

    def counted_evaluate(*args, **kwargs):
        with count_compiles() as n:
            out = stage.evaluate(*args, **kwargs)
        compiles.append(n[0])
        return out

    monkeypatch.setattr(stage, "STAGE", dataclasses.replace(stage.STAGE, evaluate=counted_evaluate))
    config = tiny_config("gfdm", num_steps=8, eval_every=4, save_every=8, batch_size=4, log_every=1)
    config.data.data_dir = demo_data_dir
    save_random_workdir("gfdm", config, str(tmp_path / "start"))
    config.init.sources.start = weights.source("^", "workdir", str(tmp_path / "start"))
    config.eval.batches = 1
    config.model.sample_steps = 4
    workdir = tmp_path / "run"
    trainer.Trainer(config, mesh=one_device_mesh).fit(str(workdir))

    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(evals) == [4, 8]
    assert compiles[0] > 0 and compiles[1:] == [0], compiles   # compiled once per run, not per evaluation
    # Validation loss at fixed noise draws on fixed batches goes down as training proceeds.
    assert evals[8]["eval_loss"] < evals[4]["eval_loss"], evals
    assert all(np.isfinite([r["eval_psnr"], r["eval_ssim"]]).all() for r in evals.values())
    assert all(0.0 < r["eval_motion_noise_share"] < 1.5 for r in evals.values()), evals
    gif = workdir / "samples" / "step_00000008.gif"
    assert gif.exists()
    import imageio.v2 as imageio
    frames = imageio.mimread(gif)
    assert len(frames) == 4 and frames[0].shape[:2] == (64, 4 * 32)  # (real ; sampled) x 4 clips, 4 frames
