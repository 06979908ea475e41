"""Convert an RLDS (TFDS TFRecord) dataset to the ArrayRecord layout training reads, once.

  python -m launch.convert_rlds --dataset bridge --src /data/bridge/0.1.0 [--out /data/bridge]

Writes ``<out>/arrayrecord/{train,eval}-*.array_record``, ``*_index.json``, ``*_actions.npy`` and
``action_stats.json`` (mean, std, q01, q99 of the standardized 7-D actions). ``--out`` defaults to ``--src``'s
dataset folder.
"""

import argparse
import json
import logging
import os


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name of the standardization table (e.g. bridge)")
    p.add_argument("--src", required=True, help="TFDS folder (the dataset folder or its version folder; gs:// ok)")
    p.add_argument("--out", default=None, help="dataset folder to write arrayrecord/ into (default: --src)")
    p.add_argument("--max_failure_fraction", type=float, default=0.1)
    p.add_argument("--max_episodes", type=int, default=None, help="convert only the first N per split")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from data_pipelines import convert

    out = a.out
    if out is None:
        out = a.src.rstrip("/")
        if os.path.exists(os.path.join(out, "dataset_info.json")):  # a version folder: write beside it
            out = os.path.dirname(out)
    summary = convert.convert(a.dataset, a.src, out, max_failure_fraction=a.max_failure_fraction,
                              max_episodes=a.max_episodes)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"} | {"skipped": len(summary["failures"])}))


if __name__ == "__main__":
    main()
