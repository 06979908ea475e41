"""The main job on the embedded default: every DeFI stage, end to end, on the Meta-World demo data.

    python -m launch.demo --workdir=workdirs/demo            # or: make demo
    python -m launch.demo --steps=4 --workdir=/tmp/smoke     # a minute-scale smoke of the same pipeline
    python -m launch.demo --stages=policy,export             # only some parts (the others' workdirs are reused)

1. writes the demo data on first use (Meta-World scripted experts as RLDS + SSv2-layout videos);
2. ``vae``: trains the tiny GFDM's VAE (``configs/vae.py:tiny``) on the demo clips, writing reconstruction GIFs
   (real clips above, reconstructions below), so that the GFDM's latents decode to video;
3. ``gidm``: pretrains the GIDM (``configs/gidm.py:tiny``) on frame pairs, no actions used;
4. ``gfdm``: pretrains the GFDM (``configs/gfdm.py:tiny``) on clips with that VAE frozen (read from ``WORKDIR/vae``
   through ``config.init.sources.vae_workdir``), writing sample GIFs (real clips above, predicted below);
5. ``policy``: fine-tunes the DeFI policy (``configs/policy.py:demo``: the tiny model, trained longer) from those
   two workdirs on labelled windows;
6. ``evaluate``: runs the policy closed-loop in Meta-World on the demo's robot tasks (``--episodes`` each, the
   first ``--steps_per_chunk`` actions of each chunk executed, the scripted experts on the same seeds;
   ``WORKDIR/eval_metaworld``: summary.json / .csv, rollout GIFs);
7. ``export``: loads the policy checkpoint for inference, acts, exports it with ``jax.export`` and checks that
   the exported artifact (jax + numpy only) reproduces the in-process actions;
8. ``sweep``: a tiny human-video-fraction sweep of the GIDM (``defi_jax.sweep``: one short run per value of
   ``data.human_video_fraction``; ``WORKDIR/sweep``: sweep.csv and plots of the held-out metrics vs the fraction).
Each stage trains through the one trainer (checkpoints, metrics.jsonl, TensorBoard under ``WORKDIR/<stage>``);
rerunning resumes every stage from its last checkpoint (a finished stage is not retrained; evaluate and export of
the same policy checkpoint, and finished sweep runs, are not redone). A summary table ends the run: each part's
last losses and metrics, and where every artifact is; ``WORKDIR/summary.json`` holds the same.
"""

import glob
import json
import os
import sys
import time

from absl import app, flags, logging

PARTS = ("vae", "gidm", "gfdm", "policy", "evaluate", "export", "sweep")

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where each stage writes its run.")
_STEPS = flags.DEFINE_integer("steps", None, "Train steps per stage and per sweep run (default: each tiny "
                              "config's own; the sweep's runs: SWEEP_STEPS).")
