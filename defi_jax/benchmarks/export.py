"""PyTorch export: the exported policy's act latency vs the JAX policy's, export / load wall time, peak host memory.

    python -m launch.benchmark export                            # a tiny policy workdir built here (CPU: ~minutes)
    python -m launch.benchmark export --workdir=/ckpt/policy     # a trained policy workdir
    python -m launch.benchmark export --gfdm_full                # the full-size GFDM (configs/gfdm.py:svd), random
    python -m launch.benchmark export --gfdm_full --channels_div=2   # the same layout, UNet / VAE channels halved

Policy rows (same backend, same process for the latencies; medians of ``--steps`` calls after ``--warmup``):
  jax_act           ``DeFIPolicy.act`` (compiled), one observation, 2 views
  torch_act         ``DeFIPolicyTorch.act`` on the exported folder, same images (``ratio`` = torch / jax)
  export            ``export_torch.export`` (restore, write, load back strictly), in a fresh process
  torch_load        ``DeFIPolicyTorch.from_pretrained`` of the folder (the robot's start-up), in a fresh process
``--gfdm_full`` rows (each in a fresh process; random weights drawn on the host, one tensor at a time):
  gfdm_export       the GFDM written as diffusers / transformers folders (``export_torch.export_model``), then
                    loaded back into PyTorch strictly
  gfdm_import       the folders read back into our JAX modules (``diffusers_svd.load_unet`` / ``load_vae``,
                    ``hf_clip.load_text_encoder``)
  gfdm_import_workdir  ``launch.import_torch export``: the folder into a GFDM workdir at step 0 (the weights, in
                    their shardings, written as a params-only ``checkpoints/0``: no optimizer moments), the model
                    rebuilt from the folder's recorded ``config.model`` on the variant's config
Peak host memory: the process's peak resident set (``ru_maxrss``) minus its resident set before the model was
made; ``peak_over_weights`` divides it by the float32 weights' bytes (a streamed export or import stays near 1:
the model itself, plus one tensor at a time; a whole second copy would read ~2-3; on a CPU the "device" arrays
are host memory too, so the workdir import's figure counts the placed weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from defi_jax.benchmarks import timeit

_STATS = {"normalized": True, "stats": {"q01": [-0.5, -0.4, -0.3, -0.2, -0.1, -0.05, 0.0],
                                        "q99": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0]}}
INSTRUCTION = "push the puck to the goal"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def _device() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def random_weights(abstract, seed: int):
    """``abstract`` (an ``nnx.eval_shape`` module) with every parameter drawn on the host, tensor by tensor (one copy
    of the weights, nothing compiled): matrices N(0, 1 / fan-in), norm gains 1 + 0.3 N(0, 1), biases 0.3 N(0, 1),
    so no constant-initialised parameter can hide a swapped or dropped tensor."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        dtype = np.dtype(x.dtype)
        if not np.issubdtype(dtype, np.floating):
            return np.zeros(x.shape, dtype)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        if len(x.shape) >= 2:
            noise /= np.float32(np.sqrt(np.prod(x.shape[:-1])))
            return noise.astype(dtype, copy=False)
        name = str(getattr(path[-1], "key", path[-1]))
        return ((1.0 if name == "scale" else 0.0) + 0.3 * noise).astype(dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


# ---------------------------------------------------------------------------------------------------
# Children (a fresh process each: its peak resident set is the measured step's)
# ---------------------------------------------------------------------------------------------------

def _child(fn: str, in_process: bool = False, **kw) -> dict:
    """Runs ``_<fn>(**kw)`` of this module in a fresh Python; returns the dict it prints last. ``in_process``
    (the smoke test): here, so the memory figures are not the step's alone."""
    if in_process:
        return globals()[f"_{fn}"](**kw)
    code = (f"import json, sys; from defi_jax.benchmarks import export as e; "
            f"print('\\nRESULT ' + json.dumps(e._{fn}(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], capture_output=True, text=True,
                          cwd=os.getcwd(), env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmark child {fn} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _export_workdir(workdir: str, out: str) -> dict:
    from defi_jax import export_torch
    base, start = _rss_bytes(), time.perf_counter()
    export_torch.export(workdir, out)
    return {"seconds": time.perf_counter() - start, "peak_bytes": _peak_bytes() - base}


def _load_torch(out: str) -> dict:
    from defi_jax_torch import DeFIPolicyTorch
    base, start = _rss_bytes(), time.perf_counter()
    DeFIPolicyTorch.from_pretrained(out, device="cpu")
    return {"seconds": time.perf_counter() - start, "peak_bytes": _peak_bytes() - base}


def _gfdm_config(variant: str, channels_div: int):
    from configs import gfdm as gfdm_configs

    c = gfdm_configs.get_config(variant)
    if channels_div > 1:
        for part in (c.model.unet, c.model.vae):
            part.block_out_channels = tuple(ch // channels_div for ch in part.block_out_channels)
    return c


def _gfdm_export(variant: str, channels_div: int, out: str) -> dict:
    import jax
    from flax import nnx

    from defi_jax import export_torch
    from defi_jax.gfdm import stage as gfdm_stage

    c = _gfdm_config(variant, channels_div)
    abstract = nnx.eval_shape(lambda: gfdm_stage.build_model(c, nnx.Rngs(0)))
    weights = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    base = _rss_bytes()
    timings = {}

    def load():
        start = time.perf_counter()
        model = random_weights(abstract, seed=0)
        timings["init"] = time.perf_counter() - start
        timings["made_peak"] = _peak_bytes() - base
        timings["start"] = time.perf_counter()
        return model

    export_torch.export_model(load, c, out, source={"workdir": f"random configs/gfdm.py:{variant}", "step": None,
                                                    "ema": False})
    return {"seconds": time.perf_counter() - timings["start"], "init_seconds": timings["init"],
            "peak_bytes": _peak_bytes() - base, "made_peak_bytes": timings["made_peak"], "weights_bytes": weights}


def _gfdm_import(out: str) -> dict:
    from defi_jax.interop import diffusers_svd, hf_clip
    base, start = _rss_bytes(), time.perf_counter()
    models = (diffusers_svd.load_unet(os.path.join(out, "gfdm", "unet")),
              diffusers_svd.load_vae(os.path.join(out, "gfdm", "vae")),
              hf_clip.load_text_encoder(os.path.join(out, "gfdm", "text_encoder")))
    seconds = time.perf_counter() - start
    del models
    return {"seconds": seconds, "peak_bytes": _peak_bytes() - base}


def _gfdm_import_workdir(variant: str, out: str, workdir: str) -> dict:
    from configs import gfdm as gfdm_configs
    from defi_jax import trainer
    from defi_jax.interop import import_stages

    import jax

    base, start = _rss_bytes(), time.perf_counter()
    config, _ = import_stages.import_export(out, workdir, gfdm_configs.get_config(variant))
    seconds, peak = time.perf_counter() - start, _peak_bytes() - base
    params = jax.tree.leaves(trainer.StateLayout(config).abstract_params())
    return {"seconds": seconds, "peak_bytes": peak,
            "written_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs),
            "params_bytes": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in params)}


# ---------------------------------------------------------------------------------------------------
# The case
# ---------------------------------------------------------------------------------------------------

def tiny_workdir(workdir: str, seed: int = 0) -> None:
    """A parameter-only checkpoint of ``configs/policy.py:tiny`` (``random_weights``) and its action
    statistics: what ``export`` and ``DeFIPolicy.from_checkpoint`` read."""
    from flax import nnx

    from configs import policy as policy_configs
    from defi_jax import checkpoint, paths
    from defi_jax import stage as stage_lib

    c = policy_configs.get_config("tiny")
    c.init.sources.gfdm.path = c.init.sources.gidm.path = ""
    c.policy.gfdm_init, c.policy.gidm_init = "initial", "random"
    model = random_weights(nnx.eval_shape(lambda: stage_lib.get("policy").build_model(c, nnx.Rngs(seed))), seed)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(0, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                  "extra": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))), "step": np.int32(0)}, None,
              c.to_json_best_effort())
    ckpt.close()
    paths.write_text(paths.join(workdir, "assets", "action_stats.json"), json.dumps(_STATS))


