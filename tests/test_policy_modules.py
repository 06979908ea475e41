"""DeFI stage-3 networks: float32 parity with the reference-structured PyTorch modules on random weights
(loaded through the reference-name interop), the reference's quirks, strict loading, round trips."""

import dataclasses

import defi_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.gidm import model_config
from defi_jax.interop import defi_policy
from defi_jax.policy import ActionHead, PolicyLatentActions, VideoFormer
from defi_jax.policy.action_head import exponential_sigmas, sample_sigmas
from defi_jax.torch_ref import policy as tp

RTOL = 1e-4
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fast(fn, module, *args):
    """``fn(module, *args)`` as one XLA program compiled with fast options (eager dispatch would compile
    every op of every tiny config separately)."""
    graphdef, state = nnx.split(module)

    def pure(state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    args = tuple(jnp.asarray(a) for a in args)
    return jax.jit(pure).lower(state, *args).compile(FAST)(state, *args)


def _abstract(build):
    """A module to be filled by the interop: shapes only, nothing random allocated."""
    return nnx.eval_shape(build)


def _build(build):
    """A concretely initialised module, its init compiled as one fast program (not op by op)."""
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(build())[1]).lower().compile(FAST)())


@dataclasses.dataclass(frozen=True)
class Small:
    """One tiny stage-3 configuration (torch and ours are built from it)."""
    dim: int
    depth: int
    frames: int
    queries: int
    heads: int
    dim_head: int
    temporal_heads: int
    cond: int
    tokens: int          # GFDM tokens per frame
    head_dim: int        # action head width
    enc: int
    dec: int
    head_heads: int
    horizon: int
    action_dim: int
    goal_dim: int = 10
    latent_dim: int = 12  # latent-action token width (768 in the reference)

    def video_former(self, seed=0):
        return VideoFormer(dim=self.dim, depth=self.depth, condition_dim=self.cond, num_frames=self.frames,
                           queries_per_frame=self.queries, heads=self.heads, dim_head=self.dim_head,
                           temporal_heads=self.temporal_heads, rngs=nnx.Rngs(seed))

    def torch_video_former(self):
        return tp.VideoFormer3D(dim=self.dim, depth=self.depth, condition_dim=self.cond, dim_head=self.dim_head,
                                heads=self.heads, num_latents=self.frames * self.queries, num_frame=self.frames,
                                num_time_embeds=self.frames, temporal_heads=self.temporal_heads).eval()

    def head_kw(self, **kw):
        return dict(dim=self.head_dim, enc_layers=self.enc, dec_layers=self.dec, heads=self.head_heads,
                    action_dim=self.action_dim, goal_dim=self.goal_dim, video_dim=self.dim,
                    latent_action_dim=self.latent_dim, horizon=self.horizon, **kw)

    def head(self, seed=0, **kw):
        return ActionHead(rngs=nnx.Rngs(seed), **self.head_kw(**kw))

    def torch_head(self):
        return tp.GCDenoiser(sigma_data=0.5, obs_dim=self.dim, goal_dim=self.goal_dim, action_dim=self.action_dim,
                             embed_dim=self.head_dim, n_dec_layers=self.dec, n_enc_layers=self.enc,
                             n_heads=self.head_heads, n_obs_token=self.frames * self.queries,
                             action_seq_len=self.horizon, latent_action_dim=self.latent_dim).eval()