_STAGES = flags.DEFINE_list("stages", list(PARTS), "Parts to run, in order.")
_EPISODES = flags.DEFINE_integer("episodes", 10, "Closed-loop Meta-World episodes per demo task (evaluate).")
_STEPS_PER_CHUNK = flags.DEFINE_integer("steps_per_chunk", 10, "Actions of each predicted chunk executed before the "
                                        "policy is asked again (evaluate).", lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Demo data folder (default: $DEFI_JAX_DEMO_DIR or ~/.cache).")

POLICY_VARIANT = "demo"   # configs/policy.py's: tiny's model, trained to act closed-loop

# The sweep part: the tiny GIDM at each human-video fraction, SWEEP_STEPS steps per run (--steps overrides).
SWEEP_PARAM = "data.human_video_fraction"
SWEEP_VALUES = ("0", "0.5", "1")
SWEEP_STEPS = 100
# Plotted against the fraction: the probe needs held-out robot actions (none at fraction 1), the gap does not.
SWEEP_METRICS = ("probe_r2", "eval_action_info_gap")


def _last_metrics(workdir: str) -> dict:
    """The last training row merged with the last evaluation row of the stage's metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    merged = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    merged.update(json.loads(line))
                except json.JSONDecodeError:   # a line cut by a killed run
                    pass
    return merged


def _finished(workdir: str) -> dict | None:
    """``{"step", "metrics"}`` of a stage's finished run (the trainer's ``finished.json``), None when unfinished."""
    from defi_jax import trainer

    path = os.path.join(workdir, trainer.FINISHED)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _finished_step(workdir: str) -> int | None:
    done = _finished(workdir)
    return None if done is None else int(done["step"])


def _vae_scaling_factor(root: str) -> float | None:
    """1 / the std of the trained tiny VAE's latents (its ``eval_latent_std``): the GFDM then diffuses unit-scale
    latents (EDM's sigma_data = 1), as SVD's 0.18215 does for its VAE. None without a finished VAE run."""
    done = _finished(os.path.join(root, "vae"))
    std = (done or {}).get("metrics", {}).get("eval_latent_std")
    return None if not std else 1.0 / float(std)


def _config(name: str, root: str, data_dir: str | None):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config(POLICY_VARIANT if name == "policy" else "tiny")
    if name == "gfdm":
        vae, scale = os.path.join(root, "vae"), _vae_scaling_factor(root)
        if scale is not None:
            config.init.sources.vae_workdir.path = vae
            config.model.vae.scaling_factor = scale
        else:
            print(f"   no finished VAE in {vae} (run the vae part first): the GFDM's frozen VAE stays random and its "
                  f"samples will be noise", flush=True)
    if name == "policy":
        config.init.sources.gfdm.path = os.path.join(root, "gfdm")
        config.init.sources.gidm.path = os.path.join(root, "gidm")
        if config.model.center_features:   # the GFDM's feature statistics, computed before the policy's first step
            config.init.sources.feature_stats.path = os.path.join(root, "feature_stats")
            if _STEPS.value is not None:
                config.policy.feature_stats_windows = min(config.policy.feature_stats_windows, 16 * _STEPS.value)
        gfdm_config = os.path.join(root, "gfdm", "config.json")
        if os.path.exists(gfdm_config):   # the latent scale the GFDM it starts from was trained with
            with open(gfdm_config) as f:
                config.model.gfdm.vae.scaling_factor = json.load(f)["model"]["vae"]["scaling_factor"]
    if data_dir:
        config.data.data_dir = data_dir
    if _STEPS.value is not None:
        config.train.num_steps = _STEPS.value
        config.train.save_every = min(config.train.save_every, _STEPS.value)
    return config


def _samples(workdir: str) -> str | None:
    """The newest sample GIF a stage's evaluation wrote (``WORKDIR/<stage>/samples/step_*.gif``)."""
    gifs = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.gif")))
    return gifs[-1] if gifs else None


def _train(name: str, root: str, data_dir: str | None) -> dict | None:
    """Trains (or resumes, or finds finished) one stage; its last metrics and artifacts, None when preempted."""
    from defi_jax import trainer

    config = _config(name, root, data_dir)
    workdir = os.path.join(root, name)
    print(f"   {config.train.num_steps} steps -> {workdir}", flush=True)
    result = trainer.train(config, workdir)
    if result.status == "preempted":
        logging.warning("%s preempted at step %d; rerun to resume", name, result.step)
        return None
    row = {k: v for k, v in _last_metrics(workdir).items()
           if isinstance(v, (int, float)) and (k in ("step", "loss") or "loss" in k or "mse" in k or "psnr" in k
                                                or k.startswith("eval_") or k == "probe_r2")}
    row["workdir"] = workdir
    if _samples(workdir):
        row["samples"] = _samples(workdir)
    return row


def _reused(previous: dict, name: str, **same) -> dict | None:
    """The previous run's result of a part when it was computed from the same inputs (``same``)."""
    row = previous.get(name)
    if row and all(v is not None and row.get(k) == v for k, v in same.items()) and \
            os.path.exists(row.get("artifact", "")):
        print("   done before with the same policy checkpoint: skipped", flush=True)
        return row
    return None


def _export_check(root: str) -> dict:
    """In-process actions vs the exported artifact's, on a demo observation."""
    import numpy as np

    from defi_jax.inference import DeFIPolicy, load_exported

    policy = DeFIPolicy.from_checkpoint(os.path.join(root, "policy"), seed=0)
    rs = np.random.default_rng(0)
    obs = {v: rs.integers(0, 256, (policy.resolution, policy.resolution, 3), dtype=np.uint8) for v in policy.views}
    t0 = time.perf_counter()
    ours = policy.act(obs, "push the puck to the goal")
    first_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    policy.act(obs, "push the puck to the goal")
    act_ms = 1e3 * (time.perf_counter() - t0)
    out = os.path.join(root, "exported")
    policy.export(out, platforms=["cpu"])
    theirs = load_exported(out).act_batch([obs], ["push the puck to the goal"], seed=0)[0]
    err = float(np.max(np.abs(ours - theirs)))
    return {"act_ms": act_ms, "first_act_ms": first_ms, "exported_max_abs_diff": err, "artifact": out}


def _closed_loop(root: str) -> dict:
    """Meta-World success of the demo policy on the demo's robot tasks (and the scripted experts')."""
    from defi_jax.evaluation import metaworld
    from defi_jax.inference import DeFIPolicy

    policy = DeFIPolicy.from_checkpoint(os.path.join(root, "policy"), seed=0)
    smoke = _STEPS.value is not None and _STEPS.value < 20
    protocol = metaworld.Protocol(tasks=metaworld.task_list("demo"), episodes=_EPISODES.value,
                                  horizon=30 if smoke else 200, steps_per_chunk=_STEPS_PER_CHUNK.value, workers=2,
                                  videos_per_task=2)
    out = os.path.join(root, "eval_metaworld")
    summary = metaworld.evaluate(policy, protocol, out, policy_info={"checkpoint": os.path.join(root, "policy")},
                                 progress=None)
    row = {f"success/{t}": v["success"] for t, v in summary["tasks"].items()}
    return row | {"mean_success": summary["mean_success"],
                  "mean_expert_success": summary.get("mean_expert_success", float("nan")), "artifact": out,
                  "videos": os.path.join(out, "videos"), "horizon": protocol.horizon,
                  "steps_per_chunk": protocol.steps_per_chunk}


def _sweep(root: str, data_dir: str | None) -> dict:
    """The tiny GIDM at each human-video fraction (``defi_jax.sweep``: finished runs are skipped), CSV + plots."""
    import configs
    from defi_jax import config_validation, sweep

    out = os.path.join(root, "sweep")
    steps = SWEEP_STEPS if _STEPS.value is None else _STEPS.value
    sets = [("train.num_steps", str(steps)), ("train.save_every", str(steps)),
            ("train.log_every", str(min(25, steps))), ("train.progress_bar", "false")]
    sets += [("data.data_dir", data_dir)] if data_dir else []
    spec = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "gidm.py") + ":tiny"
    try:
        stage, runs = sweep.plan(spec, SWEEP_PARAM, SWEEP_VALUES, None, sets, out)
    except config_validation.ConfigError as e:   # e.g. finished before with other --steps: nothing is retrained
        print(f"   sweep not run: {e}", flush=True)
        return {"artifact": out, "failed": str(e)}
    print(f"   the GIDM at {SWEEP_PARAM} = {', '.join(SWEEP_VALUES)}, {steps} steps each -> {out}", flush=True)
    sweep.execute(runs, log=lambda line: print(f"   {line}", flush=True))
    row: dict = {"artifact": out, "csv": os.path.join(out, "sweep.csv")}
    for i, metric in enumerate(SWEEP_METRICS):
        png = os.path.join(out, "sweep.png" if i == 0 else f"sweep_{metric}.png")
        sweep.plot(runs, png, SWEEP_PARAM, metric)
        row[f"plot/{metric}"] = png
        row |= {f"{metric}@{r.value}": r.metrics[metric] for r in runs if metric in r.metrics}
    sweep.write_csv(runs, row["csv"], SWEEP_PARAM, sweep.choose_metric(stage, runs, None))
    failed = [f"{r.value} ({r.status})" for r in runs if r.status not in ("done", "skipped")]
    if failed:
        row["failed"] = ", ".join(failed)
    return row


