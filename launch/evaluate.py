"""Closed-loop evaluation of a DeFI policy in simulation (``defi_jax/evaluation/metaworld.py``).

    python -m launch.evaluate --checkpoint=workdirs/demo/policy --suite=metaworld --tasks=demo --episodes=50
    python -m launch.evaluate --checkpoint=workdirs/demo/policy --tasks=mt10 --workers=8 --out=/tmp/eval_mt10
    python -m launch.evaluate --backend=exported --exported=workdirs/demo/exported --tasks=reach-v3,push-v3
    python -m launch.evaluate --backend=torch --torch_folder=/tmp/defi_torch --tasks=demo   # launch.export_torch's
    python -m launch.evaluate --checkpoint=workdirs/demo/policy --sample_sigma_min=0.002 --out=/tmp/eval_sigma

``--tasks``: ``demo`` (the robot tasks of the demo data), ``mt10``, ``mt50`` or a comma-separated list. Each
episode runs ``--horizon`` env steps at most, replanning every ``--steps_per_chunk`` steps; the scripted experts
run on the same seeds. The policy's noise is seeded per episode and replanning step, so an episode plays the same
whatever other tasks run and whatever ``--workers`` is (``python -m launch.compare_evals`` pairs two evaluations
episode by episode). Writes ``summary.json``, ``summary.csv`` (per-task success with a 95% Wilson interval, the
protocol on every row), ``attribution.csv`` (failed episodes split into forward / inverse dynamics failures)
and ``videos/<task>/*.gif`` (the real frames beside the GFDM's predicted future) under ``--out`` (default:
``<checkpoint, exported or torch folder>/eval_metaworld``; a ``gs://`` folder is written locally and uploaded at
the end). ``--sample_steps``, ``--sample_sigma_min`` and ``--gfdm_steps`` evaluate a JAX checkpoint with another
sampler than its config's; the summary's ``policy`` records the values used. ``--relabel_out=DIR`` (DAgger) also
keeps each policy episode with the scripted expert's action at every state the policy visited, for ``python -m
launch.make_demo_data --relabelled DIR``. The predicted future and the attribution need the JAX policy
(``--backend=jax``); with the exported or PyTorch backends the summary records them as unavailable.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Policy workdir (local or gs://); a relative path is made "
                                  "absolute.")
_SUITE = flags.DEFINE_enum("suite", "metaworld", ["metaworld"], "Simulation benchmark.")
_TASKS = flags.DEFINE_string("tasks", "demo", "demo | mt10 | mt50 | comma-separated Meta-World v3 task names.")
_EPISODES = flags.DEFINE_integer("episodes", 50, "Episodes per task.", lower_bound=1)
_BACKEND = flags.DEFINE_enum("backend", None, ["jax", "exported", "torch"], "Run the checkpoint in JAX, a "
                             "jax.export artifact or a PyTorch folder (default: exported when --exported is given, "
                             "torch when --torch_folder is, else jax).")
_EXPORTED = flags.DEFINE_string("exported", None, "Folder written by DeFIPolicy.export (--backend=exported).")
_TORCH = flags.DEFINE_string("torch_folder", None, "Folder written by python -m launch.export_torch "
                             "(--backend=torch).")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", None, "--backend=torch: torch device (default: cuda when "
                                    "available, else cpu).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_bool("ema", False, "Evaluate the checkpoint's EMA parameters.")
_OUT = flags.DEFINE_string("out", None, "Output folder, local or gs:// (default: <checkpoint, exported or "
                           "torch folder>/eval_metaworld).")
_HORIZON = flags.DEFINE_integer("horizon", 200, "Env steps per episode at most.", lower_bound=1)
_STEPS_PER_CHUNK = flags.DEFINE_integer("steps_per_chunk", 10, "Actions of each predicted chunk executed before "
                                        "replanning.", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Env worker processes (= the policy's "
                                "batch size).", lower_bound=1)
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", None, "--backend=jax: the action head's sampler steps "
                                     "(default: the checkpoint's model.sample_steps).", lower_bound=1)
_SIGMA_MIN = flags.DEFINE_float("sample_sigma_min", None, "--backend=jax: the sampler's last sigma before 0 (default: "
                                "the checkpoint's model.sample_sigma_min; the reference evaluates at 1.0, which "
                                "leaves the chunk close to the head's conditional mean).")
_GFDM_STEPS = flags.DEFINE_integer("gfdm_steps", None, "--backend=jax: GFDM denoising steps before the features "
                                   "(default: the checkpoint's model.gfdm_steps).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Evaluation seed (episode seeds and goals derive from it).")
_RESOLUTION = flags.DEFINE_integer("resolution", 128, "Render size in pixels (the demo data's "
                                   "launch.make_demo_data --size); the policy resizes to its own.", lower_bound=8)
_EXPERT = flags.DEFINE_bool("expert", True, "Also run the scripted expert on the same seeds.")
_VIDEOS = flags.DEFINE_integer("videos_per_task", -1, "GIFs of the first N episodes per task (-1: all).",
                               lower_bound=-1)
_GIF_MS = flags.DEFINE_integer("gif_frame_ms", 40, "GIF frame duration in ms (one frame per env step).",
                               lower_bound=1)
_PREDICT = flags.DEFINE_bool("predict_future", True, "Show the GFDM's one-step predicted future beside the real "
                             "frames and attribute failures to forward / inverse dynamics (JAX backend).")
_FUTURE_STRIDE = flags.DEFINE_integer("future_stride", 1, "Env steps between the GFDM's predicted frames (the "
                                      "GFDM's config.data.frame_stride).", lower_bound=1)
_RELABEL = flags.DEFINE_string("relabel_out", None, "DAgger: also keep every policy episode with the scripted "
                               "expert's action at each visited state in this folder (local or gs://), for "
                               "launch.make_demo_data --relabelled. Use a --seed the evaluation does not (its "
                               "episodes become training data).")
_PERCENTILE = flags.DEFINE_float("attribution_percentile", 10.0, "A failure scoring below this percentile of the "
                                 "task's successful episodes' prediction scores is a forward-dynamics failure.",
                                 lower_bound=0.0, upper_bound=100.0)


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)        # Orbax logs every file it reads at INFO
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)

    from defi_jax import inference
    from defi_jax.evaluation import metaworld

    backend = _BACKEND.value or ("exported" if _EXPORTED.value else "torch" if _TORCH.value else "jax")
    if backend == "exported" and not _EXPORTED.value:
        print("launch.evaluate: --backend=exported needs --exported=PATH (a DeFIPolicy.export folder)", file=sys.stderr)
        return 2
    if backend == "torch" and not _TORCH.value:
        print("launch.evaluate: --backend=torch needs --torch_folder=PATH (a launch.export_torch folder)",
              file=sys.stderr)
        return 2
    if backend == "jax" and not _CHECKPOINT.value:
        print("launch.evaluate: --checkpoint=DIR is required with --backend=jax", file=sys.stderr)
        return 2
    overrides = {k: f.value for k, f in (("sample_steps", _SAMPLE_STEPS), ("sample_sigma_min", _SIGMA_MIN),
                                          ("gfdm_steps", _GFDM_STEPS)) if f.value is not None}
    if overrides and backend != "jax":
        print(f"launch.evaluate: --{', --'.join(overrides)} change(s) a checkpoint's config: --backend=jax only (an "
              f"exported or PyTorch policy has its sampler built in)", file=sys.stderr)
        return 2
    if backend == "exported":
        source = paths.abspath(_EXPORTED.value)
        info = {"source": source, "backend": "exported"}
    elif backend == "torch":
        if paths.is_remote(_TORCH.value):
            print(f"launch.evaluate: --torch_folder={_TORCH.value}: a PyTorch folder is read from local disk; copy "
                  f"it first (gcloud storage cp -r {_TORCH.value} .)", file=sys.stderr)
            return 2
        source = os.path.abspath(_TORCH.value)
        info = {"source": source, "backend": "torch",
                "noise": f"one torch.Generator seeded with --seed={_SEED.value}, rows in batch order"}
    else:
        source = paths.abspath(_CHECKPOINT.value)
        info = {"source": source, "backend": "jax", "step": _STEP.value, "ema": _EMA.value}
    out = paths.abspath(_OUT.value) if _OUT.value else paths.join(source, "eval_metaworld")
    try:
        protocol = metaworld.Protocol(
            tasks=metaworld.task_list(_TASKS.value), episodes=_EPISODES.value, horizon=_HORIZON.value,
            steps_per_chunk=_STEPS_PER_CHUNK.value, seed=_SEED.value, resolution=_RESOLUTION.value,
            workers=_WORKERS.value, expert=_EXPERT.value, gif_frame_ms=_GIF_MS.value,
            videos_per_task=None if _VIDEOS.value < 0 else _VIDEOS.value, predict_future=_PREDICT.value,
            future_stride=_FUTURE_STRIDE.value, attribution_percentile=_PERCENTILE.value)
        protocol.check()
    except ValueError as e:
        print(f"launch.evaluate: --{e}", file=sys.stderr)
        return 2
    print(f"launch.evaluate: {backend} policy {source} on Meta-World {','.join(protocol.tasks)} "
          f"({protocol.episodes} episodes each, horizon {protocol.horizon}, seed {protocol.seed}) -> {out}", flush=True)
    try:
        if backend == "exported":
            policy = inference.load_exported(source)
        elif backend == "torch":
            policy = inference.load_torch(source, seed=_SEED.value, device=_TORCH_DEVICE.value)
            info["device"] = policy.device
        else:
            policy = inference.DeFIPolicy.from_checkpoint(source, step=_STEP.value, ema=_EMA.value, seed=_SEED.value,
                                                          **overrides)
            info.update(gfdm_steps=int(policy.config.model.gfdm_steps), sample_steps=policy.num_steps,
                        sample_sigma_min=policy.sigma_min, sampler_overrides=sorted(overrides))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"launch.evaluate: {e}", file=sys.stderr)
        return 2
    summary = metaworld.evaluate(policy, protocol, out, policy_info=info,
                                 progress=lambda line: print(line, flush=True),
                                 relabel_out=paths.abspath(_RELABEL.value) if _RELABEL.value else None)
    files = "summary.json, summary.csv, " + ("attribution.csv, " if summary["attribution"]["available"] else "")
    print(f"launch.evaluate: mean success {summary['mean_success']:.3f}; outputs in {out} ({files}videos/)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
