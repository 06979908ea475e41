"""Make the embedded demo data: Meta-World scripted-expert episodes as a real TFDS RLDS dataset (two cameras,
actions, one instruction per task) + action-free videos of other tasks in the Something-Something-v2 layout.

  MUJOCO_GL=egl python -m launch.make_demo_data --out /tmp/demo --tasks reach-v3 push-v3 --episodes 4 --size 128

DAgger: ``--relabelled DIR ...`` adds the policy episodes of ``launch.evaluate --relabel_out=DIR`` (each visited
state labelled with the scripted expert's action) to the robot dataset. Collect them on seeds the evaluation does
not use (``launch.evaluate``'s default is --seed=0), or the evaluation scores the episodes the policy trained on:

  python -m launch.evaluate --checkpoint=workdirs/demo/policy --tasks=demo --episodes=25 --seed=1 \\
      --noexpert --videos_per_task=0 --relabel_out=/tmp/dagger1
  python -m launch.make_demo_data --out /tmp/demo_dagger1 --relabelled /tmp/dagger1
  python -m launch.train --config=configs/policy.py:demo --workdir=/tmp/policy_dagger1 \\
      --config.data.data_dir=/tmp/demo_dagger1

DART: ``--expert_noise 0.3`` records the robot episodes with Gaussian noise added to the executed hand motion while
keeping the expert's clean action as the label, so the data shows how the expert recovers from states off its own
path. (A saturated expert may override the noise: door-close's hand stays within a few cm of its clean path even
at 1.0; BENCHMARKS.md, "Why door-close decides the ablation".)

Deterministic for --seed (and --expert_noise). Reads back with ``data.mixture="demo"`` and ``data.data_dir=<out>``.
"""

import argparse
import logging
import os


def main(argv=None):
    from data_pipelines import demo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", nargs="+", default=list(demo.ROBOT_TASKS), help="Meta-World v3 tasks (robot RLDS)")
    p.add_argument("--human_tasks", nargs="+", default=list(demo.HUMAN_TASKS),
                   help="tasks rendered as action-free SSv2-layout videos (must differ from --tasks)")
    p.add_argument("--episodes", type=int, default=demo.EPISODES, help="episodes per robot task")
    p.add_argument("--human_episodes", type=int, default=None, help="videos per human task (default: the demo's)")
    p.add_argument("--size", type=int, default=128, help="rendered frame size (square)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=200)
    p.add_argument("--relabelled", nargs="*", default=[],
                   help="launch.evaluate --relabel_out folders (DAgger): their policy episodes, labelled with the "
                        "scripted expert's actions, join the robot dataset")
    p.add_argument("--expert_noise", type=float, default=0.0,
                   help="DART: std of Gaussian noise added to the executed x, y, z actions of the robot episodes "
                        "(labels stay the expert's clean actions); 0 = none")
    a = p.parse_args(argv)
    if a.expert_noise < 0:
        p.exit(2, f"launch.make_demo_data: --expert_noise={a.expert_noise}: a standard deviation, >= 0\n")
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = os.path.abspath(a.out)
    from defi_jax.evaluation import metaworld
    for folder in a.relabelled:
        try:
            metaworld.relabelled_index(folder, a.size)
        except (FileNotFoundError, ValueError) as e:
            p.exit(2, f"launch.make_demo_data: --relabelled: {e}\n")
    demo.make_demo_data(out, tasks=tuple(a.tasks), human_tasks=tuple(a.human_tasks), episodes=a.episodes,
                        human_episodes=demo.HUMAN_EPISODES if a.human_episodes is None else a.human_episodes,
                        size=a.size, seed=a.seed, max_steps=a.max_steps, relabelled=tuple(a.relabelled),
                        expert_noise=a.expert_noise)
    print(out)


if __name__ == "__main__":
    main()
