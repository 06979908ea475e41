"""The paper's ablations in miniature: train, evaluate in Meta-World and tabulate every variant (``defi_jax/ablate.py``).

    python -m launch.ablate --suite=metaworld --tasks=demo --seeds=2 --episodes=10 \\
        --workdir=workdirs/ablate
    python -m launch.ablate --variants=defi,no_gidm_pretrain --steps=100 --workdir=/tmp/ablate
    python -m launch.ablate --variants=defi,no_gidm_pretrain,no_gfdm_pretrain --data_fraction=0.25 \\
        --pretrained=workdirs/demo --episodes=20 --workdir=workdirs/ablate_lowdata   # a quarter of each task's labels
    python -m launch.ablate --set=model.head.cross_attention=full --steps=100 --workdir=/tmp/ablate_full_attention
    python -m launch.ablate --variants=defi,no_gidm_pretrain,no_gfdm_pretrain --pretrained=workdirs/demo \
        --features=4096 --steps=800 --set=train.batch_size=64 --episodes=50 --workdir=workdirs/ablate_cached
        # each variant's GFDM features of 4,096 windows computed once, its policy trained on them, centred
        # (BENCHMARKS.md's 800 x 64 recipe)
    python -m launch.ablate --workdir=/tmp/ablate --dry_run       # every config built + one train step each

Variants (``configs/policy.py:demo`` + overrides): defi, no_gidm_pretrain (policy.gidm_init=random),
no_gfdm_pretrain (policy.gfdm_init=initial), no_human_video (GIDM and GFDM pretrained with
data.human_video_fraction=0), adapter_only, all_train (policy.finetune), gfdm_5_steps (model.gfdm_steps=5),
continuous_latent (model.latent_action=continuous). The GIDM / GFDM pretraining runs once under
``WORKDIR/pretrain`` and is shared by every variant and seed that uses it; each variant x seed fine-tunes in
``WORKDIR/<variant>/seed=<seed>`` (one ``launch.train`` process each) and is evaluated closed-loop with the same
protocol into its ``eval_metaworld/``. Tables 4, 8 and 9 (per task: success, episodes, 95% interval; mean over
seeds; the paper's number) go to ``WORKDIR/ablation.md`` and ``ablation.csv`` and are printed. Each
``--set=KEY=VALUE`` (repeatable) sets ``config.KEY`` of every fine-tuning (not of the pretraining), after the
variant's own keys and --steps / --data_fraction; a key that a chosen variant sets itself is refused. Rerunning the
command skips finished trainings and evaluations and resumes a stopped training from its checkpoints; a finished
training is refused when the rerun's flags (--set included) would give it another command: use another --workdir.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shlex  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

_SUITE = flags.DEFINE_enum("suite", "metaworld", ["metaworld"], "Simulation benchmark.")
_TASKS = flags.DEFINE_string("tasks", "demo", "demo (the demo data's robot tasks) | comma-separated Meta-World "
                             "v3 task names (tasks of the demo data: the policies train on it).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Fine-tuning seeds per variant: 0..N-1.", lower_bound=1)
_EPISODES = flags.DEFINE_integer("episodes", 10, "Evaluation episodes per task, variant and seed.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Fine-tuning steps (default: configs/policy.py:demo's).", lower_bound=1)
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", None, "GIDM / GFDM pretraining steps (default: --steps "
                                       "when given, else each tiny config's own).", lower_bound=1)
_DATA_FRACTION = flags.DEFINE_float("data_fraction", None, "Fraction of the labelled robot episodes each fine-tuning "
                                    "keeps (data.data_fraction: evenly spaced, every task keeps its share; "
                                    "pretraining keeps all): the low-data regime.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE: sets config.KEY of every variant's fine-tuning (not the "
                                  "GIDM / GFDM pretraining), e.g. --set=model.head.cross_attention=full; repeatable. "
                                  "A key that a chosen variant or the plan (seed, init.sources.*) sets is refused.")
_VARIANTS = flags.DEFINE_string("variants", None, "Comma-separated variants (default: all).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Ablation folder (local).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Folder with finished gidm / gfdm workdirs (make demo's "
                                  "workdirs/demo), reused as the standard pretraining instead of training them.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Demo data folder (default: $DEFI_JAX_DEMO_DIR or ~/.cache).")
_HORIZON = flags.DEFINE_integer("horizon", 200, "Env steps per episode at most.", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 2, "Env worker processes (part of the protocol).", lower_bound=1)
_FEATURES = flags.DEFINE_integer("features", None, "Train every variant on its GFDM's features of this many windows, "
                                  "computed once into WORKDIR/<variant>/features (launch.precompute_features; 512 "
                                  "held-out windows), centred (model.center_features); all_train is refused.",
                                  lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build and validate every config and run one train step of each "
                             "(in this process, random initial weights); no training runs, no evaluation.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)

    from data_pipelines import demo
    from defi_jax import ablate, config_validation
    from defi_jax.evaluation import metaworld

    if "://" in _WORKDIR.value:
        print("launch.ablate: --workdir must be local (the tables and evaluations are written there)", file=sys.stderr)
        return 2
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        variants = ablate.parse_variants(_VARIANTS.value)
        tasks = metaworld.task_list(_TASKS.value)
        data_dir = os.path.abspath(_DATA_DIR.value) if _DATA_DIR.value else demo.default_root()
        plan = ablate.plan(workdir, variants, range(_SEEDS.value), data_dir=data_dir, steps=_STEPS.value,
                           pretrain_steps=_PRETRAIN_STEPS.value or _STEPS.value,
                           pretrained=os.path.abspath(_PRETRAINED.value) if _PRETRAINED.value else None,
                           data_fraction=_DATA_FRACTION.value, overrides=ablate.parse_overrides(_SET.value),
                           features=_FEATURES.value)
    except (ValueError, config_validation.ConfigError) as e:
        print(f"launch.ablate: {e}", file=sys.stderr)
        return 2
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"launch.ablate: {len(variants)} variant(s) x {_SEEDS.value} seed(s) -> {workdir}")
    demo.ensure_demo_data(data_dir)
    if _DRY_RUN.value:
        ablate.dry_run(plan, log=say)
        return 0

    if not ablate.train(plan, log=say):
        say("launch.ablate: stopped; rerun the same command to resume")
        return 1
    protocol = metaworld.Protocol(tasks=tasks, episodes=_EPISODES.value, horizon=_HORIZON.value,
                                  workers=_WORKERS.value, videos_per_task=1)
    results = ablate.evaluate(plan, protocol, log=say)
    command = "python -m launch.ablate " + shlex.join(sys.argv[1:])
    markdown, table_csv = ablate.render(results, tasks, protocol=ablate.protocol_fields(protocol), command=command)
    md_path, csv_path = ablate.write_tables(workdir, markdown, table_csv)
    print(markdown)
    say(f"wrote {md_path} and {csv_path}")
    unfinished = [f"{name} seed={seed}: {run.status}" for (name, seed), run in plan.runs.items()
                  if run.status not in ("done", "skipped")]
    for u in unfinished:
        say(f"not evaluated: {u}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