# Different widths, depths, frame / query counts and head splits; the temporal heads differ from the
# perceiver's, and the horizon is shorter / longer than the Video Former token count in turn.
CONFIGS = [
    Small(dim=16, depth=1, frames=2, queries=3, heads=2, dim_head=8, temporal_heads=2, cond=20, tokens=5,
          head_dim=16, enc=1, dec=2, head_heads=2, horizon=4, action_dim=3),
    Small(dim=24, depth=2, frames=4, queries=2, heads=3, dim_head=4, temporal_heads=4, cond=12, tokens=3,
          head_dim=32, enc=2, dec=1, head_heads=4, horizon=10, action_dim=7),
    Small(dim=12, depth=3, frames=3, queries=1, heads=1, dim_head=6, temporal_heads=3, cond=8, tokens=4,
          head_dim=8, enc=2, dec=2, head_heads=1, horizon=6, action_dim=2),
]
IDS = [f"d{c.dim}x{c.depth}_f{c.frames}q{c.queries}_h{c.head_dim}" for c in CONFIGS]


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Re-draws every parameter at a scale where each term matters (torch's and the reference's inits
    leave the action head's residual branches at ~2% of the skip paths), returns the state dict."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("codebook.weight"):
                p.copy_(noise * 0.5)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif name.endswith("weight"):   # LayerNorm gains
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _t(x):
    return torch.from_numpy(np.array(x))


def _close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err < rtol, f"relative error {err:.2e}"


def _head_inputs(c: Small, B=3, seed=1):
    rs = np.random.default_rng(seed)
    goal = rs.normal(size=(B, 1, c.goal_dim)).astype(np.float32)
    video = rs.normal(size=(B, c.frames * c.queries, c.dim)).astype(np.float32)
    latent = rs.normal(size=(B, 4, c.latent_dim)).astype(np.float32)
    actions = rs.uniform(-1, 1, size=(B, c.horizon, c.action_dim)).astype(np.float32)
    noise = rs.normal(size=actions.shape).astype(np.float32)
    return goal, video, latent, actions, noise


def _loaded_head(c: Small, seed: int, **kw):
    th = c.torch_head()
    sd = _randomize(th, seed)
    return defi_policy.load_action_head(_abstract(lambda: c.head(seed=seed + 100, **kw)), sd), th


# ---------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
def test_video_former_parity(c):
    tvf = c.torch_video_former()
    vf = defi_policy.load_video_former(_abstract(lambda: c.video_former(seed=7)), _randomize(tvf, 0))
    feats = np.random.default_rng(0).normal(size=(2, c.frames, c.tokens, c.cond)).astype(np.float32)
    out = _fast(lambda m, x: m(x), vf, feats)
    assert out.shape == (2, c.frames * c.queries, c.dim)
    with torch.no_grad():
        _close(out, tvf(_t(feats)).numpy())


@pytest.mark.parametrize("c", CONFIGS, ids=IDS)
def test_action_head_denoiser_sampler_and_loss_parity(c):
    head, th = _loaded_head(c, seed=3)
    goal, video, latent, actions, noise = _head_inputs(c)
    sigma = np.array([1e-3, 0.7, 80.0], np.float32)

    def run(m, goal, video, latent, actions, sigma, noise):
        context = m.encode(goal, video, latent)   # once, reused by every call below
        return (context, m.inner_model.decode(context, actions, sigma), m.denoise(context, actions, sigma),
                m.loss_given(context, actions, sigma, noise),
                *(m.sample(context, noise, num_steps=10, sigma_min=s) for s in (1e-3, 1.0)))

    context, inner, denoised, loss, *samples = _fast(run, head, goal, video, latent, actions, sigma, noise)
    assert context.shape == (3, 1 + c.frames * c.queries + 4, c.head_dim)
    with torch.no_grad():
        # The inner model F alone (what the EDM skip term would otherwise hide at small sigma) ...
        _close(inner, th.inner_model(_t(video), _t(latent), _t(actions), _t(goal), _t(sigma)).numpy())
        # ... the preconditioned denoiser D(x, sigma) ...
        _close(denoised, th(_t(video), _t(latent), _t(actions), _t(goal), _t(sigma)).numpy())
        # ... the training loss for given sigma and noise ...
        _close(loss, th.loss(_t(video), _t(latent), _t(actions), _t(goal), _t(noise), _t(sigma)).numpy())
        # ... and the whole sampler from the same initial noise, both schedules the reference uses
        # (its loop re-runs the encoder at every step; ours encodes once).
        for ours, sigma_min in zip(samples, (1e-3, 1.0)):
            ref = tp.sample_ddim(th, _t(video), _t(latent), _t(noise) * 80.0, _t(goal),
                                 tp.get_sigmas_exponential(10, sigma_min, 80.0))
            _close(ours, ref.numpy())


@pytest.mark.parametrize("c", CONFIGS[1:2], ids=IDS[1:2])
def test_latent_actions_parity(c):
    lam = model_config("tiny")
    lam.update(dict(feature_dim=c.latent_dim, text_dim=10, model_dim=8 * c.heads, latent_dim=6, num_latents=5,
                    enc_blocks=c.depth, num_heads=c.heads, reference_mask_order=True))
    frames = (0, c.frames - 1)
    tla = tp.PolicyLatentActions(condition_dim=c.cond, width=c.latent_dim, frames=frames, model_dim=lam.model_dim,
                                 latent_dim=6, num_latents=5, enc_blocks=c.depth, num_heads=c.heads, text_dim=10)
    sd = _randomize(tla.eval(), 5)
    # built concretely: the VQ's usage counters are state of their own (not parameters)
    la = defi_policy.load_latent_actions(_build(lambda: PolicyLatentActions(lam, condition_dim=c.cond, frames=frames,
                                                                            rngs=nnx.Rngs(9))), sd)
    rs = np.random.default_rng(2)
    feats = rs.normal(size=(3, c.frames, c.tokens, c.cond)).astype(np.float32)
    text = rs.normal(size=(3, 5, 10)).astype(np.float32)
    mask = np.ones((3, 5), np.int64)
    mask[0, 3:] = 0      # mixed-length instructions: the reference's mask row-order quirk matters
    mask[2, 1:] = 0
    out = _fast(lambda m, f, t, k: m(f, t, k), la, feats, text, mask)
    with torch.no_grad():
        ref = tla(_t(feats), _t(text), _t(mask))
    assert out["tokens"].shape == (3, 4, lam.model_dim)
    np.testing.assert_array_equal(np.asarray(out["indices"]), ref["indices"].numpy())
    _close(out["z_e"], ref["emb"].numpy())
    _close(out["tokens"], ref["tokens"].numpy())
    _close(out["codebook_loss"], ref["codebook_loss"].numpy())
    _close(out["commitment_loss"], ref["commitment_loss"].numpy())


def test_full_size_parameter_counts_match_the_reference():
    """Default sizes are the released ones: same parameter count as the reference modules (no weights
    allocated on our side), 17.7M for the Video Former and 22.9M for the head with its unused tensors."""
    vf = nnx.eval_shape(lambda: VideoFormer(rngs=nnx.Rngs(0)))
    head = nnx.eval_shape(lambda: ActionHead(rngs=nnx.Rngs(0)))

    def count(m):
        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))

    torch_vf = sum(p.numel() for p in tp.VideoFormer3D().parameters())
    th = tp.GCDenoiser()
    unused = sum(p.numel() for n, p in th.named_parameters()
                 if n.startswith(("inner_model.pos_emb", "inner_model.proprio_emb", "inner_model.goal_emb")))
    torch_head = sum(p.numel() for p in th.parameters())
    assert count(vf) == torch_vf and round(torch_vf / 1e6, 1) == 17.7
    assert count(head) == torch_head - unused and round(torch_head / 1e6, 1) == 22.9


