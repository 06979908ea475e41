"""DeFI policy fine-tuning stage (stage 3): frozen GFDM + GIDM adapter + diffusion action head on labelled windows.

    python -m launch.train --config=configs/policy.py:tiny --workdir=/tmp/policy
    python -m launch.train --config=configs/policy.py:defi --workdir=gs://bucket/policy \\
        --config.init.sources.gfdm.path=gs://bucket/gfdm --config.init.sources.gidm.path=gs://bucket/gidm \\
        --config.init.sources.goal_text.path=/ckpt/clip-vit-base-patch32 --config.data.mixture=calvin_abc_d \\
        --config.data.paths.calvin_abc_d=/data/calvin/task_ABC_D

Batch (``policy_window`` samples, instructions tokenized in the data workers): ``frames`` uint8 [B, V, H, W, 3]
(the last observation frame of each view), ``actions`` float32 [B, 10, 7] (normalized with the dataset's
statistics unless ``data.normalize_actions=False``), ``gfdm_ids`` / ``goal_ids`` / ``gidm_ids`` (+ masks):
the instruction for the GFDM's CLIP text, the CLIP goal token and the GIDM's instruction tower. With
``config.data.source=features`` the batch carries the frozen GFDM's precomputed features ``feats`` [B, V, T, h*w, C]
instead of ``frames`` (``launch.precompute_features``; :mod:`defi_jax.policy.features`).

Loss (the reference's): ``action_loss + codebook_loss + vq_beta * commitment_loss``. Frozen parts follow
``config.policy.finetune`` (:func:`frozen_patterns`). Evaluation: held-out ``eval_action_loss`` at fixed draws
and ``eval_action_mse`` of sampled chunks (10 sampler steps) against the true ones, in normalized units.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import stage as stage_lib
from defi_jax.policy.model import DeFIPolicyModel
from defi_jax.stage import NumericBatches, Stage, Tokenize

FINETUNE = ("gidm_adapter", "adapter_only", "all")
FRAMES_BATCH_KEYS = ("frames", "actions", "gfdm_ids", "gfdm_mask", "goal_ids", "goal_mask", "gidm_ids", "gidm_mask")
_STAGE_DATA_KEYS = ("source", "features_dir")


def frozen_patterns(config) -> tuple[str, ...]:
    """Regexes of the parameters ``config.policy.finetune`` keeps frozen (no gradient, no optimizer state).

    gidm_adapter (default)  GFDM frozen; GIDM encoder, Video Former and head trained
    adapter_only            the GIDM's latent action model frozen too
    all                     the GFDM's UNet trained as well (its VAE and CLIP text stay frozen)
    The CLIP goal tower and a T5 instruction tower are frozen in every mode, as in the reference.
    """
    mode = config.policy.finetune
    if mode not in FINETUNE:
        raise ValueError(f"config.policy.finetune={mode!r} must be one of {FINETUNE}")
    out = [r"^goal_text/", r"^gfdm/vae/", r"^gfdm/text_encoder/"]
    if config.model.gidm.text_encoder == "t5":
        out.append(r"^latent_actions/lam/text_encoder/")
    if mode != "all":
        out.append(r"^gfdm/unet/")
    if mode == "adapter_only":
        out.append(r"^latent_actions/lam/")
    if config.model.get("center_features", False):
        out.append(r"^feature_stats/")   # the features' mean (model.center_features): a statistic, not trained
    return tuple(out)


def build_model(config, rngs: nnx.Rngs) -> DeFIPolicyModel:
    return DeFIPolicyModel(config.model, rngs=rngs, dtype=stage_lib.compute_dtype(config),
                           param_dtype=jnp.dtype(config.train.param_dtype),
                           frozen_gfdm=config.policy.finetune != "all")


# ---- loss -------------------------------------------------------------------------------------------
def encode_instruction(model: DeFIPolicyModel, batch) -> dict:
    return model.encode_instruction(*(batch[f"{n}_{k}"] for n in ("gfdm", "goal", "gidm") for k in ("ids", "mask")))


def _encoded(model: DeFIPolicyModel, batch, rng, *, rows=None):
    """(instruction encodings, GFDM features, latent-action key, dropout key) of a batch: the GFDM's features of
    ``frames``, or the batch's precomputed ``feats``. ``rows`` [B] gives each sample another row's observation,
    under the same draws."""
    k_feat, k_vq, k_drop = jax.random.split(rng, 3)
    text = encode_instruction(model, batch)
    if "feats" in batch:
        feats = batch["feats"] if rows is None else batch["feats"][rows]
        return text, feats, k_vq, k_drop
    frames = batch["frames"] if rows is None else batch["frames"][rows]
    return text, model.features(frames, text["gfdm"], k_feat), k_vq, k_drop


def _context(model: DeFIPolicyModel, batch, rng, *, train: bool, dropout: bool):
    text, feats, k_vq, k_drop = _encoded(model, batch, rng)
    return model.context(feats, text, train=train, rng=k_vq, dropout_rng=k_drop if dropout else None)


def _objective(model: DeFIPolicyModel, context, la, batch, rng, config, *, dropout_rng=None):
    """The head's denoising loss on ``context`` + the latent-action VQ terms ``la``, and its metrics."""
    action_loss = model.head.loss(context, batch["actions"].astype(jnp.float32), rng, dropout_rng=dropout_rng)
    beta = config.model.gidm.vq_beta
    loss = action_loss + la["codebook_loss"] + beta * la["commitment_loss"]
    metrics = {"action_loss": action_loss, "codebook_loss": la["codebook_loss"],
               "commitment_loss": la["commitment_loss"]}
    if "perplexity" in la:
        metrics |= {"codebook_perplexity": la["perplexity"], "codes_used": la["codes_used"]}
    return loss, metrics


