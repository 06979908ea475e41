"""Sweep any config key: one training run per (value, seed), then DIR/sweep.csv and DIR/sweep.png.

    python -m launch.sweep --config=configs/gidm.py:tiny --param=data.human_video_fraction \\
        --values=0,0.25,0.5,0.75,1 --seeds=1,2 --workdir=/tmp/hvf
    python -m launch.sweep --config=configs/toy.py:tiny --param=train.lr --values=1e-3,3e-3 --workdir=/tmp/lr \\
        --set=train.num_steps=10 --metric=eval_mse
    python -m launch.sweep --config=configs/toy.py:tiny --param=mesh.shape --values='(1,8,1),(2,4,1)' \\
        --workdir=/tmp/mesh --dry_run

Runs go to ``DIR/<param>=<value>/seed=<seed>``, one after another, each ``python -m launch.train`` in a
fresh process (a crash loses only that run; its output is in the run's ``train.log``). Rerunning the same
command skips finished runs and resumes a partly trained one from its checkpoints. The metric is the last
logged value in each run's ``metrics.jsonl``: ``--metric``, else GIDM ``probe_r2`` (or
``eval_action_info_gap``), GFDM ``eval_loss``, otherwise the last training ``loss``. The plot shows each
seed, their mean and their spread (matplotlib when installed, else drawn with PIL).
SIGTERM / Ctrl-C stops the running training cleanly (it saves) and ends the sweep.
"""

import os
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "Experiment config, e.g. configs/gidm.py:tiny.")
_PARAM = flags.DEFINE_string("param", None, "The dotted config key to sweep, e.g. data.human_video_fraction.")
_VALUES = flags.DEFINE_string("values", None, "Comma-separated values; commas inside (...) stay: '(1,8,1),(2,4,1)'.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (config.seed) to train each value with; default: the config's.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (local).")
_METRIC = flags.DEFINE_string("metric", None, "Metric to report; default depends on the stage.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every run (repeatable).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the training commands (and what is finished), run nothing.")
flags.mark_flags_as_required(["config", "param", "values", "workdir"])


def _parse_flags(argv):
    if {"-h", "--help", "-?"} & set(argv[1:]):  # absl's own --help exits 1
        app.usage(shorthelp=True, writeto_stdout=True)
        sys.exit(0)
    return app.parse_flags_with_usage(argv)


def main(argv):
    del argv
    from defi_jax import config_validation, sweep

    if _WORKDIR.value.startswith("gs://"):
        sys.exit("launch.sweep: --workdir must be local (the sweep writes its CSV and PNG there); the runs' own "
                 "checkpoints can still go to gs:// through a per-run key")
    workdir = os.path.abspath(_WORKDIR.value)
    param = _PARAM.value.removeprefix("config.")
    try:
        overrides = []
        for item in _SET.value:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--set={item!r}: expected KEY=VALUE")
            overrides.append((key.removeprefix("config."), value))
        seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else None
        stage, runs = sweep.plan(_CONFIG.value, param, sweep.split_values(_VALUES.value), seeds, overrides, workdir)
    except (ValueError, config_validation.ConfigError) as e:
        sys.exit(f"launch.sweep: {e}")

    print(f"sweep of config.{param} over {len(runs)} runs in {workdir}", flush=True)
    sweep.execute(runs, dry_run=_DRY_RUN.value, log=lambda s: print(s, flush=True))
    if _DRY_RUN.value:
        return 0
    metric = sweep.choose_metric(stage, runs, _METRIC.value)
    csv_path, png_path = os.path.join(workdir, "sweep.csv"), os.path.join(workdir, "sweep.png")
    sweep.write_csv(runs, csv_path, param, metric)
    sweep.plot(runs, png_path, param, metric)
    for r in runs:
        print(f"  {param}={r.value} seed={r.seed}: {r.status}, {metric}={r.metrics.get(metric, 'n/a')}")
    print(f"wrote {csv_path} and {png_path}")
    return 0 if all(r.status in ("done", "skipped") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=_parse_flags))
