"""Train any stage: ``python -m launch.train --config=configs/toy.py:tiny --workdir=DIR [--config.x=y]``.

Resumes from DIR's latest checkpoint by itself. Multi-host: see ``defi_jax/distributed.py`` for the
coordinator environment variables (none are needed on Cloud TPU pods). SIGTERM saves and exits 0.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/toy.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)  # Orbax logs every file it writes at INFO
    from defi_jax import distributed
    distributed.initialize()  # before anything touches jax.devices()

    import defi_jax  # noqa: F401  (flax settings)
    from defi_jax import trainer
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
    if result.status == "preempted":
        logging.warning("stopped by preemption at step %d; rerun the same command to resume", result.step)
    else:
        logging.info("finished at step %d: %s", result.step, result.metrics)


if __name__ == "__main__":
    sys.exit(app.run(main))