def loss_fn(model: DeFIPolicyModel, batch, rng, config):
    k_ctx, k_head, k_drop = jax.random.split(rng, 3)
    context, la = _context(model, batch, k_ctx, train=True, dropout=True)
    return _objective(model, context, la, batch, k_head, config, dropout_rng=k_drop)


# ---- data -------------------------------------------------------------------------------------------
def _gfdm_tokenizer(config) -> stage_lib.TextTokenizer:
    from defi_jax.gfdm.stage import clip_tokenizer
    return clip_tokenizer(config.init.tokenizer_path, config.model.gfdm.text_tokens)


def _goal_tokenizer(config) -> stage_lib.TextTokenizer:
    from defi_jax.gfdm.stage import clip_tokenizer
    return clip_tokenizer(config.init.tokenizer_path, int(dict(config.model.goal_text)["max_position_embeddings"]))


def _gidm_tokenizer(config) -> stage_lib.TextTokenizer:
    from defi_jax.gidm.stage import model_tokenizer
    return model_tokenizer(config.model.gidm)


# The instruction three ways: the GFDM's CLIP text, the CLIP goal token, the GIDM's instruction tower.
_TOKENIZERS = {("gfdm_ids", "gfdm_mask"): _gfdm_tokenizer, ("goal_ids", "goal_mask"): _goal_tokenizer,
               ("gidm_ids", "gidm_mask"): _gidm_tokenizer}


def tokenizers(config) -> tuple[stage_lib.TextTokenizer, ...]:
    """(gfdm, goal, gidm) instruction tokenizers: callables ``text -> (ids int32[L], mask int32[L])``."""
    return tuple(factory(config) for factory in _TOKENIZERS.values())


def _last_frame(sample: dict) -> dict:
    """A ``policy_window`` sample's last observation frame per view: ``frames`` [V, H, W, 3]."""
    return dict(sample, frames=np.asarray(sample["frames"])[:, -1], actions=np.asarray(sample["actions"], np.float32))


def batch_keys(config) -> tuple[str, ...]:
    """The batch's keys: ``frames`` + actions + tokens, or ``feats`` in place of ``frames`` (data.source)."""
    from defi_jax.policy import features
    return features.BATCH_KEYS if config.data.get("source", "frames") == "features" else FRAMES_BATCH_KEYS


def loader_config(config):
    """``config.data`` without this stage's own keys (``source``, ``features_dir``): what ``data_pipelines`` gets."""
    return stage_lib.data_config(config, _STAGE_DATA_KEYS)


