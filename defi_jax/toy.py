"""A small real stage for testing the trainer end to end: next-frame prediction of a moving blob.

Each example is two consecutive 2D frames of a Gaussian blob moving with a constant velocity (stacked on
channels) and the frame after them as the target; the model has to infer the velocity to predict where
the blob goes. The data is synthetic and deterministic (example ``i`` is a pure function of
``(config.data.seed, i)``) and is fed through grain, so the iterator state is real and checkpointable.

Model: conv encoder (stride 2) -> MLP over the flattened feature map -> conv decoder, every parameter
built through ``defi_jax.nn`` with logical axis names.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax import nn, sharding
from defi_jax.stage import Stage


class ToyNextFrame(nnx.Module):
    """[B, H, W, 2C] two past frames -> [B, H, W, C] next frame."""

    def __init__(self, *, frame_size: int, channels: int, width: int, hidden: int, rngs: nnx.Rngs, dtype=None):
        self.frame_size, self.width = frame_size, width
        half = frame_size // 2
        self.encoder = Encoder(2 * channels, width, rngs=rngs, dtype=dtype)
        self.mlp = MLP(half * half * width, hidden, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(width, channels, rngs=rngs, dtype=dtype)

    def __call__(self, frames_BHWC: jax.Array) -> jax.Array:
        h_BhwD = self.encoder(frames_BHWC)
        b, hh, ww, d = h_BhwD.shape
        h_BF = h_BhwD.reshape(b, hh * ww * d)  # flatten the feature map for the global MLP
        h_BF = sharding.constrain(h_BF, ("batch", "embed"))
        h_BhwD = h_BhwD + self.mlp(h_BF).reshape(b, hh, ww, d)
        return self.decoder(h_BhwD)


class Encoder(nnx.Module):
    def __init__(self, cin: int, width: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv_in = nn.conv(cin, width, 3, rngs=rngs, dtype=dtype)
        self.norm = nn.group_norm(width, num_groups=min(4, width), rngs=rngs, dtype=dtype)
        self.conv_down = nn.conv(width, width, 3, strides=2, rngs=rngs, dtype=dtype)

    def __call__(self, x_BHWC):
        x = nnx.gelu(self.norm(self.conv_in(x_BHWC)))
        return nnx.gelu(self.conv_down(x))


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.up = nn.linear(dim, hidden, rngs=rngs, axes=("embed", "mlp"), dtype=dtype)
        self.down = nn.linear(hidden, dim, rngs=rngs, axes=("mlp", "embed"), dtype=dtype)

    def __call__(self, x_BF):
        return self.down(nnx.gelu(self.up(x_BF)))


class Decoder(nnx.Module):
    def __init__(self, width: int, cout: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv_up = nn.conv(width, width, 3, rngs=rngs, dtype=dtype)
        self.conv_out = nn.conv(width, cout, 3, rngs=rngs, dtype=dtype)

    def __call__(self, h_BhwD):
        b, h, w, d = h_BhwD.shape
        x = jnp.repeat(jnp.repeat(h_BhwD, 2, axis=1), 2, axis=2)  # nearest upsample x2 -> [B, H, W, D]
        x = nnx.gelu(self.conv_up(x))
        return self.conv_out(x)


def build_model(config, rngs: nnx.Rngs) -> ToyNextFrame:
    """Layers compute in ``config.train.compute_dtype`` (the trainer keeps fp32 master weights)."""
    m = config.model
    dtype = None if config.train.compute_dtype == "float32" else jnp.dtype(config.train.compute_dtype)
    return ToyNextFrame(frame_size=m.frame_size, channels=m.channels, width=m.width, hidden=m.hidden, rngs=rngs,
                        dtype=dtype)


def loss_fn(model: ToyNextFrame, batch, rng, config):
    del rng, config
    pred_BHWC = model(batch["frames"])
    err = (pred_BHWC.astype(jnp.float32) - batch["target"]) ** 2
    loss = err.mean()
    return loss, {"mse": loss, "max_err": jnp.sqrt(err.max())}


def make_example(index: int, *, seed: int, frame_size: int, channels: int) -> dict[str, np.ndarray]:
    """Example ``index``: frames t-1, t of a blob (channels stacked) and frame t+1 as the target."""
    rs = np.random.default_rng([seed, int(index)])
    pos = rs.uniform(1.0, frame_size - 2.0, size=2)
    vel = rs.uniform(-1.0, 1.0, size=2)
    color = rs.uniform(0.3, 1.0, size=channels)
    yy, xx = np.mgrid[0:frame_size, 0:frame_size].astype(np.float32)

    def frame(p):
        blob = np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / 2.0)
        return (blob[..., None] * color).astype(np.float32)

    frames = np.concatenate([frame(pos - vel), frame(pos)], axis=-1)
    return {"frames": frames, "target": frame(pos + vel)}


def make_data(config, process_index: int, process_count: int, split: str):
    """Host-local batches of ``config.train.batch_size / process_count`` examples through grain."""
    d, m = config.data, config.model
    local_batch = config.train.batch_size // process_count
    seed = d.seed if split == "train" else d.seed + 1_000_003
    ds = grain.MapDataset.range(d.num_examples).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]  # each process reads a disjoint slice of the global stream
    ds = ds.map(lambda i: make_example(i, seed=seed, frame_size=m.frame_size, channels=m.channels))
    ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset()
    if d.get("worker_count", 0) > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return iter(ds)


@nnx.jit
def _eval_mse(model, batch):
    return loss_fn(model, batch, None, None)[0]


def evaluate(model, config, workdir, step, eval_iter) -> dict:
    """Mean squared error over ``config.eval.batches`` held-out batches."""
    del workdir, step
    losses = [float(_eval_mse(model, batch)) for _, batch in zip(range(config.eval.batches), eval_iter)]
    return {"eval_mse": float(np.mean(losses))}


def validate(config) -> None:
    m = config.model
    if m.frame_size % 2 or m.frame_size < 4:
        raise ValueError(f"config.model.frame_size={m.frame_size} must be even and >= 4")
    if config.data.num_examples < config.train.batch_size:
        raise ValueError(f"config.data.num_examples={config.data.num_examples} is smaller than one batch "
                         f"(config.train.batch_size={config.train.batch_size})")


STAGE = Stage(build_model=build_model, loss_fn=loss_fn, make_data=make_data, evaluate=evaluate,
              validate=validate)
