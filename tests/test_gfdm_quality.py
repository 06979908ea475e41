"""GFDM quality on held-out clips: PSNR / SSIM against analytic values, and launch.gfdm_quality's library run on a
tiny GFDM checkpoint (step 0, built eagerly) and the demo data: JSON / CSV / GIF written, 1 vs 5 steps, LPIPS and
FVD reported unavailable."""

import csv
import functools
import json

import numpy as np
from _helpers import save_params
from flax import nnx
from PIL import Image

from defi_jax import stage as stage_lib, trainer
from defi_jax.evaluation import gfdm_quality


def test_psnr_ssim_known_values():
    rs = np.random.default_rng(0)
    target = rs.uniform(0.2, 0.8, (2, 24, 24, 3)).astype(np.float32)
    assert np.all(np.isinf(gfdm_quality.psnr(target, target)))
    np.testing.assert_allclose(gfdm_quality.ssim(target, target), 1.0, atol=1e-5)
    d = 0.05   # +-d everywhere: MSE = d^2, PSNR = -20 log10(d) = 26.0206 dB
    noisy = target + d * rs.choice([-1.0, 1.0], target.shape).astype(np.float32)
    np.testing.assert_allclose(gfdm_quality.psnr(noisy, target), -20 * np.log10(d), atol=1e-3)
    # Constant images a, b: zero variance, so SSIM = (2ab + c1) / (a^2 + b^2 + c1), c1 = (0.01 * 1)^2.
    a, b, c1 = 0.3, 0.5, 1e-4
    got = gfdm_quality.ssim(np.full((16, 16, 3), a, np.float32), np.full((16, 16, 3), b, np.float32))
    np.testing.assert_allclose(got, (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-4)
    assert gfdm_quality.unavailable("LPIPS", None) == "unavailable: no weights"


def _random_params(config, seed=0) -> dict:
    """Flat parameters of configs/gfdm.py:tiny at "step 0" without running the initialisers (eager CPU init of
    the UNet takes a minute): shapes from ``nnx.eval_shape``; kernels and embeddings N(0, 1 / fan_in), norm
    scales 1, biases and blend factors 0."""
    model = nnx.eval_shape(lambda: stage_lib.get("gfdm").build_model(config, nnx.Rngs(seed)))
    rs = np.random.default_rng(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v, name = var.get_value(), str(path[-1])
        if name in ("kernel", "token_embedding", "position_embedding"):
            fan_in = int(np.prod(v.shape[:-1])) if name == "kernel" else v.shape[-1]
            value = rs.standard_normal(v.shape) / np.sqrt(fan_in)
        else:
            value = np.ones(v.shape) if name == "scale" else np.zeros(v.shape)
        out["/".join(map(str, path))] = value.astype(v.dtype)
    return out


def test_run_writes_json_csv_gif(tmp_path, demo_data_dir, tiny_config, one_device_mesh, monkeypatch):
    config = tiny_config("gfdm")
    config.data.data_dir = demo_data_dir
    # XLA's older elemental emitters compile these sampling programs ~1.8x faster (not every program: the GFDM
    # train step compiles slower with them); both step counts are compiled alike, so their comparison holds.
    config.train.compiler_options["xla_cpu_use_fusion_emitters"] = False
    # Restored onto one device, as on one accelerator: on the 8 fake devices each predict program is partitioned 8
    # ways with collectives (2x its compile, 4x its run). Restores across meshes are test_checkpoint.py's.
    monkeypatch.setattr(trainer, "restore_model", functools.partial(trainer.restore_model, mesh=one_device_mesh))
    workdir = str(tmp_path / "gfdm")
    save_params(config, workdir, _random_params(config))

    out = tmp_path / "quality"
    # 1 vs 2 steps keeps the test short; the command compares 1 and 5 by default
    report = gfdm_quality.run(workdir, out_dir=str(out), clips=2, steps=(1, 2), batch_size=2)
    assert report["protocol"]["clips"] == 2 and report["protocol"]["split"] == "eval"
    p = report["protocol"]
    assert p["frames_scored"] == p["frames_per_clip"] - 1 == config.model.num_frames - 1 and p["step"] == 0
    for key in ("1_step", "2_step"):
        assert np.isfinite(report["metrics"][key]["psnr"]) and -1 <= report["metrics"][key]["ssim"] <= 1
        assert len(report["per_clip"][key]["psnr"]) == 2
    # A random GFDM's 1- and 2-step samples differ (the step count reaches the sampler)
    assert report["per_clip"]["1_step"]["psnr"] != report["per_clip"]["2_step"]["psnr"]
    assert report["lpips"] == report["fvd"] == "unavailable: no weights"
    assert json.loads((out / "gfdm_quality.json").read_text())["metrics"] == report["metrics"]
    rows = list(csv.DictReader(open(out / "gfdm_quality.csv")))
    assert len(rows) == 4 and {r["steps"] for r in rows} == {"1", "2"}
    gif = Image.open(out / "gfdm_quality.gif")
    res = config.data.resolution
    assert gif.size == (2 * res, 3 * res) and gif.n_frames == config.model.num_frames   # real / 1-step / 2-step
