"""GIDM vector quantizer: straight-through gradients, loss terms, statistics, dead-code restart."""

import defi_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from defi_jax.gidm.vq import VectorQuantizer


def _vq(codebook, **kw):
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], rngs=nnx.Rngs(0), **kw)
    vq.codebook.set_value(jnp.asarray(codebook, jnp.float32))
    return vq


def test_nearest_code_and_straight_through_gradient():
    codebook = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    vq = _vq(codebook)
    x = jnp.array([[0.9, 0.2], [0.1, 0.8], [-0.1, 0.1]], jnp.float32)
    out = vq(x)
    np.testing.assert_array_equal(np.asarray(out["indices"]), [1, 2, 0])
    np.testing.assert_allclose(np.asarray(out["z_q"]), codebook[[1, 2, 0]], atol=1e-6)

    # d(sum(w * z_q))/dx = w: the quantizer is the identity for gradients.
    w = jnp.arange(6.0).reshape(3, 2)
    g = jax.grad(lambda x: jnp.sum(w * vq(x)["z_q"]))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w))


def test_loss_terms_route_gradients_like_the_reference():
    codebook = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    vq = _vq(codebook)
    x = jnp.array([[0.8, 0.6]], jnp.float32)

    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)

    def losses(params, x):
        out = nnx.merge(graphdef, params, rest)(x)
        return out["codebook_loss"], out["commitment_loss"]

    expected = float(np.mean((np.array([0.8, 0.6]) - 1.0) ** 2))
    q, c = losses(params, x)
    assert np.isclose(float(q), expected) and np.isclose(float(c), expected)
    # Codebook loss moves only the codebook, commitment loss only the encoder output.
    g_cb_q, g_x_q = jax.grad(lambda p, x: losses(p, x)[0], argnums=(0, 1))(params, x)
    g_cb_c, g_x_c = jax.grad(lambda p, x: losses(p, x)[1], argnums=(0, 1))(params, x)
    g_cb_q, g_cb_c = (np.asarray(g["codebook"][...]) for g in (g_cb_q, g_cb_c))
    assert np.abs(np.asarray(g_x_q)).max() == 0 and np.abs(g_cb_q).max() > 0
    assert np.abs(g_cb_c).max() == 0 and np.abs(np.asarray(g_x_c)).max() > 0


def test_perplexity_and_codes_used():
    codebook = np.eye(8, dtype=np.float32)
    vq = _vq(codebook)
    uniform = vq(jnp.asarray(codebook[[0, 1, 2, 3] * 4]))     # 4 codes, equally often
    np.testing.assert_allclose(float(uniform["perplexity"]), 4.0, rtol=1e-5)
    np.testing.assert_allclose(float(uniform["codes_used"]), 0.5)
    single = vq(jnp.asarray(codebook[[5] * 16]))
    np.testing.assert_allclose(float(single["perplexity"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(single["codes_used"]), 1 / 8)
    skew = vq(jnp.asarray(codebook[[0, 0, 0, 1]]))
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(float(skew["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


@pytest.mark.parametrize("source", ["encoder", "codebook"])
def test_dead_code_restart(source):
    # Codes 2 and 3 sit far away and are never nearest: they are dead.
    codebook = np.array([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]], np.float32)
    vq = _vq(codebook, restart_every=3, restart_from=source)
    x = jnp.array([[0.1, 0.0], [0.9, 1.0], [0.2, 0.1], [1.1, 0.9]], jnp.float32)
    rng = jax.random.PRNGKey(0)
    for i in range(2):
        vq(x, train=True, rng=jax.random.fold_in(rng, i))
        np.testing.assert_array_equal(np.asarray(vq.effective_codebook()), codebook)   # not yet
    np.testing.assert_array_equal(np.asarray(vq.usage[...]), [4, 4, 0, 0])
    vq(x, train=True, rng=jax.random.fold_in(rng, 2))                                  # restart step
    eff = np.asarray(vq.effective_codebook())
    np.testing.assert_array_equal(eff[:2], codebook[:2])                               # live codes kept
    pool = np.asarray(x) if source == "encoder" else codebook
    for row in eff[2:]:
        assert np.min(np.abs(pool - row).sum(-1)) < 1e-5, (row, pool)                 # copied from the pool
    if source == "encoder":
        assert np.abs(eff[2:]).max() < 2.0                                             # moved to the data
    np.testing.assert_array_equal(np.asarray(vq.usage[...]), 0)                        # counts reset
    np.testing.assert_array_equal(np.asarray(vq.codebook[...]), codebook)             # the Param is untouched

    # The restarted entry is used, and the codebook loss still reaches its parameter row.
    graphdef, params, rest = nnx.split(vq, nnx.Param, ...)
    query = jnp.asarray(eff[2:3]) + 0.01

    def codebook_loss(params):
        return nnx.merge(graphdef, params, rest)(query)["codebook_loss"]

    if source == "encoder":
        assert int(vq(query)["indices"][0]) == 2
        grad = np.asarray(jax.grad(codebook_loss)(params)["codebook"][...])
        assert np.abs(grad[2]).max() > 0 and np.abs(grad[[0, 1, 3]]).max() == 0


def test_no_counting_outside_training():
    vq = _vq(np.eye(4, dtype=np.float32), restart_every=1)
    vq(jnp.eye(4), train=False)
    assert float(vq.usage[...].sum()) == 0 and int(vq.step[...]) == 0
