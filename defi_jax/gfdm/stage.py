"""GFDM pretraining stage: EDM v-prediction of future VAE latents from the current frame + instruction.

    python -m launch.train --config=configs/gfdm.py:tiny --workdir=/tmp/gfdm

Data (``config.data.source``): ``"frames"`` reads ``gfdm_clip`` samples (uint8 current + K future frames
and the instruction) from ``data_pipelines`` and VAE-encodes them inside the train step; ``"latents"``
reads clips precomputed by ``python -m launch.precompute_latents`` from ``config.data.latents_dir``
(the released recipe). Instructions are tokenized in the data workers: with the CLIP BPE vocabulary of
``config.init.tokenizer_path`` (else ``config.init.clip_path``), else with the byte tokenizer
(``defi_jax.models.byte_tokenizer.clip_bytes``: tiny configs; no vocabulary can be downloaded into tests).

Evaluation writes ``eval_loss`` (EDM loss at fixed noise draws), PSNR / SSIM of sampled future frames
against the real ones, ``eval_motion_noise_share`` and ``<workdir>/samples/step_<N>.gif`` (real clip on top, sampled
clip below). ``eval_motion_noise_share``: how much of the one-step features' change from the current to the last
predicted frame (the motion the policy's GIDM reads, ``model.latent_action_frames`` of ``configs/policy.py``) the
noise draw makes, over two draws per clip (``evaluation.noise_share``): 1 = the predicted motion is noise, 0 = the
clip determines it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from defi_jax import stage as stage_lib, weights
from defi_jax.gfdm import evaluation
from defi_jax.gfdm.model import GFDM, GFDMOptions
from defi_jax.models import byte_tokenizer
from defi_jax.stage import NumericBatches, Stage, Tokenize

# config.data keys of this stage (the rest of config.data goes to data_pipelines.make_loader).
_STAGE_DATA_KEYS = ("source", "latents_dir")


def clip_tokenizer(path: str, max_length: int) -> stage_lib.TextTokenizer:
    """``text -> (ids, mask)`` of a CLIP text tower: the BPE vocabulary of the folder ``path``, or with no
    path the byte tokenizer (``byte_tokenizer.clip_bytes``). Also the policy's (GFDM text and goal token)."""
    if not path:
        return functools.partial(byte_tokenizer.clip_bytes, max_length=max_length)
    from defi_jax.models.clip_tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.from_folder(path)

    def encode(text: str):
        ids, mask = tok([text], max_length=max_length)
        return ids[0], mask[0]

    return encode


def tokenizer(config) -> stage_lib.TextTokenizer:
    """The instruction tokenizer of this stage's CLIP text tower (``config.model.text_tokens`` tokens)."""
    return clip_tokenizer(config.init.tokenizer_path or config.init.clip_path, config.model.text_tokens)


# ---- model ------------------------------------------------------------------------------------------
def build_model(config, rngs: nnx.Rngs) -> GFDM:
    """The GFDM from ``config.model`` (pure construction; published weights come in through ``config.init``:
    ``svd_path`` / ``clip_path`` or the ``unet`` / ``vae`` / ``text_encoder`` sources, defi_jax/weights.py)."""
    return GFDM(GFDMOptions.from_config(config.model), rngs=rngs, dtype=stage_lib.compute_dtype(config),
                param_dtype=jnp.dtype(config.train.param_dtype))


# ---- loss -------------------------------------------------------------------------------------------
def _batch_loss(model: GFDM, batch, rng, *, train: bool):
    k_cond, k_loss = jax.random.split(rng)
    latents, cond, noise_aug = model.conditioning_from_batch(batch, k_cond, train=train)
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return model.loss(latents, cond, text, noise_aug, k_loss, train=train)


def loss_fn(model: GFDM, batch, rng, config):
    del config
    return _batch_loss(model, batch, rng, train=True)


