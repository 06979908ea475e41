"""GFDM pretraining stage: EDM v-prediction of future VAE latents from the current frame + instruction.

    python -m launch.train --config=configs/gfdm.py:tiny --workdir=/tmp/gfdm

Data (``config.data.source``): ``"frames"`` reads ``gfdm_clip`` samples (uint8 current + K future frames
and the instruction) from ``data_pipelines`` and VAE-encodes them inside the train step; ``"latents"``
reads clips precomputed by ``python -m launch.precompute_latents`` from ``config.data.latents_dir``
(the released recipe). Instructions are tokenized in the data workers: with the CLIP BPE vocabulary of
``config.init.clip_path`` (or ``config.init.tokenizer_path``), else with :class:`ByteTokenizer` (tiny
configs; no vocabulary can be downloaded into tests).

Evaluation writes ``eval_loss`` (EDM loss at fixed noise draws), PSNR / SSIM of sampled future frames
against the real ones, and ``<workdir>/samples/step_<N>.gif`` (real clip on top, sampled clip below).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from defi_jax.gfdm import evaluation
from defi_jax.gfdm.model import GFDM, GFDMOptions
from defi_jax import weights
from defi_jax.stage import NumericBatches, Stage

_log = logging.getLogger(__name__)

# config.data keys of this stage (the rest of config.data goes to data_pipelines.make_loader).
_STAGE_DATA_KEYS = ("source", "latents_dir", "seed")


class ByteTokenizer:
    """Fallback tokenizer for configs without a CLIP vocabulary: UTF-8 bytes shifted by 3.

    ``bos = 1``, ``eos = pad = 2`` (CLIP pads with its end-of-text token too); lower-cased like CLIP;
    the same call signature and truncation rule as ``defi_jax.models.clip_tokenizer.CLIPTokenizer``.
    Needs a text encoder with ``vocab_size >= 259``.
    """

    vocab_size = 259
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __call__(self, texts, max_length: int):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            seq = [self.bos_token_id, *(b + 3 for b in " ".join(text.split()).lower().encode()), self.eos_token_id]
            if len(seq) > max_length:
                seq = seq[:max_length - 1] + [self.eos_token_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask


def make_tokenizer(config):
    init = config.get("init", {})
    path = init.get("tokenizer_path", "") or init.get("clip_path", "")
    if path:
        from defi_jax.models.clip_tokenizer import CLIPTokenizer
        return CLIPTokenizer.from_folder(path)
    return ByteTokenizer()


class Tokenize:
    """Per-sample transform (runs in grain workers): instruction -> ``input_ids``, ``attention_mask``."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, example: dict) -> dict:
        ids, mask = self.tokenizer([str(example["instruction"])], max_length=self.max_length)
        return {**example, "input_ids": ids[0], "attention_mask": mask[0]}


# ---- model ------------------------------------------------------------------------------------------
def build_model(config, rngs: nnx.Rngs) -> GFDM:
    """The GFDM from ``config.model`` (pure construction; published weights come in through ``config.init``:
    ``svd_path`` / ``clip_path`` or the ``unet`` / ``vae`` / ``text_encoder`` sources, defi_jax/weights.py)."""
    t = config.train
    dtype = None if t.compute_dtype == "float32" else jnp.dtype(t.compute_dtype)
    return GFDM(GFDMOptions.from_config(config.model), rngs=rngs, dtype=dtype,
                param_dtype=jnp.dtype(t.param_dtype), attention_impl=config.get("attention_impl", None))


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
    d = {k: v for k, v in config.data.to_dict().items() if k not in _STAGE_DATA_KEYS}
    if isinstance(d.get("mixture"), dict):  # a ConfigDict cannot hold a plain dict: use the "name:w,..." form
        d["mixture"] = ",".join(f"{name}:{w}" for name, w in d["mixture"].items())
    return ml_collections.ConfigDict(d)


def make_data(config, process_index: int, process_count: int, split: str):
    d = config.data
    seed = d.get("seed", config.seed) + (0 if split == "train" else 1_000_003)
    transform = Tokenize(make_tokenizer(config), config.model.text_tokens)
    if d.source == "latents":
        from defi_jax.gfdm import latents
        it = latents.make_loader(d.latents_dir, split, global_batch_size=config.train.batch_size,
                                 process_index=process_index, process_count=process_count, seed=seed,
                                 transform=transform, worker_count=d.get("num_workers", 0))
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
    # The model's structure is a function of its config: reuse the compiled functions across evaluations.
    cache_key = (config.model.to_json_best_effort(sort_keys=True), config.train.compute_dtype, e.sample_steps,
                 json.dumps(_jit_kwargs(config), sort_keys=True))
    if cache_key not in _EVAL_FNS:
        _EVAL_FNS.clear()
        _EVAL_FNS[cache_key] = _eval_fns(graphdef, e.sample_steps, _jit_kwargs(config))
    val_loss, generate = _EVAL_FNS[cache_key]

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
        real, fake, p, s = generate(state, sub, jax.random.fold_in(key, 10_000))
        metrics |= {"eval_psnr": float(p), "eval_ssim": float(s)}
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{step:08d}.gif")
            evaluation.write_video_grid(path, [evaluation.to_uint8(real), evaluation.to_uint8(fake)],
                                        fps=e.get("gif_fps", 4))
    return metrics


_EVAL_FNS: dict = {}


def _eval_fns(graphdef, sample_steps: int, jit_kwargs: dict):
    """Jitted (validation loss, video generation) for one model structure."""
    jit = functools.partial(jax.jit, **jit_kwargs)

    @jit
    def val_loss(state, batch, rng):
        return _batch_loss(nnx.merge(graphdef, state), batch, rng, train=False)

    @jit
    def generate(state, batch, rng):
        model = nnx.merge(graphdef, state)
        latents, cond, _ = model.conditioning_from_batch(batch, rng, train=False)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        pred = model.sample(cond, text, rng, num_frames=latents.shape[1], num_steps=sample_steps)
        real = (batch["frames"].astype(jnp.float32) / 127.5 - 1.0) if "frames" in batch else model.decode(latents)
        fake = model.decode(pred)
        # Frame 0 is the given current frame; score the predicted future frames, in [0, 1].
        r01, f01 = (real[:, 1:] + 1) / 2, jnp.clip((fake[:, 1:] + 1) / 2, 0, 1)
        return real, fake, evaluation.psnr(f01, r01).mean(), evaluation.ssim(f01, r01).mean()

    return val_loss, generate


def _jit_kwargs(config) -> dict:
    opts = config.train.get("compiler_options", None)
    return {"compiler_options": dict(opts)} if opts else {}


def validate(config) -> None:
    m, d = config.model, config.data
    GFDMOptions.from_config(m)
    if d.get("source", "frames") not in ("frames", "latents"):
        raise ValueError(f"config.data.source={d.source!r} must be 'frames' or 'latents'")
    if d.source == "latents" and not d.get("latents_dir", ""):
        raise ValueError("config.data.latents_dir is empty but config.data.source='latents'")
    if d.source == "frames" and d.get("num_frames", m.num_frames - 1) + 1 != m.num_frames:
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
    if not config.get("init", {}).get("clip_path", "") and not config.get("init", {}).get("tokenizer_path", ""):
        vocab = dict(m.text_encoder).get("vocab_size", 49408)
        if vocab < ByteTokenizer.vocab_size:
            raise ValueError(f"config.model.text_encoder.vocab_size={vocab} < {ByteTokenizer.vocab_size} needed by "
                             f"the byte tokenizer used when config.init.clip_path is empty")
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