def _policy_rows(a, tmp: str) -> list[dict]:
    import torch

    from defi_jax.inference import DeFIPolicy
    from defi_jax_torch import DeFIPolicyTorch

    workdir = a.workdir
    if not workdir:
        workdir = os.path.join(tmp, "policy")
        tiny_workdir(workdir)
    out = os.path.join(tmp, "torch")
    exp = _child("export_workdir", a.in_process, workdir=workdir, out=out)
    load = _child("load_torch", a.in_process, out=out)
    weights = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
                  if f.endswith(".safetensors"))

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    jp = DeFIPolicy.from_checkpoint(workdir)
    tpol = DeFIPolicyTorch.from_pretrained(out, device="cpu")
    rs = np.random.default_rng(0)
    images = {v: rs.integers(0, 256, (jp.resolution, jp.resolution, 3), dtype=np.uint8) for v in jp.views}
    t_jax = timeit(lambda: jp.act(images, INSTRUCTION), a.steps, a.warmup)
    t_torch = timeit(lambda: tpol.act(images, INSTRUCTION), a.steps, a.warmup)
    cfg = f"policy {'tiny (random)' if not a.workdir else a.workdir}, 1 obs x {len(jp.views)} views, float32"
    base = dict(case="export", config=cfg, device=_device())
    mj, mt = statistics.median(t_jax), statistics.median(t_torch)
    return [dict(base, what="jax_act", median_s=mj, p90_ms=1e3 * float(np.percentile(t_jax, 90))),
            dict(base, what="torch_act", median_s=mt, p90_ms=1e3 * float(np.percentile(t_torch, 90)), ratio=mt / mj,
                 torch_threads=torch.get_num_threads()),
            dict(base, what="export", median_s=exp["seconds"], peak_host_bytes=exp["peak_bytes"],
                 weights_bytes=weights, peak_over_weights=exp["peak_bytes"] / weights),
            dict(base, what="torch_load", median_s=load["seconds"], peak_host_bytes=load["peak_bytes"],
                 weights_bytes=weights, peak_over_weights=load["peak_bytes"] / weights)]


