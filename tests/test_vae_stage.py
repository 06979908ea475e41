"""The VAE stage (configs/vae.py:tiny) and the tiny GFDM reading its frozen VAE from a VAE workdir."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from defi_jax import checkpoint, stage as stage_lib, trainer


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, tiny_config, one_device_mesh, demo_data_dir):
    """A few VAE steps on one fixed batch of demo clips, an evaluation (GIF) and a checkpoint, in-process."""
    c = tiny_config("vae", schedule="constant", warmup_steps=0, batch_size=4)
    c.data.data_dir = demo_data_dir
    c.eval.batches, c.eval.num_videos = 1, 2
    workdir = str(tmp_path_factory.mktemp("vae"))
    tr = trainer.Trainer(c, mesh=one_device_mesh)
    stage = stage_lib.get("vae")
    batch = tr.global_batch(next(stage.make_data(c, 0, 1, "train")))
    state = tr.init_state()
    rows = []
    for _ in range(5):
        state, out = tr.step(state, batch)
        rows.append({k: float(v) for k, v in jax.device_get(out).items()})
    eval_batch = tr.global_batch(next(stage.make_data(c, 0, 1, "eval")))
    metrics = stage.evaluate(tr.model(state), c, workdir, 5, iter([eval_batch]))
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(5, state.as_dict(), None, c.to_json_best_effort())
    ckpt.close()
    return dict(config=c, workdir=workdir, rows=rows, metrics=metrics, eval_batch=eval_batch)


def test_loss_decreases_on_a_fixed_batch(vae_run):
    rows = vae_run["rows"]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[-1]["recon_l1"] < rows[0]["recon_l1"] and rows[-1]["psnr"] > rows[0]["psnr"]
    assert {"kl", "latent_std"} <= set(rows[-1])


def test_evaluation_writes_real_above_reconstructed(vae_run):
    m, c = vae_run["metrics"], vae_run["config"]
    assert set(m) == {"eval_recon_l1", "eval_kl", "eval_psnr", "eval_latent_std"}
    assert 5.0 < m["eval_psnr"] < 60.0
    gif = Image.open(os.path.join(vae_run["workdir"], "samples", "step_00000005.gif"))
    r, t = c.data.resolution, c.data.num_frames + 1
    assert gif.size == (2 * r, 2 * r) and gif.n_frames == t      # 2 clips side by side, real over reconstruction
    gif.seek(0)
    frame = np.asarray(gif.convert("RGB"))
    real = np.asarray(vae_run["eval_batch"]["frames"])[:2, 0]          # first frame of each clip
    diff = np.abs(frame[:r].astype(float) - np.concatenate(list(real), axis=1).astype(float))
    assert diff.mean() < 4.0, diff.mean()                        # the GIF's 256-colour palette, nothing more


def test_gfdm_loads_its_frozen_vae_from_the_vae_workdir(vae_run, tiny_config, one_device_mesh):
    c = tiny_config("gfdm")
    c.init.sources.vae_workdir.path = vae_run["workdir"]
    tr = trainer.Trainer(c, mesh=one_device_mesh)
    # What init_state hands its jitted init (the trainer fills the parameters by these paths), without compiling it.
    loaded = tr.load_init_params()                                  # "vae/encoder/conv_in/kernel": ...
    want = checkpoint.restore_params(vae_run["workdir"])             # "encoder/conv_in/kernel": ...
    vae = {p for p in tr.layout.abstract_params() if p.startswith("vae/")}
    assert set(loaded) == vae and {p.removeprefix("vae/") for p in vae} == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(loaded["vae/" + name]), np.asarray(value), err_msg=name)
    abstract = tr.layout.abstract_state()
    assert "vae" in abstract.frozen and "vae" not in abstract.params   # frozen in the GFDM: never trained
