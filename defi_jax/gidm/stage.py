"""GIDM pretraining stage: frame pairs (o_t, o_{t+n}) + instructions -> latent actions, no action labels.

Loss (the reference's ``DINO_LAM.shared_step``): ``recon_loss + codebook_loss + vq_beta * commitment_loss``.

Training metrics (``metrics.jsonl``): ``loss``, ``recon_loss``, ``codebook_loss``, ``commitment_loss``,
``codebook_perplexity`` (exp entropy of this batch's code histogram), ``codes_used`` (fraction of the
codebook hit by the batch), ``action_info_gap`` (decoder loss with the latent actions moved to another
sample of the batch minus the loss with the true ones: positive when the tokens carry the motion).
Evaluation (``config.eval.batches`` held-out batches) adds the same on them (``eval_*``) and ``probe_r2``: a
closed-form ridge regression (strength ``config.eval.probe_ridge``) from the quantized tokens of held-out robot
pairs to their true actions, fitted on the first half of the eval batches and scored (R^2, variance-weighted over
action dims) on the second half; ``probe_r2_continuous`` does the same from the pre-quantization latents.

``config.train.reverse_pair_prob`` (0 in ``defi``, 0.5 in ``tiny``) swaps o_t and o_{t+n} of that share
of training pairs (not in the reference; see ``loss_fn``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import stage as stage_lib, weights
from defi_jax.gidm.model import LatentActionModel
from defi_jax.models import byte_tokenizer
from defi_jax.stage import NumericBatches, Stage, Tokenize

_TRAIN_KEYS = ("frames", "input_ids", "attention_mask")
_EVAL_KEYS = _TRAIN_KEYS + ("actions", "has_actions")


def build_model(config, rngs: nnx.Rngs) -> LatentActionModel:
    """Pure construction; the DINOv2 / T5 weights come in through ``config.init.sources`` (dinov2, t5)."""
    return LatentActionModel(config.model, rngs=rngs, dtype=stage_lib.compute_dtype(config))


def _metrics(model, batch, rng, config, *, train: bool):
    vq_rng, shuffle_rng = jax.random.split(rng)
    out = model(batch["frames"], batch["input_ids"], batch["attention_mask"], train=train, rng=vq_rng,
                shuffle_rng=shuffle_rng)
    target = out["target"].astype(jnp.float32)
    recon_loss = jnp.mean((target - out["recon"].astype(jnp.float32)) ** 2)
    shuffled_loss = jnp.mean((target - out["recon_shuffled"].astype(jnp.float32)) ** 2)
    loss = recon_loss + out["codebook_loss"] + config.model.vq_beta * out["commitment_loss"]
    metrics = {
        "recon_loss": recon_loss,
        "codebook_loss": out["codebook_loss"],
        "commitment_loss": out["commitment_loss"],
        "codebook_perplexity": out["perplexity"],
        "codes_used": out["codes_used"],
        "action_info_gap": shuffled_loss - recon_loss,
    }
    return loss, metrics, out


def loss_fn(model: LatentActionModel, batch, rng, config):
    p = float(config.train.reverse_pair_prob)
    if p > 0:
        # Time-reversal augmentation (not in the reference): on deterministic scripted demos o_{t+n} is
        # predictable from o_t alone; reversing some pairs makes the direction of motion knowable only
        # through the latent action.
        rng, flip_rng = jax.random.split(rng)
        flip_B = jax.random.bernoulli(flip_rng, p, (batch["frames"].shape[0],))
        frames = jnp.where(flip_B[:, None, None, None, None], batch["frames"][:, ::-1], batch["frames"])
        batch = dict(batch, frames=frames)
    loss, metrics, _ = _metrics(model, batch, rng, config, train=True)
    return loss, metrics


# ------------------------------------------------------------------------------------------ data

def model_tokenizer(model_config) -> stage_lib.TextTokenizer:
    """``text -> (ids, mask)`` of a GIDM ``config.model`` (``max_text_len`` tokens): the bytes of the trainable
    byte embedding (``text_encoder="bytes"``) or T5's SentencePiece model (``tokenizer_path``). Also the policy's."""
    m = model_config
    if m.text_encoder == "bytes":
        return functools.partial(byte_tokenizer.gidm_bytes, max_length=m.max_text_len)
    from defi_jax.models.t5_tokenizer import T5Tokenizer
    if not m.tokenizer_path:
        raise ValueError("config.model.tokenizer_path is empty: the T5 SentencePiece model (folder or "
                         "spiece.model) is needed to tokenize instructions")
    tok = T5Tokenizer(m.tokenizer_path)

    def encode(text: str):
        ids, mask = tok.encode_padded(text, m.max_text_len)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    return encode


def tokenizer(config) -> stage_lib.TextTokenizer:
    """This stage's instruction tokenizer (see :func:`model_tokenizer`)."""
    return model_tokenizer(config.model)