def _gfdm_rows(a, tmp: str) -> list[dict]:
    out = os.path.join(tmp, "gfdm")
    exp = _child("gfdm_export", a.in_process, variant=a.gfdm_config, channels_div=a.channels_div, out=out)
    imp = _child("gfdm_import", a.in_process, out=out)
    w = exp["weights_bytes"]
    cfg = (f"gfdm:{a.gfdm_config}" + (f" channels/{a.channels_div}" if a.channels_div > 1 else "")
           + f", {w / 4e6:.0f}M params, float32")
    base = dict(case="export", config=cfg, device=_device(), weights_bytes=w)
    rows = [dict(base, what="gfdm_export", median_s=exp["seconds"], peak_host_bytes=exp["peak_bytes"],
                 peak_over_weights=exp["peak_bytes"] / w, made_peak_over_weights=exp["made_peak_bytes"] / w,
                 init_s=exp["init_seconds"]),
            dict(base, what="gfdm_import", median_s=imp["seconds"], peak_host_bytes=imp["peak_bytes"],
                 peak_over_weights=imp["peak_bytes"] / w)]
    return rows if a.no_workdir_import else rows + [_workdir_row(a, tmp, base)]


def _workdir_row(a, tmp: str, base: dict) -> dict:
    w = base["weights_bytes"]
    wd = _child("gfdm_import_workdir", a.in_process, variant=a.gfdm_config, out=os.path.join(tmp, "gfdm"),
                workdir=os.path.join(tmp, "gfdm_workdir"))
    return dict(base, what="gfdm_import_workdir", median_s=wd["seconds"], peak_host_bytes=wd["peak_bytes"],
                peak_over_weights=wd["peak_bytes"] / w, params_bytes=wd["params_bytes"],
                written_bytes=wd["written_bytes"])


def run(args: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="launch.benchmark export")
    p.add_argument("--workdir", default="", help="a policy workdir (default: a tiny random one, built here)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gfdm_full", action="store_true", help="export / import of the full-size GFDM instead")
    p.add_argument("--gfdm_config", default="svd", choices=("svd", "tiny"))
    p.add_argument("--channels_div", type=int, default=1, help="--gfdm_full: divide UNet / VAE channels by this")
    p.add_argument("--no_workdir_import", action="store_true",
                   help="--gfdm_full: skip the import into a workdir (launch.import_torch export)")
    p.add_argument("--in_process", action="store_true", help="no child processes (a smoke test; peaks mixed)")
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch.set_num_threads for torch_act (0: torch's default; on a loaded machine torch's "
                        "spinning OpenMP threads slow it >10x, 1 avoids that)")
    a = p.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        return _gfdm_rows(a, tmp) if a.gfdm_full else _policy_rows(a, tmp)
