"""Export a workdir as a PyTorch deployment folder (diffusers / transformers / safetensors; no pickle).

    python -m launch.export_torch --workdir=/tmp/policy --out=/tmp/defi_torch
    python -m launch.export_torch --workdir=gs://bucket/policy --step=50000 --ema --out=/ckpt/defi_torch --dtype=bfloat16
    python -m launch.export_torch --workdir=/tmp/gfdm --out=/tmp/gfdm_torch          # a GFDM (or GIDM) workdir alone
    python -m launch.export_torch --workdir=/tmp/policy --out=/tmp/defi_torch --lerobot   # + OUT/lerobot/ for LeRobot

A policy folder loads with ``defi_jax_torch.DeFIPolicyTorch.from_pretrained(OUT)``; its README says what is
inside. The folder is written under a temporary name, loaded back strictly, then renamed into place (a ``gs://``
``--out`` is staged locally, loaded back, then uploaded with ``config.json`` last).
``--lerobot`` adds ``OUT/lerobot/``, a LeRobot saved-policy folder (``defi_jax_torch.lerobot`` is its plugin).
"""

import sys

from absl import app, flags

from defi_jax import config_validation

_WORKDIR = flags.DEFINE_string("workdir", None, "A policy, GFDM or GIDM workdir (local or gs://).")
_OUT = flags.DEFINE_string("out", None, "The folder to write, local or gs:// (replaced when "
                            "complete; a gs:// one is staged locally, verified, then uploaded).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_boolean("ema", False, "Export the EMA parameters.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight dtype of the written files.")
_LEROBOT = flags.DEFINE_boolean("lerobot", False, "A policy workdir: also write OUT/lerobot/, the LeRobot "
                                "saved-policy folder (type 'defi'; every weight a second time).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    from defi_jax import export_torch

    print(f"launch.export_torch: {_WORKDIR.value} (step {_STEP.value or 'latest'}{', EMA' if _EMA.value else ''}) "
          f"-> {_OUT.value}", flush=True)
    meta = export_torch.export(_WORKDIR.value, _OUT.value, step=_STEP.value, ema=_EMA.value, dtype=_DTYPE.value,
                               lerobot=_LEROBOT.value)
    print(f"launch.export_torch: {meta['stage']} -> {_OUT.value} ({', '.join(meta['parts'])}; {meta['dtype']})")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