def make_data(config, process_index: int, process_count: int, split: str):
    import data_pipelines

    if config.data.get("source", "frames") == "features":
        from defi_jax.policy import features
        return features.make_data(config, process_index, process_count, split)
    d = loader_config(config)
    seed = config.seed + (0 if split == "train" else 1_000_003)
    loader = data_pipelines.make_loader("policy_window", d, global_batch_size=config.train.batch_size,
                                        process_index=process_index, process_count=process_count, seed=seed,
                                        split=split, transform=Tokenize(config, _TOKENIZERS, prepare=_last_frame))
    return NumericBatches(iter(loader), FRAMES_BATCH_KEYS)


def stats_dataset(config) -> str:
    """The dataset whose action statistics inference unnormalizes with (``policy.action_stats_dataset``, else
    the mixture's largest robot dataset)."""
    from data_pipelines import mixtures

    name = config.policy.action_stats_dataset
    if name:
        return name
    weights = mixtures.resolve(loader_config(config).mixture, key="config.data.mixture")
    return max(weights, key=weights.get)


def assets(config) -> dict[str, str]:
    """Files a policy checkpoint carries for inference: the action statistics and whether actions are normalized."""
    import data_pipelines

    if config.data.get("source", "frames") == "features":   # the store carries the run's assets (same data)
        from defi_jax.policy import features
        return features.read_meta(config.data.features_dir, "train")["assets"]
    name = stats_dataset(config)
    out = {"dataset": name, "normalized": bool(config.data.normalize_actions)}
    if config.data.normalize_actions:
        stats = data_pipelines.action_stats(name, loader_config(config))
        out["stats"] = {k: (np.asarray(v).tolist() if not isinstance(v, (int, float, str)) else v)
                        for k, v in stats.items()}
    return {"action_stats.json": json.dumps(out, indent=1)}


# ---- evaluation -------------------------------------------------------------------------------------
def _cyclic_partner(ids_BL: jax.Array, same: bool) -> jax.Array:
    B = ids_BL.shape[0]
    rows = jnp.arange(B)
    if B == 1:
        return rows
    cand_BK = (rows[:, None] + jnp.arange(1, B)[None]) % B                 # the other rows, nearest first
    hit_BK = jnp.all(ids_BL[cand_BK] == ids_BL[:, None], axis=-1) == same
    return jnp.where(hit_BK.any(-1), cand_BK[rows, jnp.argmax(hit_BK, axis=-1)], rows).astype(jnp.int32)


def same_instruction_partner(ids_BL: jax.Array) -> jax.Array:
    """[B] int32: for each row, the next row (cyclically) with the same instruction tokens, itself when none."""
    return _cyclic_partner(ids_BL, True)


def other_instruction_partner(ids_BL: jax.Array) -> jax.Array:
    """[B] int32: for each row, the next row (cyclically) with other instruction tokens, itself when none."""
    return _cyclic_partner(ids_BL, False)