# ---------------------------------------------------------------------------------------------------
# The reference's behaviour, options
# ---------------------------------------------------------------------------------------------------

def test_cross_attention_causal_quirk_and_full_option():
    c = CONFIGS[0]   # horizon 4 < 1 + 6 + 4 context tokens
    goal, video, latent, actions, _ = _head_inputs(c)
    sigma = np.array([0.5, 2.0, 10.0], np.float32)

    def run(m, goal, video, latent, actions, sigma):
        ctx = m.encode(goal, video, latent)
        late = ctx.at[:, c.horizon:].add(1.0)   # context tokens no action may see under the causal quirk
        ctx_la = m.encode(goal, video, latent + 1.0)   # other latent-action tokens
        return tuple(m.inner_model.decode(x, actions, sigma) for x in (ctx, late, ctx_la)) + (
            m.denoise(ctx, actions, sigma),)

    for mode in ("causal", "full"):
        head, th = _loaded_head(c, seed=4, cross_attention=mode)
        base, moved, other_la, denoised = (np.asarray(a) for a in
                                           _fast(run, head, goal, video, latent, actions, sigma))
        if mode == "causal":
            np.testing.assert_array_equal(base, moved)
            # Through the encoder's self-attention the latent-action tokens do reach the actions.
            assert np.abs(other_la - base).max() > 1e-3
        else:
            assert np.abs(moved - base).max() > 1e-3
            tfull = c.torch_head()   # the torch counterpart: is_causal off in the cross-attention
            for blk in tfull.inner_model.decoder.blocks:
                blk.cross_att.causal = False
            tfull.load_state_dict(th.state_dict())
            with torch.no_grad():
                _close(denoised, tfull(_t(video), _t(latent), _t(actions), _t(goal), _t(sigma)).numpy())
    with pytest.raises(ValueError, match="cross_attention"):
        c.head(cross_attention="sliding")