def _summarize(summary: dict[str, dict], path: str) -> None:
    """Prints one block per part: its numbers on one line, then where each of its artifacts is."""
    from defi_jax import paths

    print("\n== summary")
    for name, m in summary.items():
        numbers = {k: v for k, v in sorted(m.items()) if not isinstance(v, str)}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
        print(f"{name:<9}{shown}")
        for k, v in sorted(m.items()):
            if isinstance(v, str):
                print(f"{'':<9}{k + ':':<30}{v}")
    paths.write_text(path, json.dumps(summary, indent=1))
    print(f"summary written to {path}")


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)

    import defi_jax  # noqa: F401
    from data_pipelines import demo
    from defi_jax import paths

    unknown = [s for s in _STAGES.value if s not in PARTS]
    if unknown:
        print(f"launch.demo: --stages: unknown part(s) {unknown}; parts: {','.join(PARTS)}", file=sys.stderr)
        return 2
    # Orbax needs absolute paths; the README's command passes a relative one.
    root = _WORKDIR.value if "://" in _WORKDIR.value else os.path.abspath(_WORKDIR.value)
    data_dir = os.path.abspath(_DATA_DIR.value) if _DATA_DIR.value else None
    print(f"launch.demo: {', '.join(_STAGES.value)} -> {root}", flush=True)
    data_dir = demo.ensure_demo_data(data_dir)
    print(f"demo data: {data_dir}", flush=True)
    given_data_dir = data_dir if _DATA_DIR.value else None
    summary_path = os.path.join(root, "summary.json")
    previous = json.loads(paths.read_text(summary_path)) if paths.exists(summary_path) else {}
    summary: dict[str, dict] = dict(previous)   # parts not run now keep their last results
    for i, name in enumerate(_STAGES.value):
        start = time.perf_counter()
        print(f"== [{i + 1}/{len(_STAGES.value)}] {name}", flush=True)
        if name in ("evaluate", "export"):
            policy_step = _finished_step(os.path.join(root, "policy"))
            if name == "evaluate":
                print(f"   Meta-World closed loop, {_EPISODES.value} episode(s) per demo task", flush=True)
                row = _reused(previous, name, policy_step=policy_step, episodes=_EPISODES.value,
                              steps_per_chunk=_STEPS_PER_CHUNK.value) or \
                    _closed_loop(root) | {"episodes": _EPISODES.value}
            else:
                print("   act, jax.export, reload and compare", flush=True)
                row = _reused(previous, name, policy_step=policy_step) or _export_check(root)
            row["policy_step"] = policy_step
        elif name == "sweep":
            row = _sweep(root, given_data_dir)
        else:
            row = _train(name, root, given_data_dir)
            if row is None:
                return 1
        if row is not previous.get(name):
            row["minutes"] = (time.perf_counter() - start) / 60
        summary[name] = row
    summary = {name: summary[name] for name in PARTS if name in summary}
    _summarize(summary, summary_path)
    return 0


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