def _eval_fns(graphdef, config):
    """The jitted evaluation step for one model structure (built once per run, not at every evaluation)."""
    steps, sigma_min = int(config.model.sample_steps), float(config.model.sample_sigma_min)
    swap_images = bool(config.eval.get("obs_info_gap", True))

    @functools.partial(jax.jit, **stage_lib.jit_kwargs(config))
    def one(state, batch, rng):
        model = nnx.merge(graphdef, state)
        k_ctx, k_head, k_noise = jax.random.split(rng, 3)
        # the held-out loss and the sampled chunks share one GFDM forward (the swap below runs a second)
        text, feats, k_vq, _ = _encoded(model, batch, k_ctx)
        context, la = model.context(feats, text, train=False, rng=k_vq)
        loss, metrics = _objective(model, context, la, batch, k_head, config)
        actions = batch["actions"].astype(jnp.float32)
        noise = model.head.initial_noise(k_noise, actions.shape[0])

        def sample(ctx):   # the sampled chunk, from the same initial noise for every probe
            return model.head.sample(ctx, noise, num_steps=steps, sigma_min=sigma_min)

        chunk_BAC = sample(context)
        err_B = jnp.mean((chunk_BAC - actions) ** 2, axis=(1, 2))
        # Does the head read the GIDM's latent actions? Each sample's head sees the latent-action tokens of a
        # sample of another instruction (its goal, video tokens and noise stay): the chunk's relative change.
        # Near 0, the latent actions' content never reaches the actions, nor can the GIDM's pretraining.
        other_B = other_instruction_partner(batch["goal_ids"])
        chunk_lat_BAC = sample(model.context(feats, text, train=False, rng=k_vq, latent_rows=other_B)[0])
        B = actions.shape[0]
        change_B = (jnp.linalg.norm((chunk_lat_BAC - chunk_BAC).reshape(B, -1), axis=-1)
                    / jnp.maximum(jnp.linalg.norm(chunk_BAC.reshape(B, -1), axis=-1), 1e-12))
        lat_B = other_B != jnp.arange(other_B.shape[0])
        probes = {"latent_swap_rows": lat_B.sum(), "latent_swap_change_sum": jnp.sum(jnp.where(lat_B, change_B, 0.0))}
        if not swap_images:   # config.eval.obs_info_gap=False: one GFDM forward per batch
            return loss, metrics, err_B.mean(), probes
        # Does the policy read its observation beyond the task? Each sample sees the images of another sample
        # with the same instruction (another episode or moment of the task) under the same draws; its
        # instruction, noise and actions stay. A policy that acts on the instruction alone loses nothing.
        partner_B = same_instruction_partner(batch["goal_ids"])
        _, feats_other, _, _ = _encoded(model, batch, k_ctx, rows=partner_B)
        err_other_B = jnp.mean((sample(model.context(feats_other, text, train=False, rng=k_vq)[0]) - actions) ** 2,
                               axis=(1, 2))
        swapped_B = partner_B != jnp.arange(partner_B.shape[0])
        probes |= {"obs_swap_rows": swapped_B.sum(), "obs_swap_err_sum": jnp.sum(jnp.where(swapped_B, err_B, 0.0)),
                   "obs_swap_err_other_sum": jnp.sum(jnp.where(swapped_B, err_other_B, 0.0))}
        return loss, metrics, err_B.mean(), probes

    return one


def evaluate(model: DeFIPolicyModel, config, workdir: str, step: int, eval_iter) -> dict:
    """Held-out loss at fixed draws and the sampled chunks' MSE against the true actions (``eval_action_mse``).

    ``eval_obs_info_gap``: how much that MSE grows, over the ``eval_obs_swap_rows`` samples that have another
    sample of the same instruction in their batch, when each sees that other sample's images (same draws).
    Near 0, the policy acts on its instruction alone: it does not read where things are. NaN when no batch
    held two samples of one instruction. It costs a second GFDM forward and sampler run per batch, about
    doubling the evaluation: ``config.eval.obs_info_gap=False`` leaves it (and ``eval_obs_swap_rows``) out.

    ``eval_latent_swap_change``: the sampled chunk's relative change ``|a' - a| / |a|`` (same draws), over the
    ``eval_latent_swap_rows`` samples that have a sample of another instruction in their batch, when the head
    reads that sample's latent-action tokens instead of its own. Near 0, the head ignores what the GIDM's
    latent actions say, and no GIDM pretraining can reach the actions. NaN when every sample of every batch
    had one instruction. A second sampler run per batch, no second GFDM forward."""
    del workdir, step
    graphdef, state = nnx.split(model)
    one = stage_lib.eval_fns("policy", config, graphdef, _eval_fns)
    rng = jax.random.key(config.seed + 23)   # the same draws at every evaluation
    sums, swap, n = {}, {}, 0
    keys = batch_keys(config)
    for i, batch in zip(range(int(config.eval.batches)), eval_iter):
        loss, metrics, mse, sw = one(state, {k: batch[k] for k in keys}, jax.random.fold_in(rng, i))
        for k, v in (metrics | {"loss": loss, "action_mse": mse}).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in sw.items():
            swap[k] = swap.get(k, 0.0) + float(v)
        n += 1
    if n == 0:
        raise RuntimeError("policy evaluate: the eval iterator yielded no batch (config.data: empty eval split?)")
    out = {f"eval_{k}": v / n for k, v in sums.items()}
    rows = swap["latent_swap_rows"]
    out |= {"eval_latent_swap_change": swap["latent_swap_change_sum"] / rows if rows else float("nan"),
            "eval_latent_swap_rows": rows}
    if "obs_swap_rows" not in swap:   # config.eval.obs_info_gap=False
        return out
    rows = swap["obs_swap_rows"]
    gap = (swap["obs_swap_err_other_sum"] - swap["obs_swap_err_sum"]) / rows if rows else float("nan")
    return out | {"eval_obs_info_gap": gap, "eval_obs_swap_rows": rows}