def test_dropout_only_with_an_rng_and_reproducible():
    c = CONFIGS[1]
    goal, video, latent, actions, noise = _head_inputs(c)
    sigma = np.array([0.5, 2.0, 10.0], np.float32)

    def run(m, goal, video, latent, actions, sigma, noise, key, other):
        ctx = m.encode(goal, video, latent)

        def train(k):
            return m.loss_given(m.encode(goal, video, latent, dropout_rng=k), actions, sigma, noise, dropout_rng=k)

        return jnp.stack([train(key), train(key), train(other), m.loss_given(ctx, actions, sigma, noise)])

    keys = (jax.random.PRNGKey(3), jax.random.PRNGKey(4))
    on = np.asarray(_fast(run, _loaded_head(c, 6, attn_pdrop=0.3, resid_pdrop=0.1, mlp_pdrop=0.05)[0], goal,
                          video, latent, actions, sigma, noise, *keys))
    assert on[0] == on[1]                       # same rng, same dropout masks
    assert len({on[0], on[2], on[3]}) == 3      # another rng, or none (eval), differs
    off = np.asarray(_fast(run, _loaded_head(c, 6, attn_pdrop=0.0, resid_pdrop=0.0, mlp_pdrop=0.0)[0], goal,
                           video, latent, actions, sigma, noise, *keys))
    assert len(set(off.tolist())) == 1          # rates of 0: an rng changes nothing