# ---- data -------------------------------------------------------------------------------------------
_BATCH_KEYS = ("frames", "latents", "input_ids", "attention_mask")


def loader_config(config) -> ml_collections.ConfigDict:
    """``config.data`` without this stage's own keys: what ``data_pipelines.make_loader`` gets."""
    return stage_lib.data_config(config, _STAGE_DATA_KEYS)


def make_data(config, process_index: int, process_count: int, split: str):
    d = config.data
    seed = config.seed + (0 if split == "train" else 1_000_003)
    transform = Tokenize(config, {("input_ids", "attention_mask"): tokenizer})
    if d.source == "latents":
        from defi_jax.gfdm import latents
        it = latents.make_loader(d.latents_dir, split, global_batch_size=config.train.batch_size,
                                 process_index=process_index, process_count=process_count, seed=seed,
                                 transform=transform, worker_count=d.num_workers)
        return NumericBatches(it, _BATCH_KEYS)
    import data_pipelines
    it = data_pipelines.make_loader("gfdm_clip", loader_config(config), global_batch_size=config.train.batch_size,
                                    process_index=process_index, process_count=process_count, seed=seed,
                                    split=split, transform=transform)
    return NumericBatches(it, _BATCH_KEYS)


# ---- evaluation -------------------------------------------------------------------------------------
def evaluate(model: GFDM, config, workdir: str, step: int, eval_iter) -> dict:
    """Validation loss at fixed noise draws; sampled videos: PSNR / SSIM of future frames and a GIF."""
    e = config.eval
    graphdef, state = nnx.split(model)
    val_loss, generate = stage_lib.eval_fns("gfdm", config, graphdef, _eval_fns)

    key = jax.random.key(config.seed + 17)  # the same noise at every evaluation: losses are comparable
    losses, first = [], None
    for i, batch in zip(range(e.batches), eval_iter):
        first = batch if first is None else first
        losses.append(float(val_loss(state, batch, jax.random.fold_in(key, i))[0]))
    if first is None:
        raise RuntimeError("GFDM evaluate: the eval iterator yielded no batch")
    metrics = {"eval_loss": float(np.mean(losses))}
    if e.num_videos > 0:
        n = min(e.num_videos, len(first["input_ids"]))
        sub = {k: v[:n] for k, v in first.items()}
        real, fake, p, s, motion_noise = generate(state, sub, jax.random.fold_in(key, 10_000))
        metrics |= {"eval_psnr": float(p), "eval_ssim": float(s), "eval_motion_noise_share": float(motion_noise)}
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{step:08d}.gif")
            evaluation.write_video_grid(path, [evaluation.to_uint8(real), evaluation.to_uint8(fake)],
                                        fps=e.gif_fps)
    return metrics


def _eval_fns(graphdef, config):
    """Jitted (validation loss, video generation) for one model structure (built once per run)."""
    jit = functools.partial(jax.jit, **stage_lib.jit_kwargs(config))

    @jit
    def val_loss(state, batch, rng):
        return _batch_loss(nnx.merge(graphdef, state), batch, rng, train=False)

    @jit
    def generate(state, batch, rng):
        model = nnx.merge(graphdef, state)
        latents, cond, _ = model.conditioning_from_batch(batch, rng, train=False)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        pred = model.sample(cond, text, rng, num_frames=latents.shape[1])   # model.sample_steps steps
        real = (batch["frames"].astype(jnp.float32) / 127.5 - 1.0) if "frames" in batch else model.decode(latents)
        fake = model.decode(pred)
        # Frame 0 is the given current frame; score the predicted future frames, in [0, 1].
        r01, f01 = (real[:, 1:] + 1) / 2, jnp.clip((fake[:, 1:] + 1) / 2, 0, 1)
        # What the policy's GIDM reads: the change of the one-step features from the current to the last
        # predicted frame, under two noise draws of one clip. Near 1, the predicted motion is the noise draw's.
        twice = lambda x: jnp.concatenate([x, x])   # one UNet call for both draws
        feats, _ = model.one_step_features(twice(real[:, 0]), twice(text), jax.random.fold_in(rng, 1),
                                           predict_latents=False)
        motion = feats[:, -1] - feats[:, 0]
        return (real, fake, evaluation.psnr(f01, r01).mean(), evaluation.ssim(f01, r01).mean(),
                evaluation.noise_share(*jnp.split(motion, 2)).mean())

    return val_loss, generate