# ---- checks and shapes ------------------------------------------------------------------------------
# policy.<key> value -> the config.init.sources entry that value does not read: the stage's pretrained workdir.
_NOT_PRETRAINED = {"gidm_init": ("random", "gidm"), "gfdm_init": ("initial", "gfdm")}


# The GFDM stage trains only its UNet (configs/gfdm.py freezes vae/ and text_encoder/): a GFDM workdir's VAE and
# text tower are the weights its pretraining started from. svd_* source -> its sub-tree in a GFDM workdir.
_GFDM_FROZEN_TOWERS = {"svd_vae": "vae/", "svd_clip": "text_encoder/"}


def resolve_init(config) -> None:
    """Empties ``config.init.sources.gidm.path`` under ``policy.gidm_init=random`` and ``.gfdm.path`` under
    ``policy.gfdm_init=initial``: a config that names a pretrained workdir (``tiny`` names the demo's) then
    starts from random / initial weights, as the switch says, instead of silently loading that workdir.
    ``gfdm_init=initial`` keeps the ``svd_*`` sources (the un-fine-tuned weights); the ones without a path
    (``svd_vae``, ``svd_clip``) then read the frozen VAE / text tower of the GFDM workdir the pretrained variant
    would load, which its pretraining never changed: only the UNet starts un-pretrained, as in the paper's
    ablation (SVD's own VAE and CLIP kept). With ``model.center_features`` and ``data.source=features``,
    ``init.sources.feature_stats.path`` becomes ``data.features_dir``. The stage's ``resolve`` hook
    (``config_validation.resolve``: the trainer and launch.ablate call it before validating), so every run and
    the ``config.json`` it records see the resolved sources."""
    gfdm = config.init.sources.get("gfdm")
    if config.policy.gfdm_init == "initial" and gfdm is not None and gfdm.path:
        for name, prefix in _GFDM_FROZEN_TOWERS.items():
            tower = config.init.sources.get(name)
            if tower is not None and not tower.path:
                tower.kind, tower.path, tower.prefix, tower.step = "workdir", gfdm.path, prefix, gfdm.step
    for key, (value, name) in _NOT_PRETRAINED.items():
        source = config.init.sources.get(name)
        if config.policy[key] == value and source is not None and source.path:
            source.path = ""
    stats = config.init.sources.get("feature_stats")
    if (config.model.get("center_features", False) and stats is not None
            and config.data.get("source", "frames") == "features"):
        stats.path = config.data.features_dir   # the store's own statistics: the features it holds are its GFDM's


def validate_sampler(m) -> None:
    """The inference-time keys of ``config.model`` (training and ``inference.with_sampler`` alike)."""
    if not 1 <= m.gfdm_steps <= m.gfdm.feature_steps:
        raise ValueError(f"config.model.gfdm_steps={m.gfdm_steps} must be in [1, model.gfdm.feature_steps="
                         f"{m.gfdm.feature_steps}]")
    if m.sample_steps < 1:
        raise ValueError(f"config.model.sample_steps={m.sample_steps} must be >= 1")
    if not 0 < m.sample_sigma_min < m.head.sigma_max:
        raise ValueError(f"config.model.sample_sigma_min={m.sample_sigma_min} must be in (0, model.head.sigma_max="
                         f"{m.head.sigma_max:g})")