def test_training_loss_reaches_every_parameter_and_sigma_distribution():
    c = CONFIGS[0]
    goal, video, latent, actions, _ = _head_inputs(c)

    def grads(m, goal, video, latent, actions):
        return nnx.grad(lambda m: m.loss(m.encode(goal, video, latent), actions, jax.random.PRNGKey(0)))(m)

    for path, g in nnx.to_flat_state(_fast(grads, _loaded_head(c, 8)[0], goal, video, latent, actions)):
        norm = float(jnp.abs(g.get_value()).max())
        assert np.isfinite(norm) and norm > 0, f"no gradient reaches {path}"

    s = np.asarray(sample_sigmas(jax.random.PRNGKey(1), (20000,)))
    assert s.min() >= 1e-3 and s.max() <= 80.0
    # log-logistic(loc ln 0.5, scale 0.5): median 0.5, P(sigma < 0.5 e^0.5) = sigmoid(1)
    assert abs(np.median(s) - 0.5) < 0.02
    assert abs(np.mean(s < 0.5 * np.exp(0.5)) - 1 / (1 + np.exp(-1.0))) < 0.01
    # the head's own draw: the reference's by default, train_sigma_loc / _scale otherwise (same bounds)
    rng = jax.random.PRNGKey(1)
    np.testing.assert_array_equal(np.asarray(_loaded_head(c, 8)[0].train_sigmas(rng, (20000,))), s)
    wide = np.asarray(c.head(train_sigma_loc=0.0, train_sigma_scale=1.5).train_sigmas(rng, (20000,)))
    cdf = 1 / (1 + np.exp(-np.log([1e-3, 80.0]) / 1.5))      # truncation at 1e-3 and 80 moves the median below 1
    u = cdf.mean()
    assert wide.min() >= 1e-3 and wide.max() <= 80.0 and abs(np.median(wide) - np.exp(1.5 * np.log(u / (1 - u)))) < 0.03
    assert np.mean(wide > 5.0) > 0.15 > 0.02 > np.mean(s > 5.0)
    ref = tp.get_sigmas_exponential(10, 1e-3, 80.0).numpy()
    np.testing.assert_allclose(np.asarray(exponential_sigmas(10, 1e-3, 80.0)), ref, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Interop: round trips and strict loading
# ---------------------------------------------------------------------------------------------------

def _params(m):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _lam_config():
    lam = model_config("tiny")
    lam.update(dict(feature_dim=12, text_dim=10, model_dim=16, latent_dim=6, num_latents=5, enc_blocks=1,
                    num_heads=2))
    return lam


@pytest.fixture(scope="module")
def ours():
    """Randomly initialised networks of ``CONFIGS[1]`` (ours, not loaded from torch), built once."""
    c = CONFIGS[1]
    return c, {"vf": _build(lambda: c.video_former(seed=1)), "head": _build(lambda: c.head(seed=2)),
               "la": _build(lambda: PolicyLatentActions(_lam_config(), condition_dim=c.cond, rngs=nnx.Rngs(3)))}


def _zeroed(module):
    """A concrete copy of ``module`` with every parameter zero (so a load must write every one)."""
    copy = nnx.clone(module)
    for _, var in nnx.to_flat_state(nnx.state(copy, nnx.Param)):
        var.set_value(jnp.zeros_like(var.get_value()))
    return copy


def test_round_trip_bitwise_and_reference_strict_load(ours):
    c, m = ours
    sd = defi_policy.policy_state_dict(m["vf"], m["head"], m["la"], num_video_tokens=c.frames * c.queries)
    back = defi_policy.load_policy_state_dict(_abstract(c.video_former), _abstract(c.head), _zeroed(m["la"]), sd)
    for a, b in zip((m["vf"], m["head"], m["la"]), back):
        pa, pb = _params(a), _params(b)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k
    # The export is what the reference modules load with strict=True, and it reads back bitwise.
    tvf, th = c.torch_video_former(), c.torch_head()
    tla = tp.PolicyLatentActions(condition_dim=c.cond, width=12, model_dim=16, latent_dim=6, num_latents=5,
                                 enc_blocks=1, num_heads=2, text_dim=10)
    parts = [(tvf, "Video_Former."), (th, "model."), (tla, "")]
    for module, prefix in parts:
        module.load_state_dict({k[len(prefix):]: _t(v) for k, v in sd.items() if k.startswith(prefix) and
                                (prefix or not k.startswith(("Video_Former.", "model.")))})
    for module, prefix in parts:
        for k, v in module.state_dict().items():
            assert np.array_equal(v.numpy(), sd[prefix + k]), prefix + k


def test_strict_loading_lists_every_problem_in_one_error(ours):
    c, m = ours
    sd = defi_policy.policy_state_dict(m["vf"], m["head"], m["la"], num_video_tokens=c.frames * c.queries)
    sd["TVP_encoder.unet.conv_in.weight"] = np.zeros((1,), np.float32)   # frozen towers are not ours: skipped
    bad = dict(sd)
    del bad["Video_Former.layers.0.1.qkv.bias"]                                     # missing
    bad["model.inner_model.decoder.blocks.0.ln3.extra"] = np.zeros((2,), np.float32)  # unexpected
    bad["lam.to_codebook.weight"] = np.zeros((3, 3), np.float32)                       # mis-shaped
    bad["policy_head.weight"] = np.zeros((1,), np.float32)                             # outside every part
    fresh = (_abstract(c.video_former), _abstract(c.head), _zeroed(m["la"]))
    with pytest.raises(ValueError) as err:
        defi_policy.load_policy_state_dict(*fresh, bad)
    msg = str(err.value)
    for needle in ("layers.0.1.qkv.bias", "inner_model.decoder.blocks.0.ln3.extra", "lam.to_codebook.weight",
                   "policy_head.weight", "missing", "unexpected", "mis-shaped"):
        assert needle in msg, (needle, msg)
    defi_policy.load_policy_state_dict(*fresh, sd)   # the intact dict loads
    # Per network, too: the unused reference tensors are ignored, nothing else is.
    head_sd = defi_policy.action_head_state_dict(m["head"], with_unused=True, num_video_tokens=c.frames * c.queries)
    defi_policy.load_action_head(_abstract(c.head), head_sd)
    with pytest.raises(ValueError, match="1 missing tensor"):
        defi_policy.load_action_head(_abstract(c.head), {k: v for k, v in head_sd.items()
                                                         if k != "inner_model.action_pred.bias"})
