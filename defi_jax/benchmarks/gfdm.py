"""GFDM: train step and one-step features, our JAX model vs diffusers' PyTorch model, same config, same weights.

    python -m launch.benchmark gfdm                         # configs/gfdm.py:tiny on this machine
    python -m launch.benchmark gfdm --config=svd --batch=1  # the full UNet (a GPU, or patience)
    python -m launch.benchmark gfdm --dtype=bfloat16        # mixed precision on both sides (GPU)

Both sides start from one random diffusers ``UNetSpatioTemporalConditionModel`` / ``AutoencoderKLTemporalDecoder``
(diffusers' init plus a small perturbation so no layer is zero), copied into ours with
``defi_jax.interop.diffusers_svd``, and run in the same process.

Timed:
  train step        the released recipe's step on precomputed latents: EDM v-prediction loss (log-normal sigma,
                    text dropped 5%), backward, AdamW (lr 5e-6, wd 0) on every UNet parameter. JAX: one
                    jitted, donated step. PyTorch: eager ``UNetSpatioTemporalConditionModel`` + ``torch.optim.AdamW``
                    (the reference's training loop, without its fp16 autocast on CPU).
  one-step features what the policy consumes: VAE-encode the current frame, one UNet evaluation at the noisiest
                    of 20 Karras sigmas from pure noise, UNet cut after ``up_blocks[1]``, features concatenated
                    (``gfdm.one_step_features(..., predict_latents=False)`` vs DeFI's ``Diffusion_feature_extractor``
                    logic on the diffusers modules).
``ratio`` = our median time / PyTorch's (below 1: we are faster; the goal on CPU is <= 0.7 for the train step).
MFU = XLA's FLOP count of the compiled step / median time / the device's peak (omitted where the peak is
unknown, e.g. CPU). ``max_rel_err`` compares the two sides' features on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from defi_jax.benchmarks import timeit


def _torch_features(unet, vae, frame, text, noise, sched, num_up_blocks: int):
    """DeFI's ``Diffusion_feature_extractor`` (one step, cut after up_blocks[k-1]) on diffusers modules."""
    import torch

    b, t = noise.shape[:2]
    t0 = sched.timesteps[0]
    cond = vae.encode(frame).latent_dist.mode()
    latents = noise * sched.init_noise_sigma
    x = torch.cat([latents / ((sched.sigmas[0] ** 2 + 1) ** 0.5), cond[:, None].expand(-1, t, -1, -1, -1)], dim=2)
    ids = torch.tensor([[4.0, 127.0, 0.0]], device=x.device, dtype=x.dtype).expand(b, -1)
    emb = unet.time_embedding(unet.time_proj(t0.expand(b).to(x.device)).to(x.dtype))
    emb = emb + unet.add_embedding(unet.add_time_proj(ids.flatten()).reshape(b, -1).to(emb.dtype))
    emb = emb.repeat_interleave(t, dim=0)
    ehs = text.repeat_interleave(t, dim=0)
    h = unet.conv_in(x.flatten(0, 1))
    indicator = torch.zeros(b, t, dtype=h.dtype, device=h.device)
    skips = (h,)
    for block in unet.down_blocks:
        kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
        h, res = block(hidden_states=h, temb=emb, image_only_indicator=indicator, **kw)
        skips += res
    h = unet.mid_block(hidden_states=h, temb=emb, encoder_hidden_states=ehs, image_only_indicator=indicator)
    feats = []
    for i, block in enumerate(unet.up_blocks[:num_up_blocks]):
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, image_only_indicator=indicator, **kw)
        feats.append(h)
    last = feats[-1]
    parts = [torch.nn.functional.interpolate(f, scale_factor=last.shape[-1] // f.shape[-1]) for f in feats[:-1]]
    out = torch.cat(parts + [last], dim=1)
    return out.reshape(b, t, *out.shape[1:])


def run(args: list[str]) -> list[dict]:
    import optax
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from flax import nnx

    import defi_jax  # noqa: F401
    from configs.gfdm import get_config
    from defi_jax import metrics as metrics_lib
    from defi_jax.gfdm.model import GFDM, GFDMOptions
    from defi_jax.interop import diffusers_svd

    p = argparse.ArgumentParser(prog="launch.benchmark gfdm")
    p.add_argument("--config", default="tiny", choices=("tiny", "svd"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=0, help="predicted frames (0 = the config's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true", help="rematerialise the UNet in the JAX step")
    a = p.parse_args(args)

    config = get_config(a.config)
    m = config.model
    t_frames = a.frames or m.num_frames
    res = config.data.resolution
    unet_cfg, vae_cfg = dict(m.unet.to_dict()), dict(m.vae.to_dict())
    vae_down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    h = res // vae_down
    torch_dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_flush_denormal(True)  # as XLA's CPU backend does; denormals otherwise slow PyTorch's CPU kernels
    bf16 = a.dtype == "bfloat16"

    # ---- one set of weights for both sides
    torch.manual_seed(0)
    t_unet = UNetSpatioTemporalConditionModel(**unet_cfg)
    t_vae = AutoencoderKLTemporalDecoder(**vae_cfg)
    with torch.no_grad():
        for prm in t_unet.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    with tempfile.TemporaryDirectory() as d:
        t_unet.save_pretrained(f"{d}/unet")
        t_vae.save_pretrained(f"{d}/vae")
        j_unet = diffusers_svd.load_unet(f"{d}/unet")
        j_vae = diffusers_svd.load_vae(f"{d}/vae")
    t_unet, t_vae = t_unet.to(torch_dev).eval(), t_vae.to(torch_dev).eval()
    opts = GFDMOptions.from_config(m)
    gfdm = nnx.eval_shape(lambda: GFDM(opts, rngs=nnx.Rngs(0), dtype=jnp.bfloat16 if bf16 else None))
    nnx.update(gfdm.unet, nnx.state(j_unet, nnx.Param))
    nnx.update(gfdm.vae, nnx.state(j_vae, nnx.Param))
    nnx.update(gfdm.text_encoder, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(gfdm.text_encoder)))
    del j_unet, j_vae

    rs = np.random.default_rng(0)
    b, L, D = a.batch, m.text_tokens, 2 * dict(m.text_encoder)["hidden_size"]
    latents = rs.standard_normal((b, t_frames, h, h, 4)).astype(np.float32)
    text = rs.standard_normal((b, L, D)).astype(np.float32)
    frame = rs.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
    noise = rs.standard_normal((b, t_frames, h, h, 4)).astype(np.float32)

    tt = torch.from_numpy(text).to(torch_dev)

    # ---- one-step features
    # Before any training step: both sides hold the same weights here.
    feat_graph, feat_state = nnx.split(gfdm)
    feats_fn = jax.jit(lambda st, f, tx_, n: nnx.merge(feat_graph, st).one_step_features(
        f, tx_, None, noise_BThwc=n, predict_latents=False)[0])
    jf = feats_fn(feat_state, frame, text, noise)
    sched = EulerDiscreteScheduler(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                                   num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0,
                                   sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
                                   timestep_type="continuous", use_karras_sigmas=True)
    sched.set_timesteps(m.feature_steps, device=torch_dev)
    tf_ = torch.from_numpy(frame).permute(0, 3, 1, 2).contiguous().to(torch_dev)
    tn = torch.from_numpy(noise).permute(0, 1, 4, 2, 3).contiguous().to(torch_dev)

    def torch_feats():
        with torch.no_grad(), torch.autocast(torch_dev, dtype=torch.bfloat16, enabled=bf16):
            out = _torch_features(t_unet, t_vae, tf_, tt, tn, sched, m.feature_up_blocks)
        if torch_dev == "cuda":
            torch.cuda.synchronize()
        return out

    ref = torch_feats().float().permute(0, 1, 3, 4, 2).cpu().numpy()
    feat_err = float(np.abs(np.asarray(jf, np.float32) - ref).max() / np.abs(ref).max())
    jax_feat = timeit(lambda: jax.block_until_ready(feats_fn(feat_state, frame, text, noise)), a.steps, a.warmup)
    torch_feat = timeit(torch_feats, a.steps, a.warmup)

    # ---- JAX train step (UNet params trained, the rest frozen)
    is_unet = nnx.All(nnx.Param, nnx.PathContains("unet"))
    graphdef, params, rest = nnx.split(gfdm, is_unet, ...)
    tx = optax.adamw(5e-6, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_of(params, rest, batch, rng):
        model = nnx.merge(graphdef, params, rest)
        step_fn = lambda mdl: mdl.loss(batch["latents"], batch["cond"], batch["text"],  # noqa: E731
                                       jnp.zeros((b,)), rng)[0]
        return (jax.checkpoint(step_fn) if a.remat else step_fn)(model)

    def train_step(params, opt_state, rest, batch, rng):
        loss, grads = jax.value_and_grad(loss_of)(params, rest, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = {"latents": jnp.asarray(latents), "cond": jnp.asarray(latents[:, 0] / 0.18215), "text": jnp.asarray(text)}
    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, opt_state, rest, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    flops = metrics_lib.compiled_flops(compiled)
    state = {"params": params, "opt": opt_state, "i": 0}

    def jax_step():
        state["i"] += 1
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], rest, batch,
                                                       jax.random.key(state["i"]))
        jax.block_until_ready(loss)

    # ---- PyTorch train step (the reference's finetune_unet on latents, text given)
    opt = torch.optim.AdamW(t_unet.parameters(), lr=5e-6, weight_decay=0.0)
    tl = torch.from_numpy(latents).permute(0, 1, 4, 2, 3).contiguous().to(torch_dev)
    cond = (tl[:, 0] / 0.18215)[:, None].expand(-1, t_frames, -1, -1, -1)
    ids = torch.tensor([[7.0, 127.0, 0.0]], device=torch_dev).expand(b, -1)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch_dev, dtype=torch.bfloat16, enabled=bf16):
            sigma = (torch.randn(b, 1, 1, 1, 1, device=torch_dev) * 1.6 + 0.7).exp()
            keep = (torch.rand(b, device=torch_dev) > 0.05)[:, None, None]
            noisy = tl + torch.randn_like(tl) * sigma
            inp = torch.cat([noisy / (sigma**2 + 1) ** 0.5, cond], dim=2)
            v = t_unet(inp, (sigma.log() / 4).reshape(b), encoder_hidden_states=tt * keep, added_time_ids=ids).sample
            x0 = -sigma / (sigma**2 + 1) ** 0.5 * v + noisy / (sigma**2 + 1)
            loss = ((x0 - tl) ** 2 * (sigma**2 + 1) / sigma**2).mean()
        loss.backward()
        opt.step()
        if torch_dev == "cuda":
            torch.cuda.synchronize()

    t_unet.train()
    jax_train = timeit(jax_step, a.steps, a.warmup)
    torch_train = timeit(torch_step, a.steps, a.warmup)

    dev = jax.devices()[0]
    peak = metrics_lib.peak_flops(dev)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    cfg = (f"{a.config} ({n_params / 1e6:.1f}M UNet params, batch {b} x {t_frames} frames, {res}px -> "
           f"{h}x{h} latents, {a.dtype})")
    jdev, tdev = f"{dev.platform}:{dev.device_kind}", f"torch:{torch_dev}"
    jt, tt_med = statistics.median(jax_train), statistics.median(torch_train)
    jf_med, tf_med = statistics.median(jax_feat), statistics.median(torch_feat)
    common = {"case": "gfdm", "config": cfg, "steps": a.steps}
    return [
        common | {"what": "train step (EDM loss + backward + AdamW), JAX jit", "device": jdev, "median_s": jt,
                  "ratio": jt / tt_med, "compile_s": compile_s,
                  "tflops_per_step": None if flops is None else flops / 1e12,
                  "mfu": None if (flops is None or peak is None) else flops / jt / peak},
        common | {"what": "train step, diffusers PyTorch eager", "device": tdev, "median_s": tt_med, "ratio": 1.0},
        common | {"what": "one-step features (VAE + UNet to up_blocks[1]), JAX jit", "device": jdev,
                  "median_s": jf_med, "ratio": jf_med / tf_med, "max_rel_err": feat_err},
        common | {"what": "one-step features, diffusers PyTorch", "device": tdev, "median_s": tf_med, "ratio": 1.0},
    ]
