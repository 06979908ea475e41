"""DeFI policy latency: GFDM features, GIDM + Video Former context, action head, total; in-process and exported.

    python -m launch.benchmark policy                          # configs/policy.py:tiny on this machine
    python -m launch.benchmark policy --config=defi --dtype=bfloat16   # the full policy (GPU)

Rows (batch 1 by default, random weights of the config's sizes; p50 / p90 over ``--steps`` calls after
``--warmup``):
  gfdm_features     the frozen GFDM, static + wrist views, ``gfdm_steps`` = 1 and 5 (the paper's ablation)
  context           Video Former + GIDM latent actions + goal token + the head's encoder (once per act)
  head_sample       the action head's 10 DDIM steps on a precomputed context
  act_total         the whole compiled ``act`` as ``DeFIPolicy`` runs it (1 GFDM step, noise seeded per row:
                    ``inference.act_rows``), the same loaded from its ``jax.export`` artifact, and
                    ``act_total_one_key`` (one key for the batch; ``ratio`` = it / act_total)
  torch_adapter     the PyTorch re-statement of the reference's adapter (Video Former + head; the reference's
                    sampler runs the head's encoder at every step) on the same weights and features, beside
                    ``jax_adapter``, the same computation here (``ratio`` = torch / jax)
The reference's own figures (RTX 4090): GFDM 86.1 ms + GIDM 42.9 ms + adapter 24.3 ms ~ 153 ms, 7 GB.
Peak memory: the compiled programs' temporaries + arguments (XLA's memory analysis) and, on GPUs, the device's
peak bytes in use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


def _device_name(dev) -> str:
    return f"{dev.platform}:{dev.device_kind}"


def _pct(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times), q))


def _time(fn, steps: int, warmup: int) -> list[float]:
    from defi_jax.benchmarks import timeit
    return timeit(fn, steps, warmup)


def _compiled_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)


def run(args: list[str]) -> list[dict]:
    import defi_jax  # noqa: F401
    from flax import nnx

    from configs import policy as policy_configs
    from defi_jax.inference import act_rows
    from defi_jax.policy import stage as policy_stage

    p = argparse.ArgumentParser(prog="launch.benchmark policy")
    p.add_argument("--config", default="tiny", choices=("tiny", "defi"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch re-statement rows")
    p.add_argument("--no_export", action="store_true", help="skip the jax.export round trip")
    a = p.parse_args(args)

    c = policy_configs.get_config(a.config)
    c.train.compute_dtype = a.dtype
    c.policy.gidm_init = "random"
    c.policy.gfdm_init = "initial"
    c.init.allow_random = True
    c.train.compiler_options = None   # benchmark the optimized programs
    m = c.model
    dev = jax.devices()[0]
    cfg_name = f"policy:{a.config} b{a.batch} {a.dtype}"
    build = lambda: policy_stage.build_model(c, nnx.Rngs(0))   # noqa: E731
    gd = nnx.split(nnx.eval_shape(build))[0]                    # structure, abstractly
    st = jax.jit(lambda: nnx.split(build())[1])()               # random weights, created on the device
    B, V, r = a.batch, m.num_views, c.data.resolution
    rs = np.random.default_rng(0)
    frames = jnp.asarray(rs.integers(0, 256, (B, V, r, r, 3), dtype=np.uint8))
    toks = policy_stage.tokenizers(c)
    ids = []
    for tok in toks:
        i, k = tok("push the puck to the goal")
        ids += [jnp.asarray(np.repeat(np.asarray(i, np.int32)[None], B, 0)),
                jnp.asarray(np.repeat(np.asarray(k, np.int32)[None], B, 0))]
    key = jax.random.key(0)
    steps, sigma_min = int(m.sample_steps), float(m.sample_sigma_min)

    text = jax.jit(lambda s, i: nnx.merge(gd, s).encode_instruction(*i))(st, tuple(ids))
    rows = []

    def row(what, times, **extra):
        out = dict(case="policy", what=what, config=cfg_name, device=_device_name(dev),
                   p50_ms=1e3 * _pct(times, 50), p90_ms=1e3 * _pct(times, 90),
                   median_s=statistics.median(times), **extra)
        rows.append(out)
        return out

    # ---- GFDM features, 1 and 5 denoising steps
    feats = None
    for n in (1, 5):
        if n > m.gfdm.feature_steps:
            continue
        fn = jax.jit(lambda s, f, t, k, n=n: _features(nnx.merge(gd, s), f, t, k, n))
        compiled = fn.lower(st, frames, text["gfdm"], key).compile()
        out = compiled(st, frames, text["gfdm"], key)
        feats = out if n == 1 else feats
        t = _time(lambda: jax.block_until_ready(compiled(st, frames, text["gfdm"], key)), a.steps, a.warmup)
        row(f"gfdm_features_{n}step", t, peak_bytes=_compiled_bytes(compiled))

    # ---- context (Video Former + GIDM + goal + head encoder) and the head's sampler
    ctx_fn = jax.jit(lambda s, f, t: nnx.merge(gd, s).context(f, t)[0]).lower(st, feats, text).compile()
    context = ctx_fn(st, feats, text)
    row("context", _time(lambda: jax.block_until_ready(ctx_fn(st, feats, text)), a.steps, a.warmup),
        peak_bytes=_compiled_bytes(ctx_fn))
    noise = jax.random.normal(key, (B, m.horizon, m.action_dim))
    head_fn = jax.jit(lambda s, ctx, x: nnx.merge(gd, s).head.sample(ctx, x, num_steps=steps, sigma_min=sigma_min))
    head_fn = head_fn.lower(st, context, noise).compile()
    row("head_sample", _time(lambda: jax.block_until_ready(head_fn(st, context, noise)), a.steps, a.warmup),
        peak_bytes=_compiled_bytes(head_fn))

    # ---- the whole act as deployed (noise seeded per row, inference.act_rows), in-process and exported; and one
    # key for the whole batch (DeFIPolicyModel.act as training's evaluation calls it): the cost of per-row seeds
    def act(s, f, t, seeds):
        return act_rows(nnx.merge(gd, s), f, t, seeds, num_steps=steps, sigma_min=sigma_min)

    seeds = jnp.arange(B, dtype=jnp.uint32)
    act_c = jax.jit(act).lower(st, frames, text, seeds).compile()
    total = row("act_total", _time(lambda: jax.block_until_ready(act_c(st, frames, text, seeds)), a.steps, a.warmup),
                peak_bytes=_compiled_bytes(act_c))
    if dev.platform == "gpu":
        total["device_peak_bytes"] = int((dev.memory_stats() or {}).get("peak_bytes_in_use", 0))
    one_key = jax.jit(lambda s, f, t, k: nnx.merge(gd, s).act(f, t, k, num_steps=steps, sigma_min=sigma_min))
    one_key = one_key.lower(st, frames, text, key).compile()
    t = _time(lambda: jax.block_until_ready(one_key(st, frames, text, key)), a.steps, a.warmup)
    row("act_total_one_key", t, peak_bytes=_compiled_bytes(one_key), ratio=statistics.median(t) / total["median_s"])
    if not a.no_export:
        from jax import export as jax_export
        leaves, treedef = jax.tree.flatten(st)
        exp = jax_export.export(jax.jit(lambda flat, f, t, s: act(jax.tree.unflatten(treedef, list(flat)), f, t, s)),
                                platforms=[dev.platform if dev.platform != "gpu" else "cuda"])(
            [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves], frames, text, seeds)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "act.jax")
            with open(path, "wb") as f:
                f.write(exp.serialize())
            with open(path, "rb") as f:
                loaded = jax_export.deserialize(bytearray(f.read()))
        t = _time(lambda: jax.block_until_ready(loaded.call(leaves, frames, text, seeds)), a.steps, a.warmup)
        row("act_total_exported", t, ratio=statistics.median(t) / total["median_s"])

    # ---- the PyTorch re-statement of the reference's adapter on the same weights
    if not a.no_torch:
        rows += _torch_adapter(gd, st, c, feats, text, noise, a, cfg_name, _device_name(dev))
    return rows


def _features(model, frames, gfdm_text, key, n):
    model.gfdm_steps = n
    return model.features(frames, gfdm_text, key)


def _torch_adapter(gd, st, c, feats, text, noise, a, cfg_name, device) -> list[dict]:
    """Video Former + head sampling: JAX (context once) vs the reference-structured PyTorch (encoder every step)."""
    import torch
    from flax import nnx

    from defi_jax.interop import defi_policy
    from defi_jax.torch_ref import policy as tp

    m = c.model
    model = nnx.merge(gd, st)
    vf, head = dict(m.video_former), dict(m.head)
    frames = m.gfdm.num_frames
    tvf = tp.VideoFormer3D(dim=vf["dim"], depth=vf["depth"], condition_dim=model.feature_dim,
                           dim_head=vf["dim_head"], heads=vf["heads"], num_latents=frames * vf["queries_per_frame"],
                           num_frame=frames, num_time_embeds=frames, temporal_heads=vf["temporal_heads"]).eval()
    tvf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                         defi_policy.video_former_state_dict(model.video_former).items()})
    n_video = frames * vf["queries_per_frame"]
    th = tp.GCDenoiser(sigma_data=head["sigma_data"], obs_dim=vf["dim"],
                       goal_dim=int(dict(m.goal_text).get("projection_dim", 512)), action_dim=m.action_dim,
                       embed_dim=head["dim"], n_dec_layers=head["dec_layers"], n_enc_layers=head["enc_layers"],
                       n_heads=head["heads"], n_obs_token=n_video, action_seq_len=m.horizon,
                       latent_action_dim=m.gidm.model_dim,
                       cross_causal=head["cross_attention"] == "causal").eval()
    th.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in defi_policy.action_head_state_dict(
        model.head, with_unused=True, num_video_tokens=n_video).items()})
    B, V, T, N, C = feats.shape
    vf_in = np.asarray(feats).transpose(0, 2, 1, 3, 4).reshape(B, T, V * N, C)
    la_tokens = np.zeros((B, 4, m.gidm.model_dim), np.float32) + 0.1
    goal = np.asarray(text["goal"])
    steps, sigma_min, sigma_max = int(m.sample_steps), float(m.sample_sigma_min), float(head["sigma_max"])

    def torch_run():
        with torch.no_grad():
            video = tvf(torch.from_numpy(vf_in))
            sigmas = tp.get_sigmas_exponential(steps, sigma_min, sigma_max)
            x = torch.from_numpy(np.array(noise)) * sigma_max
            return tp.sample_ddim(th, video, torch.from_numpy(la_tokens), x, torch.from_numpy(goal), sigmas)

    def jax_adapter(s, f, g, la, x):
        mm = nnx.merge(gd, s)
        video = mm.video_former(f)
        ctx = mm.head.encode(g, video, la)
        return mm.head.sample(ctx, x, num_steps=steps, sigma_min=sigma_min)

    args = (st, jnp.asarray(vf_in), jnp.asarray(goal), jnp.asarray(la_tokens), noise)
    jfn = jax.jit(jax_adapter).lower(*args).compile()
    ours = np.asarray(jfn(*args))
    ref = torch_run().numpy()
    t_jax = _time(lambda: jax.block_until_ready(jfn(*args)), a.steps, a.warmup)
    t_torch = _time(torch_run, a.steps, a.warmup)
    err = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))
    base = dict(case="policy", config=cfg_name, device=device)
    return [dict(base, what="jax_adapter", p50_ms=1e3 * _pct(t_jax, 50), p90_ms=1e3 * _pct(t_jax, 90),
                 median_s=statistics.median(t_jax)),
            dict(base, what="torch_adapter", p50_ms=1e3 * _pct(t_torch, 50), p90_ms=1e3 * _pct(t_torch, 90),
                 median_s=statistics.median(t_torch), ratio=statistics.median(t_torch) / statistics.median(t_jax),
                 rel_diff=err, torch_threads=torch.get_num_threads())]
