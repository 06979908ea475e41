"""GIDM train step: JAX (jit, this package) vs the reference-structured PyTorch module, same weights.

    python -m launch.benchmark gidm                          # CPU-sized "small" config
    python -m launch.benchmark gidm --config=defi --batch=64 # the released widths (GPU)

What is timed: one optimizer step of the latent action model (everything the reference trains: action
queries, spatio-temporal encoder, VQ, decoder, language projection) on precomputed frozen-encoder outputs
(DINO patch tokens [B, 2, P, 768], T5 states [B, L, 768]): forward, the reference loss, backward, global
norm clip 0.1, AdamW (lr 1e-4, wd 1e-2). The frozen DINOv2 / T5 forwards are left out on both sides
(the same fixed cost for both, and cached / precomputable). Both start from the same weights; the first
step's losses are compared (``loss_abs_diff``) to show the two compute the same thing.
MFU = XLA's FLOP count of the compiled step / median time / the device's peak (where known, not CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from defi_jax.benchmarks import timeit

CONFIGS = {
    # name: (model_dim, enc_blocks, dec_blocks, heads, patches, text_len, latent, codes)
    "tiny": (64, 2, 2, 4, 64, 16, 16, 16),
    "small": (256, 4, 4, 8, 196, 16, 128, 16),
    "defi": (768, 12, 12, 12, 256, 32, 128, 16),
}


def _device_name(dev) -> str:
    return f"{dev.platform}:{dev.device_kind}"


def run(args: list[str]) -> list[dict]:
    import torch

    import defi_jax  # noqa: F401
    from configs.gidm import model_config
    from defi_jax import metrics as metrics_lib
    from defi_jax.gidm.model import LatentActionModel
    from defi_jax.interop import defi_torch
    from defi_jax.torch_ref.gidm import LatentActionModel as TorchLAM

    p = argparse.ArgumentParser(prog="launch.benchmark gidm")
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    a = p.parse_args(args)
    d, enc, dec, heads, P, L, latent, codes = CONFIGS[a.config]
    feat = text_dim = 768 if a.config == "defi" else d

    c = model_config("tiny")
    c.update(dict(target="features", feature_dim=feat, text_dim=text_dim, model_dim=d, latent_dim=latent,
                  num_latents=codes, enc_blocks=enc, dec_blocks=dec, num_heads=heads, vq_restart_every=0,
                  reference_mask_order=True))
    torch_dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    torch.manual_seed(0)
    tm = TorchLAM(dino_dim=feat, model_dim=d, latent_dim=latent, num_latents=codes, enc_blocks=enc,
                  dec_blocks=dec, num_heads=heads, text_dim=text_dim)
    model = LatentActionModel(c, rngs=nnx.Rngs(0))
    defi_torch.load_gidm_state_dict(model, {k: v.detach().numpy() for k, v in tm.state_dict().items()},
                                    skip_encoders=True)
    tm = tm.to(torch_dev).train()

    rs = np.random.default_rng(0)
    feats = rs.normal(size=(a.batch, 2, P, feat)).astype(np.float32)
    text = rs.normal(size=(a.batch, L, text_dim)).astype(np.float32)
    mask = np.ones((a.batch, L), np.int64)

    # ---- JAX: params trained, the model's non-param state (VQ counters) carried.
    tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-4, weight_decay=1e-2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    def loss_fn(params, rest, feats, text, mask):
        m = nnx.merge(graphdef, params, rest)
        out = m.forward_features(feats, text, mask)
        loss = jnp.mean((out["recon"] - feats[:, 1]) ** 2) + out["codebook_loss"] + 0.25 * out["commitment_loss"]
        return loss

    @jax.jit
    def step(params, opt_state, rest, feats, text, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, feats, text, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jf, jt, jm = jnp.asarray(feats), jnp.asarray(text), jnp.asarray(mask)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, rest, jf, jt, jm).compile()
    compile_s = time.perf_counter() - t0
    flops = metrics_lib.compiled_flops(compiled)
    state = {"params": params, "opt": opt_state}
    first = {}

    def jax_step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], rest, jf, jt, jm)
        loss.block_until_ready()
        first.setdefault("jax", float(loss))

    # ---- torch: the same step.
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=1e-2)
    tf, tt, tmask = (torch.from_numpy(x).to(torch_dev) for x in (feats, text, mask))

    def torch_step():
        opt.zero_grad(set_to_none=True)
        out = tm.forward_features(tf, tt, tmask)
        loss = tm.loss(out, tf[:, 1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 0.1)
        opt.step()
        if torch_dev == "cuda":
            torch.cuda.synchronize()
        first.setdefault("torch", float(loss.detach()))

    jax_times = timeit(jax_step, a.steps, a.warmup)
    torch_times = timeit(torch_step, a.steps, a.warmup)
    jax_med, torch_med = statistics.median(jax_times), statistics.median(torch_times)
    dev = jax.devices()[0]
    peak = metrics_lib.peak_flops(dev)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    cfg = f"{a.config} (d={d}, {enc}+{dec} blocks, P={P}, L={L}, batch={a.batch}, {n_params / 1e6:.1f}M params)"
    common = {"case": "gidm", "config": cfg, "steps": a.steps}
    return [
        common | {"what": "train step, JAX jit", "device": _device_name(dev), "median_s": jax_med,
                  "ratio": torch_med / jax_med, "compile_s": compile_s,
                  "tflops_per_step": None if flops is None else flops / 1e12,
                  "mfu": None if (flops is None or peak is None) else flops / jax_med / peak,
                  "loss_abs_diff": abs(first["jax"] - first["torch"])},
        common | {"what": "train step, PyTorch eager (reference structure)", "device": f"torch:{torch_dev}",
                  "median_s": torch_med, "ratio": 1.0,
                  "mfu": None if (flops is None or peak is None) else flops / torch_med / peak},
    ]
