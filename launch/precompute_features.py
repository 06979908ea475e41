"""The frozen GFDM's one-step features of policy training windows, computed once (``defi_jax.policy.features``).

    python -m launch.precompute_features --config=configs/policy.py:demo --out=/tmp/demo_features \\
        --train_windows=4096 --eval_windows=512
    python -m launch.train --config=configs/policy.py:demo --workdir=/tmp/policy_cached \\
        --config.data.source=features --config.data.features_dir=/tmp/demo_features \\
        --config.model.center_features=True --config.train.num_steps=800 --config.train.batch_size=64
    python -m launch.precompute_features --config=configs/policy.py:demo --out=/tmp/demo_stats \
        --train_windows=512 --stats_only     # only the mean / std, for a policy trained on frames

The config is the policy run's own (its GFDM source, views, resolution, data and tokenizers: the training run checks
that they agree with the store's). Each window gets one fresh noise draw. ``--out`` may be local or ``gs://``; the
store's ``feature_stats.safetensors`` (the train windows' per-channel mean and standard deviation) is written last, so a stopped run leaves
a store the training refuses. The demo's 32 px windows take 1.2 MB each (4,096: 4.8 GB); the full ``defi`` config's
would take 84 MB each (train on frames there).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow (RLDS readers)

import sys  # noqa: E402

# The resource tracker's "leaked shared_memory objects" exit notice about grain workers' in-flight batches means
# nothing (they are freed); see launch/train.py.
sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Policy config, e.g. configs/policy.py:demo.")
_OUT = flags.DEFINE_string("out", None, "Output folder (local or gs://); a relative path is made absolute.")
_TRAIN = flags.DEFINE_integer("train_windows", 4096, "Training windows (each with one noise draw).", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_windows", 512, "Held-out windows (the eval split).", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch", 64, "Windows per GFDM call.", lower_bound=1)
_STATS_ONLY = flags.DEFINE_bool("stats_only", False, "Only the train windows' per-channel mean and standard deviation "
                                "(feature_stats.safetensors, for a policy trained on frames with "
                                "model.center_features): no records, --eval_windows ignored.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)
    config, out = _CONFIG.value, paths.abspath(_OUT.value)
    if config.stage != "policy":
        print(f"launch.precompute_features: --config stage is {config.stage!r}; it needs a policy config "
              "(configs/policy.py:tiny | demo | defi)", file=sys.stderr)
        return 2
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    what = "statistics of " if _STATS_ONLY.value else ""
    print(f"launch.precompute_features: {spec}, {what}{_TRAIN.value} train + {0 if _STATS_ONLY.value else _EVAL.value} "
          f"eval windows -> {out}", flush=True)
    from defi_jax.policy import features

    config_validation.resolve(config)
    try:
        metas = features.precompute(config, out, {"train": _TRAIN.value, "eval": _EVAL.value}, batch_size=_BATCH.value,
                                    stats_only=_STATS_ONLY.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"launch.precompute_features: {e}", file=sys.stderr)
        return 2
    shape = metas["train"]["feature_shape"]
    if _STATS_ONLY.value:
        print(f"launch.precompute_features: done, statistics of features {shape} in {out}; train on frames with "
              f"--config.model.center_features=True [--config.model.scale_features=True] "
              f"--config.init.sources.feature_stats.path={out}", flush=True)
        return 0
    print(f"launch.precompute_features: done, features {shape} per window in {out}; train on them with "
          f"--config.data.source=features --config.data.features_dir={out} [--config.model.center_features=True]",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
