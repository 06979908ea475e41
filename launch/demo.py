"""The main job on the embedded default: every pretraining stage, end to end, on the Meta-World demo data.

    python -m launch.demo --workdir=workdirs/demo            # or: make demo

1. writes the demo data on first use (Meta-World scripted experts as RLDS + SSv2-layout videos);
2. pretrains the GIDM (``configs/gidm.py:tiny``) on frame pairs, no actions used;
3. pretrains the GFDM (``configs/gfdm.py:tiny``) on clips, writing sample GIFs;
each through the one trainer (checkpoints, metrics.jsonl, TensorBoard under ``WORKDIR/<stage>``).
Rerunning resumes every stage from its last checkpoint. ``--steps`` shortens or lengthens each stage.
"""

import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where each stage writes its run.")
_STEPS = flags.DEFINE_integer("steps", None, "Train steps per stage (default: each tiny config's own).")
_STAGES = flags.DEFINE_list("stages", ["gidm", "gfdm"], "Stages to run, in order.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Demo data folder (default: $DEFI_JAX_DEMO_DIR or ~/.cache).")


def _last_metrics(workdir: str) -> dict:
    """The last training row merged with the last evaluation row of the stage's metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    merged = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                merged.update(json.loads(line))
    return merged


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)
    import importlib

    import defi_jax  # noqa: F401
    from data_pipelines import demo
    from defi_jax import trainer

    # Orbax needs absolute paths; the README's command passes a relative one.
    root = _WORKDIR.value if "://" in _WORKDIR.value else os.path.abspath(_WORKDIR.value)
    data_dir = demo.ensure_demo_data(os.path.abspath(_DATA_DIR.value) if _DATA_DIR.value else None)
    print(f"demo data: {data_dir}", flush=True)
    summary = {}
    for name in _STAGES.value:
        config = importlib.import_module(f"configs.{name}").get_config("tiny")
        if _STEPS.value is not None:
            config.train.num_steps = _STEPS.value
        workdir = os.path.join(root, name)
        print(f"== {name}: {config.train.num_steps} steps -> {workdir}", flush=True)
        result = trainer.train(config, workdir)
        if result.status == "preempted":
            logging.warning("%s preempted at step %d; rerun to resume", name, result.step)
            return 1
        summary[name] = {k: v for k, v in _last_metrics(workdir).items() if isinstance(v, (int, float))}
    for name, m in summary.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()))
        print(f"{name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
