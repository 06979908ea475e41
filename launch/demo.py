"""The main job on the embedded default: every DeFI stage, end to end, on the Meta-World demo data.

    python -m launch.demo --workdir=workdirs/demo            # or: make demo
    python -m launch.demo --steps=4 --workdir=/tmp/smoke     # a minute-scale smoke of the same pipeline
    python -m launch.demo --stages=policy,export             # only some parts (the others' workdirs are reused)

1. writes the demo data on first use (Meta-World scripted experts as RLDS + SSv2-layout videos);
2. ``gidm``: pretrains the GIDM (``configs/gidm.py:tiny``) on frame pairs, no actions used;
3. ``gfdm``: pretrains the GFDM (``configs/gfdm.py:tiny``) on clips, writing sample GIFs;
4. ``policy``: fine-tunes the DeFI policy (``configs/policy.py:tiny``) from those two workdirs on labelled windows;
5. ``evaluate``: runs the policy closed-loop in Meta-World on the demo's robot tasks (``--episodes`` each, the
   scripted experts on the same seeds; ``WORKDIR/eval_metaworld``: summary.json / .csv, rollout GIFs);
6. ``export``: loads the policy checkpoint for inference, acts, exports it with ``jax.export`` and checks that
   the exported artifact (jax + numpy only) reproduces the in-process actions.
Each stage trains through the one trainer (checkpoints, metrics.jsonl, TensorBoard under ``WORKDIR/<stage>``);
rerunning resumes every stage from its last checkpoint (a finished stage is not retrained). A summary table
ends the run: each stage's last losses, where its outputs are.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where each stage writes its run.")
_STEPS = flags.DEFINE_integer("steps", None, "Train steps per stage (default: each tiny config's own).")
_STAGES = flags.DEFINE_list("stages", ["gidm", "gfdm", "policy", "evaluate", "export"], "Parts to run, in order.")
_EPISODES = flags.DEFINE_integer("episodes", 5, "Closed-loop Meta-World episodes per demo task (evaluate).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Demo data folder (default: $DEFI_JAX_DEMO_DIR or ~/.cache).")

PARTS = ("gidm", "gfdm", "policy", "evaluate", "export")


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


def _config(name: str, root: str, data_dir: str | None):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    if name == "policy":
        config.init.sources.gfdm.path = os.path.join(root, "gfdm")
        config.init.sources.gidm.path = os.path.join(root, "gidm")
    if data_dir:
        config.data.data_dir = data_dir
    if _STEPS.value is not None:
        config.train.num_steps = _STEPS.value
        config.train.save_every = min(config.train.save_every, _STEPS.value)
    return config


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
                                  horizon=30 if smoke else 200, workers=2, videos_per_task=2)
    out = os.path.join(root, "eval_metaworld")
    summary = metaworld.evaluate(policy, protocol, out, policy_info={"checkpoint": os.path.join(root, "policy")},
                                 progress=None)
    row = {f"success/{t}": v["success"] for t, v in summary["tasks"].items()}
    return row | {"mean_success": summary["mean_success"],
                  "mean_expert_success": summary.get("mean_expert_success", float("nan")), "summary": out}


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)

    import defi_jax  # noqa: F401
    from data_pipelines import demo
    from defi_jax import trainer

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
    summary: dict[str, dict] = {}
    for name in _STAGES.value:
        start = time.perf_counter()
        if name == "export":
            print("== export: act, jax.export, reload and compare", flush=True)
            summary[name] = _export_check(root)
        elif name == "evaluate":
            print(f"== evaluate: Meta-World closed loop, {_EPISODES.value} episode(s) per demo task", flush=True)
            summary[name] = _closed_loop(root)
        else:
            config = _config(name, root, data_dir if _DATA_DIR.value else None)
            workdir = os.path.join(root, name)
            print(f"== {name}: {config.train.num_steps} steps -> {workdir}", flush=True)
            result = trainer.train(config, workdir)
            if result.status == "preempted":
                logging.warning("%s preempted at step %d; rerun to resume", name, result.step)
                return 1
            summary[name] = {k: v for k, v in _last_metrics(workdir).items()
                             if isinstance(v, (int, float)) and (k in ("step", "loss") or "loss" in k or "mse" in k
                                                                  or k.startswith("eval_") or k == "probe_r2")}
            summary[name]["workdir"] = workdir
        summary[name]["minutes"] = (time.perf_counter() - start) / 60
    print("\n== summary")
    for name, m in summary.items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items()))
        print(f"{name}: {shown}")
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary written to {os.path.join(root, 'summary.json')}")
    return 0


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
