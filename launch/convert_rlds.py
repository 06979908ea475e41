"""Convert an RLDS (TFDS TFRecord) dataset to the ArrayRecord layout training reads, once.

  python -m launch.convert_rlds --dataset bridge --src /data/bridge/0.1.0 [--out /data/bridge]

Writes ``<out>/arrayrecord/{train,eval}-*.array_record``, ``*_index.json``, ``*_actions.npy`` and
``action_stats.json`` (mean, std, q01, q99 of the standardized 7-D actions). ``--out`` defaults to ``--src``'s
dataset folder. The conversion is written to a temporary folder and renamed into place when complete: when it
fails (more than --max_failure_fraction of a split unusable) a previous conversion stays as it was.
"""

import argparse
import json
import logging
import os


def _abs(path: str | None) -> str | None:
    """Local paths absolute (what the error messages and the index name); gs:// paths as given."""
    return path if path is None or path.startswith("gs://") else os.path.abspath(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset name of the standardization table (e.g. bridge)")
    p.add_argument("--src", required=True, help="TFDS folder (the dataset folder or its version folder; gs:// ok)")
    p.add_argument("--out", default=None, help="dataset folder to write arrayrecord/ into (default: --src)")
    p.add_argument("--max_failure_fraction", type=float, default=0.1)
    p.add_argument("--max_episodes", type=int, default=None, help="convert only the first N per split")
    a = p.parse_args(argv)
    src, out = _abs(a.src), _abs(a.out)
    if not src.startswith("gs://") and not os.path.isdir(src):
        raise SystemExit(f"convert_rlds: --src={src} does not exist (a TFDS dataset folder holding "
                         f"<version>/dataset_info.json, or that version folder)")
    if out is not None and out.startswith("gs://"):
        raise SystemExit(f"convert_rlds: --out={out}: write the conversion to a local folder, then copy it")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from data_pipelines import convert

    if out is None:
        if src.startswith("gs://"):
            raise SystemExit("convert_rlds: --src is a gs:// path: give a local --out")
        out = src.rstrip("/")
        if os.path.exists(os.path.join(out, "dataset_info.json")):  # a version folder: write beside it
            out = os.path.dirname(out)
    try:
        summary = convert.convert(a.dataset, src, out, max_failure_fraction=a.max_failure_fraction,
                                  max_episodes=a.max_episodes)
    except (FileNotFoundError, ValueError, convert.TooManyFailures) as e:
        raise SystemExit(f"convert_rlds: {e}") from None
    skipped = sum(s["skipped"] for s in summary["splits"].values())
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"} | {"skipped": skipped}))


if __name__ == "__main__":
    main()
