"""Layer constructors shared by every model: each parameter gets its logical axis names here.

Models build their layers through these helpers so that sharding metadata is uniform and interop
(name/transpose tables) sees the same parameter layout everywhere: ``nnx.Linear`` kernels are
``[in, out]``, ``nnx.Conv`` kernels ``[*window, in, out]`` (channels-last).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]

_default_kernel = nnx.initializers.lecun_normal()


def _rng_stream_call(self) -> jax.Array:
    # flax 0.12's RngStream.__call__ with the count replaced whole (set_value) instead of ``count[...] += 1``.
    self.count._check_can_update()
    count = self.count.get_value()
    key = jax.random.fold_in(self.key.get_value(), count)
    self.count.set_value(count + 1)
    return key


@contextlib.contextmanager
def fast_traced_rngs():
    """Build models under a trace (``jit`` / ``eval_shape``) without flax 0.12's quadratic RNG bookkeeping.

    Each ``rngs.params()`` writes the stream's count with ``count[...] += 1``; under a trace that write compares
    the tracer's ``sharding``, whose AttributeError message walks the whole trace so far: measured 7.0 s of a
    8.6 s traced build of the tiny policy (157 calls). The same update written whole skips the comparison;
    keys and counts are unchanged (bitwise). Restored on exit.
    """
    stream = nnx.rnglib.RngStream
    original = stream.__call__
    stream.__call__ = _rng_stream_call
    try:
        yield
    finally:
        stream.__call__ = original


def linear(din: int, dout: int, *, rngs: nnx.Rngs, axes: Axes = ("embed", "mlp"), use_bias: bool = True,
           dtype=None, param_dtype=jnp.float32, kernel_init=_default_kernel) -> nnx.Linear:
    """Dense layer; ``axes`` names the kernel's (in, out) dims, the bias takes the out name."""
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(kernel_init, tuple(axes)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[-1],)))


def conv(cin: int, cout: int, kernel_size: int | Sequence[int], *, rngs: nnx.Rngs, strides=1, padding="SAME",
         use_bias: bool = True, dtype=None, param_dtype=jnp.float32, kernel_init=_default_kernel) -> nnx.Conv:
    """Channels-last convolution; kernel axes (*window, conv_in, conv_out)."""
    ks = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
    names = (None,) * len(ks) + ("conv_in", "conv_out")
    return nnx.Conv(
        cin, cout, ks, strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


def group_norm(num_features: int, num_groups: int = 32, *, rngs: nnx.Rngs, epsilon: float = 1e-5,
               dtype=None, param_dtype=jnp.float32) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        num_features, num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def layer_norm(num_features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        num_features, epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype=jnp.float32) -> nnx.Param:
    """A free-standing parameter (embeddings, queries, codebooks) with logical axis names."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


def attention(q_BLNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, *, mask=None, is_causal: bool = False,
              implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention through ``jax.nn.dot_product_attention``.

    ``implementation``: None lets XLA choose (the reference path in tests), ``"cudnn"`` uses cuDNN flash
    attention on GPU. ``mask`` is boolean, broadcastable to [B, N, L, S], True = attend.
    """
    return jax.nn.dot_product_attention(q_BLNH, k_BSNH, v_BSNH, mask=mask, is_causal=is_causal,
                                        implementation=implementation)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2, the transformer feed-forward block (transformers' ViT / CLIP names)."""

    def __init__(self, din: int, dhidden: int, activation, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(din, dhidden, axes=("embed", "mlp"), **kw)
        self.fc2 = linear(dhidden, din, axes=("mlp", "embed"), **kw)
        self.act = activation

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))
