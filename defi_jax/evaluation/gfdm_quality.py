"""GFDM video-prediction quality on held-out clips: 1 denoising step (what the policy uses) vs several.

    from defi_jax.evaluation import gfdm_quality
    report = gfdm_quality.run("workdirs/gfdm", out_dir="/tmp/gfdm_quality", clips=16, steps=(1, 5))
    # or: python -m launch.gfdm_quality --workdir=workdirs/gfdm --out=/tmp/gfdm_quality

Clips come from the GFDM's own data config (``config.data`` of the checkpoint, its ``eval`` split; ``data_dir``
overrides the folder). From each clip's current frame (frame 0) and instruction the GFDM predicts the clip's
future latents by Euler sampling with ``steps`` denoising steps (the same noise for every step count, no noise
augmentation, the sampler's frame-ramped guidance; 1 step is Euler from sigma_max straight to 0, i.e. the
one-step x0 estimate), the VAE decodes them, and the predicted future frames 1..T-1 are scored against the real ones in
[0, 1]: PSNR (dB; ``inf`` for a perfect prediction) and SSIM (Gaussian window 11 / 1.5, ``tf.image.ssim``'s
definition), per clip as the mean over its future frames.

LPIPS and FVD need pretrained networks (LPIPS' AlexNet / VGG with its linear heads, FVD's Kinetics I3D). No such
network ships with or is implemented in defi-jax and nothing is downloaded, so both are reported as
``"unavailable: ..."`` with the reason, never estimated.

Writes ``OUT/gfdm_quality.json`` (the protocol: workdir, step, split, clips, frames, seed, step counts; the means
and per-clip values), ``OUT/gfdm_quality.csv`` (clip, steps, psnr, ssim) and ``OUT/gfdm_quality.gif`` (per clip,
top to bottom: real, then one row per step count).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from collections.abc import Sequence

import numpy as np

from defi_jax import paths

_log = logging.getLogger(__name__)

GIF_CLIPS = 4   # clips side by side in the GIF


def psnr(pred: np.ndarray, target: np.ndarray, max_val: float = 1.0) -> np.ndarray:
    """PSNR per image of ``[..., H, W, C]`` (dB), ``inf`` where the images are identical."""
    from defi_jax.gfdm import evaluation
    mse = np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2, axis=(-3, -2, -1))
    return np.where(mse == 0, np.inf, np.asarray(evaluation.psnr(pred, target, max_val), np.float64))


def ssim(pred: np.ndarray, target: np.ndarray, max_val: float = 1.0) -> np.ndarray:
    """SSIM per image of ``[..., H, W, C]`` (``defi_jax.gfdm.evaluation.ssim``, ``tf.image.ssim``'s definition)."""
    from defi_jax.gfdm import evaluation
    return np.asarray(evaluation.ssim(pred, target, max_val), np.float64)


def unavailable(metric: str, weights: str | None) -> str:
    """The report entry of a metric whose network cannot be loaded here."""
    if not weights:
        return "unavailable: no weights"
    return (f"unavailable: defi-jax has no {metric} network to load {weights} into (nothing is downloaded or "
            "estimated)")


def held_out_clips(config, clips: int) -> dict:
    """The first ``clips`` clips of the config's ``eval`` split: tokenized numpy batch arrays."""
    from defi_jax.gfdm import stage as gfdm_stage
    it = gfdm_stage.make_data(config, 0, 1, "eval")
    parts, have = [], 0
    for batch in it:
        parts.append({k: np.asarray(v) for k, v in batch.items()})
        have += len(parts[-1]["input_ids"])
        if have >= clips:
            break
    if not parts:
        raise RuntimeError(f"data {config.data.get('data_dir', '')!r}: the eval split yielded no clip")
    out = {k: np.concatenate([p[k] for p in parts])[:clips] for k in parts[0]}
    if len(out["input_ids"]) < clips:
        _log.warning("eval split: %d clip(s), fewer than the %d asked for", len(out["input_ids"]), clips)
    return out


def _predict_fn(graphdef, config, num_steps: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from defi_jax import stage as stage_lib

    @functools.partial(jax.jit, **stage_lib.jit_kwargs(config))
    def predict(state, batch, rng):
        model = nnx.merge(graphdef, state)
        latents, cond, _ = model.conditioning_from_batch(batch, rng, train=False)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        pred = model.sample(cond, text, rng, num_frames=latents.shape[1], num_steps=num_steps)
        real = batch["frames"].astype(jnp.float32) / 127.5 - 1.0 if "frames" in batch else model.decode(latents)
        return real, model.decode(pred)   # [B, T, H, W, 3] in [-1, 1]

    return predict


def run(workdir: str, *, out_dir: str, clips: int = 8, steps: Sequence[int] = (1, 5), data_dir: str | None = None,
        step: int | None = None, ema: bool = False, seed: int = 0, batch_size: int = 8,
        lpips_weights: str | None = None, i3d_weights: str | None = None) -> dict:
    """Scores the GFDM checkpoint in ``workdir`` on ``clips`` held-out clips for each step count; writes the
    JSON / CSV / GIF (module doc) under ``out_dir`` and returns the JSON's content."""
    import jax
    from flax import nnx

    from defi_jax import trainer
    from defi_jax.gfdm import evaluation

    steps = tuple(int(s) for s in steps)
    if clips < 1 or not steps or min(steps) < 1:
        raise ValueError(f"clips={clips}, steps={steps}: need clips >= 1 and step counts >= 1")
    config = trainer.checkpoint_config(workdir, step)
    if config.get("stage", "gfdm") != "gfdm":
        raise ValueError(f"{workdir}: a {config.stage!r} checkpoint, not a GFDM one")
    with config.unlocked():
        if data_dir:
            config.data.data_dir = data_dir
        config.train.batch_size = batch_size
    batch = held_out_clips(config, clips)
    model = trainer.restore_model(config, workdir, step=step, ema=ema)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(seed)
    size = min(batch_size, len(batch["input_ids"]))

    real = None
    per_steps: dict[int, dict[str, np.ndarray]] = {}
    videos: dict[int, np.ndarray] = {}
    for n in steps:   # the same rng: every step count starts from the same noise
        predict = _predict_fn(graphdef, config, n)   # one compile per step count: every chunk is padded to size
        rows = [predict(state, chunk, jax.random.fold_in(rng, i)) for i, chunk in enumerate(_chunks(batch, size))]
        real = np.concatenate([np.asarray(r) for r, _ in rows])[:len(batch["input_ids"])]
        fake = np.concatenate([np.asarray(f) for _, f in rows])[:len(batch["input_ids"])]
        r01, f01 = (real[:, 1:] + 1) / 2, np.clip((fake[:, 1:] + 1) / 2, 0, 1)   # frame 0 is given
        per_steps[n] = {"psnr": psnr(f01, r01).mean(axis=1), "ssim": ssim(f01, r01).mean(axis=1)}
        videos[n] = fake

    n_clips, n_frames = real.shape[:2]
    ckpt_step = step if step is not None else _latest_step(workdir)
    report = {
        "protocol": {"workdir": workdir, "step": ckpt_step, "ema": ema, "split": "eval",
                     "data_dir": config.data.get("data_dir", ""), "mixture": str(config.data.get("mixture", "")),
                     "clips": int(n_clips), "frames_per_clip": int(n_frames), "frames_scored": int(n_frames - 1),
                     "resolution": int(real.shape[2]), "steps": list(steps), "seed": seed, "noise_aug": 0.0,
                     "condition": "frame 0 + instruction", "range": "[0, 1]"},
        "metrics": {f"{n}_step": {"psnr": _mean(per_steps[n]["psnr"]), "ssim": _mean(per_steps[n]["ssim"])}
                    for n in steps},
        "per_clip": {f"{n}_step": {k: [float(x) for x in v] for k, v in per_steps[n].items()} for n in steps},
        "lpips": unavailable("LPIPS", lpips_weights),
        "fvd": unavailable("I3D (FVD)", i3d_weights),
    }
    paths.makedirs(out_dir)
    paths.write_text(paths.join(out_dir, "gfdm_quality.json"), json.dumps(report, indent=1, allow_nan=True) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["clip", "steps", "psnr", "ssim"])
    for n in steps:
        for i in range(n_clips):
            writer.writerow([i, n, f"{per_steps[n]['psnr'][i]:.4f}", f"{per_steps[n]['ssim'][i]:.6f}"])
    paths.write_text(paths.join(out_dir, "gfdm_quality.csv"), buf.getvalue())
    shown = slice(0, min(GIF_CLIPS, n_clips))
    evaluation.write_video_grid(paths.join(out_dir, "gfdm_quality.gif"),
                                [evaluation.to_uint8(real[shown])] + [evaluation.to_uint8(videos[n][shown])
                                                                      for n in steps],
                                fps=float(config.eval.get("gif_fps", 4)))
    return report


def _chunks(batch: dict, size: int):
    """``batch`` in chunks of ``size`` rows, the last one padded with copies of its first row."""
    n = len(batch["input_ids"])
    for i in range(0, n, size):
        rows = np.minimum(np.arange(i, i + size), n - 1)
        rows = np.where(np.arange(i, i + size) < n, rows, i)
        yield {k: v[rows] for k, v in batch.items()}


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _latest_step(workdir: str) -> int | None:
    from defi_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()
