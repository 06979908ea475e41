"""Frozen encoders' forward pass: JAX (jit, this package) vs transformers' PyTorch modules, same weights.

    python -m launch.benchmark encoders                       # CPU-sized batches, the real model widths
    python -m launch.benchmark encoders --config=small        # tiny widths (seconds)
    python -m launch.benchmark encoders --batch=64            # a GPU batch

Timed per encoder: CLIP ViT-B/32 text tower on 20 tokens (DeFI's GFDM conditioning), DINOv2 ViT-B/14-reg
on 224 px frames (the GIDM's visual encoder; position table interpolated from 518 px as in the released
model) and the T5-base encoder on 32 tokens (the GIDM's instruction encoder). Both sides start from the
same random weights (transformers' init, converted by our interop); ``max_rel_err`` compares the outputs.
``ratio`` = our median / PyTorch's median (below 1 = we are faster). Inference mode on both sides
(``torch.no_grad``, eval); float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from defi_jax.benchmarks import timeit

SIZES = {
    # name: (clip kwargs, dino kwargs, t5 kwargs)
    "base": ({}, {}, {}),
    "small": (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
              dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
              dict(d_model=128, d_kv=32, d_ff=512, num_layers=4, num_heads=4)),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def run(args: list[str]) -> list[dict]:
    import torch
    import transformers
    from flax import nnx

    import defi_jax  # noqa: F401
    from defi_jax.interop import hf_clip, hf_dinov2, hf_t5
    from defi_jax.models import clip_text, dinov2, t5

    p = argparse.ArgumentParser(prog="launch.benchmark encoders")
    p.add_argument("--config", default="base", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default="clip,dino,t5", help="comma-separated subset of clip,dino,t5")
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    a = p.parse_args(args)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    clip_kw, dino_kw, t5_kw = SIZES[a.config]
    dev = jax.devices()[0]
    device = f"{dev.platform}:{dev.device_kind}"
    torch_dev = "cuda" if torch.cuda.is_available() else "cpu"
    rs = np.random.RandomState(0)
    B = a.batch
    cases = []

    if "clip" in a.only:
        torch.manual_seed(0)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_kw)).eval()
        cfg = hf_clip.config_from_hf(ref.config.to_dict())
        ours = hf_clip.from_state_dict(nnx.eval_shape(lambda: clip_text.CLIPTextEncoder(cfg, rngs=nnx.Rngs(0))),
                                       {k: v.numpy() for k, v in ref.state_dict().items()})
        ids = rs.randint(0, cfg.vocab_size, (B, 20))
        mask = np.ones((B, 20), np.int64)
        cases.append(("clip_text forward (20 tokens)", f"{a.config} L={cfg.num_hidden_layers} D={cfg.hidden_size}",
                      ref, lambda m, ids=ids, mask=mask: m(torch.tensor(ids, device=torch_dev),
                                                        attention_mask=torch.tensor(mask, device=torch_dev)
                                                        ).last_hidden_state,
                      ours, (jnp.asarray(ids), jnp.asarray(mask))))
    if "dino" in a.only:
        torch.manual_seed(0)
        kw = dict(image_size=518, patch_size=14, num_register_tokens=4) | dino_kw
        ref = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw)).eval()
        cfg = hf_dinov2.config_from_hf(ref.config.to_dict())
        ours = hf_dinov2.from_state_dict(nnx.eval_shape(lambda: dinov2.Dinov2(cfg, rngs=nnx.Rngs(0))),
                                         {k: v.numpy() for k, v in ref.state_dict().items()})
        x = rs.randn(B, 224, 224, 3).astype(np.float32)
        x_t = torch.tensor(x).permute(0, 3, 1, 2).contiguous()
        cases.append(("dinov2 forward (224 px)", f"{a.config} L={cfg.num_hidden_layers} D={cfg.hidden_size}",
                      ref, lambda m: m(x_t.to(torch_dev)).last_hidden_state, ours, (jnp.asarray(x),)))
    if "t5" in a.only:
        torch.manual_seed(0)
        ref = transformers.T5EncoderModel(transformers.T5Config(**(dataclasses.asdict(t5.T5Config()) | t5_kw))).eval()
        cfg = hf_t5.config_from_hf(ref.config.to_dict())
        ours = hf_t5.from_state_dict(nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0))),
                                     {k: v.numpy() for k, v in ref.state_dict().items()})
        ids = rs.randint(0, cfg.vocab_size, (B, 32))
        mask = np.ones((B, 32), np.int64)
        mask[:, 20:] = 0
        cases.append(("t5 encoder forward (32 tokens)", f"{a.config} L={cfg.num_layers} D={cfg.d_model}",
                      ref, lambda m, ids=ids, mask=mask: m(input_ids=torch.tensor(ids, device=torch_dev),
                                                        attention_mask=torch.tensor(mask, device=torch_dev)
                                                        ).last_hidden_state,
                      ours, (jnp.asarray(ids), jnp.asarray(mask))))

    rows = []
    for what, config, ref, torch_fn, ours, inputs in cases:
        ref = ref.to(torch_dev)
        fwd = nnx.jit(lambda m, *xs: m(*xs))
        out = fwd(ours, *inputs)
        with torch.no_grad():
            want = torch_fn(ref).float().cpu().numpy()
            t_torch = timeit(lambda: (torch_fn(ref), torch.cuda.synchronize() if torch_dev == "cuda" else None),
                            a.steps, a.warmup)
        t_jax = timeit(lambda: jax.block_until_ready(fwd(ours, *inputs)), a.steps, a.warmup)
        med, med_t = statistics.median(t_jax), statistics.median(t_torch)
        rows.append(dict(case="encoders", what=what, config=f"{config} batch={B}", device=device,
                         median_s=med, torch_median_s=med_t, ratio=med / med_t, max_rel_err=_rel(out, want)))
    return rows