def validate(config) -> None:
    m, d = config.model, config.data
    GFDMOptions.from_config(m)
    if d.source not in ("frames", "latents"):
        raise ValueError(f"config.data.source={d.source!r} must be 'frames' or 'latents'")
    if d.source == "latents" and not d.latents_dir:
        raise ValueError("config.data.latents_dir is empty but config.data.source='latents'")
    if d.source == "frames" and d.num_frames + 1 != m.num_frames:
        raise ValueError(f"config.data.num_frames={d.num_frames} future frames + the current one must equal "
                         f"config.model.num_frames={m.num_frames}")
    unet = dict(m.unet)
    if unet.get("in_channels", 8) != 2 * unet.get("out_channels", 4):
        raise ValueError(f"config.model.unet.in_channels={unet.get('in_channels')} must be 2 x out_channels "
                         f"(noisy latents + the repeated condition latent)")
    text_width = 2 * dict(m.text_encoder).get("hidden_size", 512)
    cross = unet.get("cross_attention_dim", 1024)
    if any(c != text_width for c in (cross if isinstance(cross, (list, tuple)) else [cross])):
        raise ValueError(f"config.model.unet.cross_attention_dim={cross} must be 2 x text hidden_size = {text_width}")
    if not config.init.clip_path and not config.init.tokenizer_path:
        vocab, need = dict(m.text_encoder).get("vocab_size", 49408), byte_tokenizer.CLIP_BYTES_VOCAB_SIZE
        if vocab < need:
            raise ValueError(f"config.model.text_encoder.vocab_size={vocab} < {need} needed by the byte tokenizer "
                             f"used when config.init.clip_path and config.init.tokenizer_path are empty")
    if m.feature_up_blocks < 1 or m.feature_up_blocks > len(unet.get("up_block_types", (0,) * 4)):
        raise ValueError(f"config.model.feature_up_blocks={m.feature_up_blocks} is out of range")
    weights.require_sources(config, {"unet": "unet/", "vae": "vae/", "text_encoder": "text_encoder/"})


def batch_spec(config) -> dict:
    """Global batch shapes (AOT compilation without reading data)."""
    m, d = config.model, config.data
    b, t, n = config.train.batch_size, m.num_frames, m.text_tokens
    spec = {"input_ids": jax.ShapeDtypeStruct((b, n), np.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, n), np.int32)}
    if d.source == "latents":
        h = d.resolution // 2 ** (len(dict(m.vae)["block_out_channels"]) - 1)
        spec["latents"] = jax.ShapeDtypeStruct((b, t, h, h, dict(m.unet).get("out_channels", 4)), np.float32)
    else:
        spec["frames"] = jax.ShapeDtypeStruct((b, t, d.resolution, d.resolution, 3), np.uint8)
    return spec


def check_data(config) -> None:
    if config.data.source == "latents":
        from defi_jax import paths
        if not paths.isdir(config.data.latents_dir):
            raise FileNotFoundError(f"config.data.latents_dir={config.data.latents_dir!r} does not exist (write it "
                                    f"with python -m launch.precompute_latents)")
        return
    import data_pipelines
    data_pipelines.check_sources(loader_config(config), "gfdm_clip")


STAGE = Stage(build_model=build_model, loss_fn=loss_fn, make_data=make_data, evaluate=evaluate, validate=validate,
              batch_spec=batch_spec, check_data=check_data)
