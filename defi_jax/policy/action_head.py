"""The action head: an EDM-preconditioned diffusion transformer that denoises a chunk of actions.

The reference's ``GCDenoiser`` + ``DiffusionTransformer`` (Step3_DeFI/policy_models/edm_diffusion/
score_wrappers.py, module/diffusion_decoder.py, module/transformers/transformer_blocks.py). Shapes with
the released sizes (every one is a constructor argument):

    goal_BGC        [B, 1, 512]     OpenAI CLIP goal token      -> lang_emb 512 -> 768 -> GELU -> 384
    video_BVD       [B, 224, 384]   Video Former tokens         -> tok_emb 384 -> 384
    latent_BLE      [B, 4, 768]     GIDM latent-action tokens   -> tok_emb_token 768 -> 384
    context_BSD     [B, 229, 384]   encoder output: 4 blocks of full self-attention, no positions
    sigma_B         [B]             noise level                 -> sigma_emb: ln(sigma)/4 -> sinusoid(384)
                                                                   -> 768 -> Mish -> 384, [B, 1, 384]
    actions_BAC     [B, 10, 7]      (noisy) actions             -> action_emb 7 -> 384
    decoder         4 blocks: AdaLN(sigma) causal self-attention (gated), cross-attention to the
                    context (pre-norm, ungated), AdaLN gated MLP; final LN -> action_pred 384 -> 7

Blocks: 8 heads, q/k/v with bias, output projection and MLP (4x) without bias, LayerNorms weight-only
except the cross-attention's ``ln3``. AdaLN is ``shift + LN(x) * scale`` (no "1 +"), its Linear
initialised like every other (normal 0.02), not zero.

**Cross-attention quirk** (``cross_attention="causal"``, the default): the reference builds the decoder's
cross-attention causal, so with 10 queries and 229 keys action i sees context positions 0..i only (the
goal token and the first Video Former tokens); latent-action tokens reach the actions only through the
encoder's self-attention. ``"full"`` is the non-causal variant (not loadable from reference checkpoints
without changing behaviour).

EDM (Karras et al.) with sigma_data 0.5: ``D(x, s) = c_skip x + c_out F(c_in x, s)``; the inner model gets
the raw sigma. The encoder depends on neither sigma nor the noisy actions: ``encode`` runs once per
``act()`` and ``sample`` reuses its output at every step. Training draws sigma from a truncated
log-logistic (loc ln 0.5, scale 0.5, in [0.001, 80]: ``train_sigma_loc`` / ``train_sigma_scale``, the
reference's by default; about 1% of the draws lie above sigma 5, where the sampler starts); sampling is the
reference's "ddim" (DPM-Solver-1) on an exponential schedule of ``num_steps`` sigmas then 0, from
``x = noise * sigma_max``.

Dropout (attention weights / residual / MLP) is active only when a ``dropout_rng`` is passed.
Parameter paths equal the reference's ``model.inner_model.*`` keys up to ``nnx.Sequential``'s
``layers`` level and kernel / scale leaves (``defi_jax.interop.defi_policy``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from defi_jax import nn
from defi_jax.sharding import constrain

CROSS_ATTENTION = ("causal", "full")
_init = nnx.initializers.normal(0.02)   # the reference's _init_weights: every Linear normal(0.02), bias 0


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def _linear(din, dout, *, rngs, axes, use_bias=True):
    return nn.linear(din, dout, rngs=rngs, axes=axes, use_bias=use_bias, kernel_init=_init)


def _dropout(x, rate: float, rng: jax.Array | None):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class _Rngs:
    """Hands out a fresh key per dropout site from one ``dropout_rng`` (None: dropout off)."""

    def __init__(self, rng: jax.Array | None):
        self.rng = rng

    def __call__(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.rng, key = jax.random.split(self.rng)
        return key


class SinusoidalEmbedding(nnx.Module):
    """The reference's ``SinusoidalPosEmb``: [sin | cos] halves, frequencies 10000^(-i / (dim/2 - 1))."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, x_BK: jax.Array) -> jax.Array:
        half = self.dim // 2
        freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
        arg = x_BK[..., None] * freqs
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class Attention(nnx.Module):
    """Self- or cross-attention with the reference's names (query / key / value / c_proj)."""

    def __init__(self, dim: int, heads: int, *, attn_pdrop: float, resid_pdrop: float, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"action head width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.attn_pdrop, self.resid_pdrop = attn_pdrop, resid_pdrop
        self.query = _linear(dim, dim, rngs=rngs, axes=("embed", "heads"))
        self.key = _linear(dim, dim, rngs=rngs, axes=("embed", "heads"))
        self.value = _linear(dim, dim, rngs=rngs, axes=("embed", "heads"))
        self.c_proj = _linear(dim, dim, rngs=rngs, axes=("heads", "embed"), use_bias=False)

    def __call__(self, x_BLD, context_BSD=None, *, mask_LS=None, rngs: _Rngs) -> jax.Array:
        kv_BSD = x_BLD if context_BSD is None else context_BSD
        B, L, D = x_BLD.shape
        S, H = kv_BSD.shape[1], self.heads
        q_BLHd = self.query(x_BLD).reshape(B, L, H, D // H)
        k_BSHd = self.key(kv_BSD).reshape(B, S, H, D // H)
        v_BSHd = self.value(kv_BSD).reshape(B, S, H, D // H)
        drop = rngs()
        if drop is None or self.attn_pdrop == 0.0:
            out_BLHd = nn.attention(q_BLHd, k_BSHd, v_BSHd, mask=mask_LS)
        else:   # dropout on the attention weights, as torch's scaled_dot_product_attention(dropout_p)
            logits_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHd, k_BSHd) / math.sqrt(D // H)
            if mask_LS is not None:
                logits_BHLS = jnp.where(mask_LS, logits_BHLS, -jnp.inf)
            probs_BHLS = _dropout(jax.nn.softmax(logits_BHLS, axis=-1), self.attn_pdrop, drop)
            out_BLHd = jnp.einsum("bhls,bshd->blhd", probs_BHLS, v_BSHd)
        return _dropout(self.c_proj(out_BLHd.reshape(B, L, D)), self.resid_pdrop, rngs())


class Mlp(nnx.Module):
    def __init__(self, dim: int, *, mlp_pdrop: float, rngs: nnx.Rngs):
        self.c_fc = _linear(dim, 4 * dim, rngs=rngs, axes=("embed", "mlp"), use_bias=False)
        self.c_proj = _linear(4 * dim, dim, rngs=rngs, axes=("mlp", "embed"), use_bias=False)
        self.mlp_pdrop = mlp_pdrop

    def __call__(self, x, *, rngs: _Rngs):
        return _dropout(self.c_proj(_gelu(self.c_fc(x))), self.mlp_pdrop, rngs())


class EncoderBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dropout: dict, *, rngs: nnx.Rngs):
        self.ln_1 = nn.layer_norm(dim, rngs=rngs, use_bias=False)
        self.attn = Attention(dim, heads, attn_pdrop=dropout["attn"], resid_pdrop=dropout["resid"], rngs=rngs)
        self.ln_2 = nn.layer_norm(dim, rngs=rngs, use_bias=False)
        self.mlp = Mlp(dim, mlp_pdrop=dropout["mlp"], rngs=rngs)

    def __call__(self, x_BSD, *, rngs: _Rngs):
        x_BSD = x_BSD + self.attn(self.ln_1(x_BSD), rngs=rngs)
        return constrain(x_BSD + self.mlp(self.ln_2(x_BSD), rngs=rngs), ("batch", None, "embed"))


class AdaLN(nnx.Module):
    """``adaLN_zero.modulation`` = Sequential(SiLU, Linear(D, 6D)) -> 6 chunks of [B, 1, D]."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.modulation = nnx.Sequential(jax.nn.silu, _linear(dim, 6 * dim, rngs=rngs, axes=("embed", "mlp")))

    def __call__(self, c_B1D):
        return jnp.split(self.modulation(c_B1D), 6, axis=-1)


class DecoderBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dropout: dict, *, rngs: nnx.Rngs):
        kw = dict(attn_pdrop=dropout["attn"], resid_pdrop=dropout["resid"], rngs=rngs)
        self.ln_1 = nn.layer_norm(dim, rngs=rngs, use_bias=False)
        self.attn = Attention(dim, heads, **kw)
        self.cross_att = Attention(dim, heads, **kw)
        self.ln3 = nn.layer_norm(dim, rngs=rngs)   # a plain nn.LayerNorm in the reference: has a bias
        self.ln_2 = nn.layer_norm(dim, rngs=rngs, use_bias=False)
        self.mlp = Mlp(dim, mlp_pdrop=dropout["mlp"], rngs=rngs)
        self.adaLN_zero = AdaLN(dim, rngs=rngs)

    def __call__(self, x_BAD, c_B1D, context_BSD, *, cross_mask_AS, rngs: _Rngs):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_zero(c_B1D)
        A = x_BAD.shape[1]
        causal_AA = jnp.tril(jnp.ones((A, A), bool))
        x_BAD = x_BAD + gate_msa * self.attn(shift_msa + self.ln_1(x_BAD) * scale_msa, mask_LS=causal_AA,
                                             rngs=rngs)
        x_BAD = x_BAD + self.cross_att(self.ln3(x_BAD), context_BSD, mask_LS=cross_mask_AS, rngs=rngs)
        x_BAD = x_BAD + gate_mlp * self.mlp(shift_mlp + self.ln_2(x_BAD) * scale_mlp, rngs=rngs)
        return constrain(x_BAD, ("batch", None, "embed"))


class Transformer(nnx.Module):
    """``blocks`` then a weight-only LayerNorm ``ln`` (the reference's encoder and FiLM decoder)."""

    def __init__(self, block_cls, depth: int, dim: int, heads: int, dropout: dict, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([block_cls(dim, heads, dropout, rngs=rngs) for _ in range(depth)])
        self.ln = nn.layer_norm(dim, rngs=rngs, use_bias=False)


class DiffusionTransformer(nnx.Module):
    """The inner model F(x, sigma | context) (the reference's ``DiffusionTransformer``, used parts only)."""

    def __init__(self, *, dim: int = 384, enc_layers: int = 4, dec_layers: int = 4, heads: int = 8,
                 action_dim: int = 7, goal_dim: int = 512, video_dim: int = 384, latent_action_dim: int = 768,
                 attn_pdrop: float = 0.3, resid_pdrop: float = 0.1, mlp_pdrop: float = 0.05,
                 cross_attention: str = "causal", rngs: nnx.Rngs):
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"action head cross_attention={cross_attention!r} must be one of {CROSS_ATTENTION}")
        if dim % 2 or dim < 4:
            raise ValueError(f"action head width {dim} must be even and >= 4 (sinusoidal sigma embedding)")
        self.dim = dim
        self.cross_attention = cross_attention
        dropout = {"attn": attn_pdrop, "resid": resid_pdrop, "mlp": mlp_pdrop}
        self.tok_emb = _linear(video_dim, dim, rngs=rngs, axes=("mlp", "embed"))
        self.tok_emb_token = _linear(latent_action_dim, dim, rngs=rngs, axes=("mlp", "embed"))
        self.lang_emb = nnx.Sequential(_linear(goal_dim, 2 * dim, rngs=rngs, axes=(None, "mlp")), _gelu,
                                       _linear(2 * dim, dim, rngs=rngs, axes=("mlp", "embed")))
        self.sigma_emb = nnx.Sequential(SinusoidalEmbedding(dim),   # index 0: no parameters
                                        _linear(dim, 2 * dim, rngs=rngs, axes=("embed", "mlp")), _mish,
                                        _linear(2 * dim, dim, rngs=rngs, axes=("mlp", "embed")))
        self.action_emb = _linear(action_dim, dim, rngs=rngs, axes=(None, "embed"))
        self.action_pred = _linear(dim, action_dim, rngs=rngs, axes=("embed", None))
        self.encoder = Transformer(EncoderBlock, enc_layers, dim, heads, dropout, rngs=rngs)
        self.decoder = Transformer(DecoderBlock, dec_layers, dim, heads, dropout, rngs=rngs)

    def encode(self, goal_BGC, video_BVD, latent_BLE, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Context tokens [B, G + V + L, dim] = encoder([lang_emb(goal) ; tok_emb(video) ; tok_emb_token(latent)])."""
        x_BSD = jnp.concatenate([self.lang_emb(goal_BGC), self.tok_emb(video_BVD), self.tok_emb_token(latent_BLE)],
                                axis=1)
        x_BSD = constrain(x_BSD, ("batch", None, "embed"))
        rngs = _Rngs(dropout_rng)
        for block in self.encoder.blocks:
            x_BSD = block(x_BSD, rngs=rngs)
        return self.encoder.ln(x_BSD)

    def decode(self, context_BSD, x_BAC, sigma_B, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """F(x, sigma): [B, A, action_dim] from the context, the (scaled) noisy actions and sigma."""
        c_B1D = self.sigma_emb((jnp.log(sigma_B) / 4.0)[:, None].astype(x_BAC.dtype))
        x_BAD = self.action_emb(x_BAC)
        A, S = x_BAD.shape[1], context_BSD.shape[1]
        # "causal": torch's is_causal with 10 queries and 229 keys keeps key j for query i iff j <= i.
        cross_AS = jnp.arange(S)[None, :] <= jnp.arange(A)[:, None] if self.cross_attention == "causal" else None
        rngs = _Rngs(dropout_rng)
        for block in self.decoder.blocks:
            x_BAD = block(x_BAD, c_B1D, context_BSD, cross_mask_AS=cross_AS, rngs=rngs)
        return self.action_pred(self.decoder.ln(x_BAD))


def edm_scalings(sigma_B: jax.Array, sigma_data: float):
    """(c_skip, c_out, c_in), each [B]."""
    total = sigma_B ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma_B * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total)


def sample_sigmas(rng: jax.Array, shape, *, loc: float = math.log(0.5), scale: float = 0.5,
                  min_value: float = 1e-3, max_value: float = 80.0) -> jax.Array:
    """Truncated log-logistic training sigmas (the reference's ``rand_log_logistic``), float32."""
    min_cdf = jax.nn.sigmoid((math.log(min_value) - loc) / scale)
    max_cdf = jax.nn.sigmoid((math.log(max_value) - loc) / scale)
    u = jax.random.uniform(rng, shape, jnp.float32) * (max_cdf - min_cdf) + min_cdf
    return jnp.exp(jnp.log(u / (1.0 - u)) * scale + loc)


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> jax.Array:
    """``num_steps`` log-spaced sigmas from sigma_max down to sigma_min, then 0: [num_steps + 1]."""
    sigmas = jnp.exp(jnp.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=jnp.float32))
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


class ActionHead(nnx.Module):
    """EDM wrapper around ``inner_model`` (the reference's ``GCDenoiser``): denoiser, loss, sampler.

    Keyword arguments are ``DiffusionTransformer``'s plus ``sigma_data`` and the sigma range used by the
    training distribution and the sampler (``sigma_min`` / ``sigma_max``; the released evaluation samples
    with ``sigma_min=1.0``, pass it to ``sample``).
    """

    def __init__(self, *, sigma_data: float = 0.5, sigma_min: float = 1e-3, sigma_max: float = 80.0,
                 train_sigma_loc: float | None = None, train_sigma_scale: float = 0.5, horizon: int = 10,
                 rngs: nnx.Rngs, **inner):
        if not train_sigma_scale > 0:
            raise ValueError(f"action head: train_sigma_scale={train_sigma_scale} must be > 0")
        self.inner_model = DiffusionTransformer(rngs=rngs, **inner)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        # The training draw's log-logistic location (None: ln sigma_data, the reference's) and scale.
        self.train_sigma_loc = math.log(sigma_data) if train_sigma_loc is None else float(train_sigma_loc)
        self.train_sigma_scale = float(train_sigma_scale)
        self.horizon = horizon
        self.action_dim = inner.get("action_dim", 7)

    def encode(self, goal_BGC, video_BVD, latent_BLE, *, dropout_rng=None) -> jax.Array:
        """Context tokens, computed once per observation."""
        return self.inner_model.encode(goal_BGC, video_BVD, latent_BLE, dropout_rng=dropout_rng)

    def denoise(self, context_BSD, x_BAC, sigma_B, *, dropout_rng=None) -> jax.Array:
        """D(x, sigma) = c_skip x + c_out F(c_in x, sigma): the denoised actions [B, A, action_dim]."""
        c_skip, c_out, c_in = (c[:, None, None] for c in edm_scalings(sigma_B, self.sigma_data))
        return c_skip * x_BAC + c_out * self.inner_model.decode(context_BSD, x_BAC * c_in, sigma_B,
                                                                dropout_rng=dropout_rng)

    def loss_given(self, context_BSD, actions_BAC, sigma_B, noise_BAC, *, dropout_rng=None) -> jax.Array:
        """Mean squared error of F against the preconditioned target, for given sigma and noise."""
        c_skip, c_out, c_in = (c[:, None, None] for c in edm_scalings(sigma_B, self.sigma_data))
        noised_BAC = actions_BAC + noise_BAC * sigma_B[:, None, None]
        out_BAC = self.inner_model.decode(context_BSD, noised_BAC * c_in, sigma_B, dropout_rng=dropout_rng)
        target_BAC = (actions_BAC - c_skip * noised_BAC) / c_out
        return jnp.mean((out_BAC.astype(jnp.float32) - target_BAC.astype(jnp.float32)) ** 2)

    def train_sigmas(self, rng: jax.Array, shape) -> jax.Array:
        """The training draw: truncated log-logistic in [sigma_min, sigma_max] (``train_sigma_loc`` / ``_scale``)."""
        return sample_sigmas(rng, shape, loc=self.train_sigma_loc, scale=self.train_sigma_scale,
                             min_value=self.sigma_min, max_value=self.sigma_max)

    def loss(self, context_BSD, actions_BAC, rng: jax.Array, *, dropout_rng=None) -> jax.Array:
        """Training loss: sigma ~ :meth:`train_sigmas`, noise ~ N(0, 1), both drawn from ``rng``."""
        sigma_rng, noise_rng = jax.random.split(rng)
        sigma_B = self.train_sigmas(sigma_rng, actions_BAC.shape[:1])
        noise_BAC = jax.random.normal(noise_rng, actions_BAC.shape, actions_BAC.dtype)
        return self.loss_given(context_BSD, actions_BAC, sigma_B, noise_BAC, dropout_rng=dropout_rng)

    def sample(self, context_BSD, noise_BAC, *, num_steps: int = 10, sigma_min: float | None = None,
               sigma_max: float | None = None) -> jax.Array:
        """The reference's "ddim" sampler (DPM-Solver-1) from ``x = noise * sigma_max``: [B, A, action_dim].

        x <- (s'/s) x - expm1(-h) D(x, s), h = ln s - ln s'; the last step (s' = 0) returns D(x, s).
        """
        sigma_min = self.sigma_min if sigma_min is None else sigma_min
        sigma_max = self.sigma_max if sigma_max is None else sigma_max
        sigmas = exponential_sigmas(num_steps, sigma_min, sigma_max)
        B = noise_BAC.shape[0]

        def step(x_BAC, pair):
            s, s_next = pair
            denoised_BAC = self.denoise(context_BSD, x_BAC, jnp.full((B,), s, x_BAC.dtype))
            last = s_next == 0
            h = jnp.log(s) - jnp.log(jnp.where(last, 1.0, s_next))
            x_next = jnp.exp(-h) * x_BAC - jnp.expm1(-h) * denoised_BAC
            return jnp.where(last, denoised_BAC, x_next).astype(x_BAC.dtype), None

        x_BAC, _ = jax.lax.scan(step, noise_BAC * sigma_max, (sigmas[:-1], sigmas[1:]))
        return x_BAC

    def initial_noise(self, rng: jax.Array, batch: int, dtype=jnp.float32) -> jax.Array:
        """Standard normal [batch, horizon, action_dim]; ``sample`` scales it by sigma_max."""
        return jax.random.normal(rng, (batch, self.horizon, self.action_dim), dtype)