def make_data(config, process_index: int, process_count: int, split: str):
    import data_pipelines

    d = config.data
    if d.mixture == "demo" and not d.data_dir:
        from data_pipelines import demo
        demo.ensure_demo_data()
    loader = data_pipelines.make_loader(
        "gidm_pair", d, global_batch_size=config.train.batch_size, process_index=process_index,
        process_count=process_count, seed=config.seed, split=split,
        transform=Tokenize(config, {("input_ids", "attention_mask"): tokenizer}))
    return NumericBatches(iter(loader), _TRAIN_KEYS if split == "train" else _EVAL_KEYS)


def batch_spec(config) -> dict:
    m, b = config.model, config.train.batch_size
    s = m.image_size
    return {"frames": jax.ShapeDtypeStruct((b, 2, s, s, 3), jnp.uint8),
            "input_ids": jax.ShapeDtypeStruct((b, m.max_text_len), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, m.max_text_len), jnp.int32)}


# ------------------------------------------------------------------------------------------ eval

def ridge_probe_r2(x_train, y_train, x_test, y_test, ridge: float) -> float:
    """Closed-form ridge regression (with bias) fitted on train, R^2 on test (variance-weighted)."""
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xc, yc = x_train - x_mean, y_train - y_mean
    gram = xc.T @ xc + ridge * len(xc) * np.eye(xc.shape[1])
    w = np.linalg.solve(gram, xc.T @ yc)
    pred = (x_test - x_mean) @ w + y_mean
    sse = np.sum((y_test - pred) ** 2)
    sst = np.sum((y_test - y_test.mean(0)) ** 2)
    return float(1.0 - sse / max(sst, 1e-12))


def _eval_fns(graphdef, config):
    """The jitted evaluation step for one model structure (built once per run, not at every evaluation)."""

    @functools.partial(jax.jit, **stage_lib.jit_kwargs(config))
    def one(state, batch, rng):
        loss, metrics, out = _metrics(nnx.merge(graphdef, state), batch, rng, config, train=False)
        return loss, metrics, out["z_q"], out["z_e"]

    return one


def evaluate(model, config, workdir, step, eval_iter) -> dict:
    """Held-out losses and the linear action probe over ``config.eval.batches`` batches."""
    del workdir
    graphdef, state = nnx.split(model)
    one = stage_lib.eval_fns("gidm", config, graphdef, _eval_fns)

    rng = jax.random.PRNGKey(config.seed + int(step))
    sums: dict[str, float] = {}
    tokens, latents, actions = [], [], []
    n = 0
    for i, batch in zip(range(int(config.eval.batches)), eval_iter):
        loss, metrics, z_q, z_e = one(state, {k: batch[k] for k in _TRAIN_KEYS}, jax.random.fold_in(rng, i))
        for k, v in (metrics | {"loss": loss}).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        if "actions" in batch:
            keep = np.asarray(batch["has_actions"]).astype(bool)
            B = keep.shape[0]
            tokens.append(np.asarray(z_q, np.float64).reshape(B, -1)[keep])
            latents.append(np.asarray(z_e, np.float64).reshape(B, -1)[keep])
            actions.append(np.asarray(batch["actions"], np.float64).reshape(B, -1)[keep])
    out = {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}
    half = len(tokens) // 2
    if half and sum(len(a) for a in actions[:half]) > 1 and sum(len(a) for a in actions[half:]) > 1:
        ridge = float(config.eval.probe_ridge)
        y_tr, y_te = np.concatenate(actions[:half]), np.concatenate(actions[half:])
        for name, feats in (("probe_r2", tokens), ("probe_r2_continuous", latents)):
            out[name] = ridge_probe_r2(np.concatenate(feats[:half]), y_tr, np.concatenate(feats[half:]), y_te,
                                       ridge)
    return out


def validate(config) -> None:
    m = config.model
    if m.image_size % m.patch_size:
        raise ValueError(f"config.model.image_size={m.image_size} is not a multiple of model.patch_size={m.patch_size}")
    if m.model_dim % m.num_heads:
        raise ValueError(f"config.model.model_dim={m.model_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.visual_encoder == "patch" and m.target == "features":
        raise ValueError("config.model.target='features' with model.visual_encoder='patch': a from-scratch "
                         "encoder predicting its own features collapses; use target='pixels'")
    if m.num_latents < 2:
        raise ValueError(f"config.model.num_latents={m.num_latents} must be >= 2")
    if config.train.batch_size < 2:
        raise ValueError(f"config.train.batch_size={config.train.batch_size}: action_info_gap needs >= 2 samples")
    if config.data.resolution != m.image_size:
        raise ValueError(f"config.data.resolution={config.data.resolution} != config.model.image_size={m.image_size}")
    towers = {"dinov2": "dino_encoder/"} if m.visual_encoder == "dinov2" else {}
    towers |= {"t5": "text_encoder/"} if m.text_encoder == "t5" else {}
    weights.require_sources(config, towers)


def check_data(config) -> None:
    import data_pipelines
    data_pipelines.check_sources(config.data, "gidm_pair")


STAGE = Stage(build_model=build_model, loss_fn=loss_fn, make_data=make_data, evaluate=evaluate,
              validate=validate, batch_spec=batch_spec, check_data=check_data)