def validate(config) -> None:
    from defi_jax import weights
    from defi_jax.policy.model import LATENT_ACTIONS

    m, p = config.model, config.policy
    frozen_patterns(config)
    if m.latent_action not in LATENT_ACTIONS:
        raise ValueError(f"config.model.latent_action={m.latent_action!r} must be one of {LATENT_ACTIONS}")
    validate_sampler(m)
    if max(m.latent_action_frames) >= m.gfdm.num_frames:
        raise ValueError(f"config.model.latent_action_frames={tuple(m.latent_action_frames)} must be < "
                         f"model.gfdm.num_frames={m.gfdm.num_frames}")
    if len(config.data.views) != m.num_views:
        raise ValueError(f"config.data.views={tuple(config.data.views)} must name config.model.num_views="
                         f"{m.num_views} cameras (static view first)")
    if config.data.action_horizon != m.horizon:
        raise ValueError(f"config.data.action_horizon={config.data.action_horizon} != config.model.horizon={m.horizon}")
    if p.gfdm_init not in ("pretrained", "initial"):
        raise ValueError(f"config.policy.gfdm_init={p.gfdm_init!r} must be 'pretrained' or 'initial'")
    if p.gidm_init not in ("pretrained", "random"):
        raise ValueError(f"config.policy.gidm_init={p.gidm_init!r} must be 'pretrained' or 'random'")
    d = config.data
    source = d.get("source", "frames")
    if source not in ("frames", "features"):
        raise ValueError(f"config.data.source={source!r} must be 'frames' or 'features'")
    if source == "features" and not d.get("features_dir", ""):
        raise ValueError("config.data.features_dir is empty but config.data.source='features' (write a store with "
                         "python -m launch.precompute_features)")
    if source == "features" and p.finetune == "all":
        raise ValueError("config.data.source='features' with config.policy.finetune='all': the GFDM is trained, so "
                         "precomputed features would be stale")
    if m.get("scale_features", False) and not m.get("center_features", False):
        raise ValueError("config.model.scale_features=True needs config.model.center_features=True (the features "
                         "are centred, then scaled)")
    stats = config.init.sources.get("feature_stats")
    if m.get("center_features", False) and (stats is None or not stats.path) and not config.init.allow_random:
        raise ValueError("config.model.center_features=True but config.init.sources.feature_stats.path is empty: "
                         "point it at a launch.precompute_features folder (data.source=features sets it)")
    for key, (value, name) in _NOT_PRETRAINED.items():
        source = config.init.sources.get(name)
        if p[key] == value and source is not None and source.path:
            raise ValueError(f"config.init.sources.{name}.path={source.path!r} but config.policy.{key}={value!r} "
                             f"does not read it: resolve the config first (config_validation.resolve empties it)")
    weights.require_sources(config, {"goal_text": "goal_text/"})
    # The two pretrained stages are required whether frozen or not: without them the run would silently be
    # the "no GFDM / GIDM pretraining" ablation, which is config.policy.{gfdm,gidm}_init.
    import re
    covered = [s.target for s in weights.active_sources(config)]
    wanted = {"gfdm": ("gfdm/unet/", "gfdm_init", "a GFDM workdir (or the published SVD weights)"),
              "gidm": ("latent_actions/lam/encoder/", "gidm_init", "a GIDM workdir")}
    for name, (prefix, key, what) in wanted.items():
        if p[key] == "pretrained" and not any(re.match(t, prefix) for t in covered) \
                and not config.init.allow_random:
            raise ValueError(f"config.init.sources.{name}.path is empty but config.policy.{key}='pretrained': point "
                             f"it at {what}, or set config.policy.{key} (the ablation without that pretraining)")


def _frames_spec(config, b: int) -> dict:
    m, r = config.model, config.data.resolution
    spec = {"frames": jax.ShapeDtypeStruct((b, m.num_views, r, r, 3), np.uint8),
            "actions": jax.ShapeDtypeStruct((b, m.horizon, m.action_dim), np.float32)}
    lens = {"gfdm": m.gfdm.text_tokens, "goal": dict(m.goal_text)["max_position_embeddings"],
            "gidm": m.gidm.max_text_len}
    for name, n in lens.items():
        spec[f"{name}_ids"] = jax.ShapeDtypeStruct((b, n), np.int32)
        spec[f"{name}_mask"] = jax.ShapeDtypeStruct((b, n), np.int32)
    return spec


