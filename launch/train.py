"""Train any stage: ``python -m launch.train --config=configs/toy.py:tiny --workdir=DIR [--config.x=y]``.

DIR may be a local folder or gs://bucket/path. The run resumes from DIR's latest checkpoint by itself.
Multi-host: see ``defi_jax/distributed.py`` for the coordinator environment variables (none are needed on
Cloud TPU pods). SIGTERM saves and exits 0. A bad flag, config key or value stops the run before anything
is built, with one line naming it (exit code 2).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow (RLDS readers)

import sys  # noqa: E402

# grain's worker processes pass batches in shared memory; blocks still in flight when the loader closes are
# freed by Python's resource tracker at exit, which reports them as "resource_tracker: There appear to be N
# leaked shared_memory objects to clean up at shutdown": nothing is leaked and nothing is to be done. The
# tracker is a child process that takes its warning filters from sys.warnoptions when it starts.
sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/toy.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, metrics and "
                               "summaries; a relative path is made absolute.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)  # Orbax logs every file it writes at INFO
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)   # "Unable to initialize backend 'tpu'" etc.
    config, workdir = _CONFIG.value, paths.abspath(_WORKDIR.value)
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"launch.train: {spec} (stage {config.stage}, {config.train.num_steps} steps) -> {workdir}", flush=True)

    from defi_jax import distributed
    distributed.initialize()  # before anything touches jax.devices()
    from defi_jax import trainer
    try:
        result = trainer.train(config, workdir)
    except config_validation.ConfigError as e:
        print(f"launch.train: {e}", file=sys.stderr)
        return 2
    if not distributed.is_primary():
        return 0
    outputs = [f"checkpoints {paths.join(workdir, 'checkpoints')}", f"metrics {paths.join(workdir, 'metrics.jsonl')}",
               f"TensorBoard {paths.join(workdir, 'tensorboard')}"]
    if paths.exists(paths.join(workdir, "samples")):
        outputs.append(f"samples {paths.join(workdir, 'samples')}")
    if result.status == "preempted":
        logging.warning("stopped by preemption at step %d; rerun the same command to resume", result.step)
        print(f"launch.train: preempted at step {result.step}; {'; '.join(outputs)}", flush=True)
    else:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()
                          if (k == "loss" or k.startswith("eval_")) and isinstance(v, (int, float)))
        print(f"launch.train: done at step {result.step} ({shown}); {'; '.join(outputs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
