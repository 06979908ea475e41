"""GFDM video-prediction quality on held-out clips: PSNR / SSIM of 1-step vs multi-step predictions.

    python -m launch.gfdm_quality --workdir=workdirs/gfdm --out=/tmp/gfdm_quality [--data_dir=DIR] [--clips=8]
        [--steps=1,5] [--step=N] [--ema] [--lpips_weights=PATH] [--i3d_weights=PATH]

Writes gfdm_quality.json / .csv / .gif under --out (see ``defi_jax/evaluation/gfdm_quality.py``). LPIPS and FVD
are reported as unavailable (no network of theirs is loaded or downloaded), never estimated.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "GFDM workdir (local or gs://).", required=True)
_OUT = flags.DEFINE_string("out", None, "Folder for gfdm_quality.json / .csv / .gif.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder instead of the checkpoint config's data.data_dir.")
_CLIPS = flags.DEFINE_integer("clips", 8, "Held-out clips scored (the eval split's first N).", lower_bound=1)
_STEPS = flags.DEFINE_list("steps", ["1", "5"], "Denoising step counts compared.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_bool("ema", False, "Score the EMA parameters.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling noise seed (the same noise for every step count).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per compiled call.", lower_bound=1)
_LPIPS = flags.DEFINE_string("lpips_weights", None, "LPIPS network weights (local path).")
_I3D = flags.DEFINE_string("i3d_weights", None, "I3D network weights for FVD (local path).")


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)
    from defi_jax.evaluation import gfdm_quality

    try:
        steps = [int(s) for s in _STEPS.value]
        report = gfdm_quality.run(paths.abspath(_WORKDIR.value), out_dir=paths.abspath(_OUT.value),
                                  clips=_CLIPS.value, steps=steps, data_dir=_DATA_DIR.value, step=_STEP.value,
                                  ema=_EMA.value, seed=_SEED.value, batch_size=_BATCH.value,
                                  lpips_weights=_LPIPS.value, i3d_weights=_I3D.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"launch.gfdm_quality: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"metrics": report["metrics"], "lpips": report["lpips"], "fvd": report["fvd"],
                      "clips": report["protocol"]["clips"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