def feature_shape(config) -> tuple[int, ...]:
    """[V, T, h*w, C] of one sample's GFDM features (abstract: nothing allocated, no file read)."""
    from defi_jax import nn
    with nn.fast_traced_rngs():
        graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))

    def features(state, batch):
        model = nnx.merge(graphdef, state)
        return model.features(batch["frames"], encode_instruction(model, batch)["gfdm"], jax.random.key(0))

    return tuple(jax.eval_shape(features, state, _frames_spec(config, 1)).shape[1:])


def batch_spec(config) -> dict:
    spec = _frames_spec(config, config.train.batch_size)
    if config.data.get("source", "frames") != "features":
        return spec
    frames = spec.pop("frames")
    return {"feats": jax.ShapeDtypeStruct((frames.shape[0], *feature_shape(config)), np.float32)} | spec


def check_data(config) -> None:
    if config.data.get("source", "frames") == "features":
        from defi_jax.policy import features
        features.check(config)   # its fingerprint (GFDM, views, resolution, ...) fixes the features' shape
        return
    import data_pipelines
    data_pipelines.check_sources(loader_config(config), "policy_window")


def prepare(config) -> None:
    """Before training: with ``policy.pretrain_missing`` (the small variants) trains the tiny GFDM / GIDM into their
    source workdirs when those hold no checkpoint yet, on this run's data (the demo's by default; under
    ``gfdm_init=initial`` the GFDM workdir its frozen VAE / text tower come from); then, with
    ``model.center_features`` on frames and ``policy.feature_stats_windows`` > 0, computes the GFDM features'
    statistics into ``init.sources.feature_stats.path`` when that folder has none yet (statistics found there must be
    this run's GFDM's: :func:`features.check_stats`)."""
    from defi_jax import paths

    if config.policy.get("pretrain_missing", False):
        import importlib

        from defi_jax import trainer

        for name in ("gidm", "gfdm"):
            key = name
            path = config.init.sources[name].path if config.policy[f"{name}_init"] == "pretrained" else ""
            if name == "gfdm" and not path:   # gfdm_init=initial: the GFDM workdir its frozen towers come from
                for key, prefix in _GFDM_FROZEN_TOWERS.items():   # as resolve_init set them, not a user's own
                    tower = config.init.sources.get(key)
                    if tower is not None and (tower.kind, tower.prefix) == ("workdir", prefix) and tower.path:
                        path = tower.path
                        break
            if not path or paths.isdir(paths.join(path, "checkpoints")):
                continue
            stage_config = importlib.import_module(f"configs.{name}").get_config("tiny")
            stage_config.data.data_dir = config.data.data_dir
            print(f"policy: no {name.upper()} checkpoint in {path} (config.init.sources.{key}.path): training "
                  f"configs/{name}.py:tiny there first", flush=True)
            trainer.train(stage_config, path)
    stats = config.init.sources.get("feature_stats")
    windows = int(config.policy.get("feature_stats_windows", 0))
    if (not config.model.get("center_features", False) or config.data.get("source", "frames") != "frames"
            or stats is None or not stats.path):
        return
    from defi_jax.policy import features

    if paths.exists(paths.join(stats.path, features.STATS_FILE)):
        features.check_stats(config)   # this GFDM's, of these inputs
        return
    if windows < 1:
        return   # the weights loader names the missing file
    print(f"policy: no GFDM feature statistics in {stats.path} (config.init.sources.feature_stats.path): computing "
          f"them from {windows} training windows (config.policy.feature_stats_windows) first", flush=True)
    features.precompute(config, stats.path, {"train": windows}, batch_size=min(32, windows), stats_only=True)


STAGE = Stage(build_model=build_model, loss_fn=loss_fn, make_data=make_data, evaluate=evaluate, validate=validate,
              resolve=resolve_init,
              batch_spec=batch_spec, frozen=frozen_patterns, assets=assets, check_data=check_data, prepare=prepare)
