"""Vector quantizer of the GIDM bottleneck (the reference's ``VectorQuantizer``, code_restart=True).

Nearest-codebook-entry quantization with a straight-through estimator. The loss terms follow the
reference exactly: ``codebook_loss = mean((sg(z_e) - e)^2)`` moves the codebook, ``commitment_loss =
mean((z_e - sg(e))^2)`` (weighted by beta = 0.25 in the stage loss) moves the encoder.

Dead-code restart: the reference counts code usage during training and, at each epoch end, overwrites
every code used zero times with a randomly chosen code, then resets the counts. Here the counts live in
non-parameter state (``VQUsage``) and the restart runs every ``restart_every`` training steps, inside the
jitted step. Because the trainer owns the optimizer update of parameters, a restart does not write the
codebook parameter; it writes a non-parameter ``codebook_shift`` so that the effective codebook
``codebook + codebook_shift`` holds the new entries while gradients keep flowing to ``codebook``.
``effective_codebook()`` is what exports and probes read.

``restart_from``: ``"codebook"`` copies random codebook rows into the dead ones (the reference);
``"encoder"`` copies random encoder outputs of the current batch (revives codes much faster on small
data: a copied row is the exact duplicate of a live code and ties go to the lower index).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn


class VQUsage(nnx.Variable):
    """Non-trainable VQ bookkeeping (usage counts, step counter, restart shift): no grads, no optimizer."""


class VectorQuantizer(nnx.Module):
    def __init__(self, num_latents: int, latent_dim: int, *, rngs: nnx.Rngs, restart_every: int = 0,
                 restart_from: str = "codebook"):
        if restart_from not in ("codebook", "encoder"):
            raise ValueError(f"model.vq_restart_from={restart_from!r} must be 'codebook' or 'encoder'")
        self.num_latents = num_latents
        self.latent_dim = latent_dim
        self.restart_every = int(restart_every)
        self.restart_from = restart_from
        bound = 1.0 / num_latents   # the reference's uniform(-1/K, 1/K) init
        self.codebook = nn.param(rngs, lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
                                 (num_latents, latent_dim), ("codebook", None))
        self.codebook_shift = VQUsage(jnp.zeros((num_latents, latent_dim), jnp.float32))
        self.usage = VQUsage(jnp.zeros((num_latents,), jnp.float32))
        self.step = VQUsage(jnp.zeros((), jnp.int32))

    def effective_codebook(self) -> jax.Array:
        return self.codebook[...] + self.codebook_shift[...]

    def __call__(self, z_e_NC: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> dict:
        """Quantizes ``z_e_NC`` (any leading dims, last = latent_dim).

        Returns ``z_q`` (straight-through, same shape), ``indices``, ``codebook_loss``,
        ``commitment_loss``, ``perplexity`` and ``codes_used`` (fraction of the codebook hit by this batch).
        With ``train=True`` usage is counted and, every ``restart_every`` steps, dead codes are restarted
        (``rng`` picks the replacements).
        """
        codebook_KC = self.effective_codebook().astype(z_e_NC.dtype)
        flat_MC = z_e_NC.reshape(-1, self.latent_dim)
        # Squared euclidean distance; same argmin as the reference's torch.cdist.
        dist_MK = (jnp.sum(flat_MC ** 2, -1, keepdims=True) - 2.0 * flat_MC @ codebook_KC.T
                   + jnp.sum(codebook_KC ** 2, -1)[None, :])
        indices_M = jnp.argmin(dist_MK, axis=-1)
        e_MC = codebook_KC[indices_M]
        z_q_MC = flat_MC + jax.lax.stop_gradient(e_MC - flat_MC)

        codebook_loss = jnp.mean((jax.lax.stop_gradient(flat_MC) - e_MC) ** 2)
        commitment_loss = jnp.mean((flat_MC - jax.lax.stop_gradient(e_MC)) ** 2)
        counts_K = jnp.zeros((self.num_latents,), jnp.float32).at[indices_M].add(1.0)
        probs_K = counts_K / indices_M.shape[0]
        perplexity = jnp.exp(-jnp.sum(jnp.where(probs_K > 0, probs_K * jnp.log(jnp.maximum(probs_K, 1e-12)), 0.0)))
        codes_used = jnp.mean((counts_K > 0).astype(jnp.float32))

        if train:
            self._count_and_restart(counts_K, jax.lax.stop_gradient(flat_MC), rng)

        return {
            "z_q": z_q_MC.reshape(z_e_NC.shape),
            "indices": indices_M.reshape(z_e_NC.shape[:-1]),
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "perplexity": perplexity,
            "codes_used": codes_used,
        }

    def _count_and_restart(self, counts_K: jax.Array, z_e_MC: jax.Array, rng: jax.Array | None) -> None:
        usage_K = self.usage[...] + counts_K
        step = self.step[...] + 1
        self.step[...] = step
        if self.restart_every <= 0:
            self.usage[...] = usage_K
            return
        if rng is None:
            raise ValueError("VectorQuantizer: train=True with restart_every > 0 needs an rng")
        restart = (step % self.restart_every) == 0
        dead_K = usage_K < 1
        if self.restart_from == "codebook":
            # randperm(K)[:num_dead] assigned to the dead codes in index order, as the reference does.
            perm_K = jax.random.permutation(rng, self.num_latents)
            rank_K = jnp.cumsum(dead_K.astype(jnp.int32)) - 1
            source_KC = self.effective_codebook()[perm_K[jnp.clip(rank_K, 0)]]
        else:
            pick_K = jax.random.randint(rng, (self.num_latents,), 0, z_e_MC.shape[0])
            source_KC = z_e_MC[pick_K].astype(jnp.float32)
        replace_K = jnp.logical_and(restart, dead_K)
        codebook_KC = self.codebook[...]
        new_shift = jnp.where(replace_K[:, None], source_KC - jax.lax.stop_gradient(codebook_KC),
                              self.codebook_shift[...])
        self.codebook_shift[...] = jax.lax.stop_gradient(new_shift)
        self.usage[...] = jnp.where(restart, jnp.zeros_like(usage_K), usage_K)
