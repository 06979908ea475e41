"""Import a reference DeFI PyTorch checkpoint into a defi-jax workdir.

    python -m launch.import_torch policy --src=saved_models/last.pt --workdir=/ckpt/defi_policy \\
        --svd_path=/ckpt/svd/checkpoint-100000 --config.init.tokenizer_path=/ckpt/clip-vit-base-patch32 \\
        --config.model.gidm.tokenizer_path=/ckpt/t5_base
    python -m launch.import_torch policy --src=last.pt --workdir=/tmp/policy --gfdm_workdir=/ckpt/gfdm

policy   the reference's stage-3 checkpoint (``saved_models/{step}.pt`` or ``last.pt``: ``{"model": state_dict,
         "args": ...}``, read with ``torch.load(weights_only=True)``; or a ``.safetensors`` of the state dict).
         Sizes are read off the tensors on top of ``--config`` (default ``configs/policy.py:defi``), which gives
         what weights cannot tell (attention heads, dropout, the GFDM); every tensor is mapped or reported.
         The GFDM is not in that file: ``--gfdm_workdir`` (a defi-jax GFDM workdir) or ``--svd_path`` (the
         reference's fine-tuned SVD folder, ``unet/`` + ``vae/``; the GFDM's CLIP text tower then comes from the
         file). The workdir gets ``config.json``, ``checkpoints/0`` and ``assets/action_stats.json`` (raw
         actions), so that ``DeFIPolicy.from_checkpoint(WORKDIR)`` serves it and ``launch.train`` with the same
         ``--config`` and overrides, printed at the end, fine-tunes it from step 0.
"""

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "policy.py") + ":defi",
                                          "Policy config the file's sizes go on top of.")
_SRC = flags.DEFINE_string("src", None, "The reference checkpoint (.pt / .pth / .safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to write (local or gs://; must hold no checkpoint).")
_GFDM_WORKDIR = flags.DEFINE_string("gfdm_workdir", "", "A defi-jax GFDM workdir (the policy's frozen GFDM).")
_SVD_PATH = flags.DEFINE_string("svd_path", "", "A diffusers SVD folder (unet/, vae/): the reference's GFDM.")
flags.mark_flags_as_required(["src", "workdir"])
KINDS = ("policy",)


def _overrides(config, base) -> list[str]:
    """``--config.k=v`` for every leaf (outside ``init``) where ``config`` differs from ``base``: the fine-tune
    command line. Keys ``base`` lacks cannot be set by flags; they are named instead."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
        return out

    new, old = flat(config.to_dict()), flat(base.to_dict())
    out = []
    for key, value in sorted(new.items()):
        if key.startswith("init.") or old.get(key, object()) == value:
            continue
        if key not in old:
            print(f"launch.import_torch: config.{key}={value!r} has no flag in the base config", file=sys.stderr)
            continue
        out.append(shlex.quote(f"--config.{key}={value if isinstance(value, str) else repr(value)}"))
    return out


def main(argv):
    if len(argv) != 2 or argv[1] not in KINDS:
        print(f"python -m launch.import_torch: name what to import, one of {KINDS} (got {argv[1:]})", file=sys.stderr)
        return 2
    import logging
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every file it writes at INFO
    from defi_jax import paths
    from defi_jax.interop import defi_policy

    src, workdir = os.path.abspath(_SRC.value), paths.abspath(_WORKDIR.value)
    print(f"launch.import_torch: {argv[1]} {src} -> {workdir}", flush=True)
    base = _CONFIG.value
    try:
        config = defi_policy.import_policy_workdir(src, workdir, base.copy_and_resolve_references(),
                                                   gfdm_workdir=_GFDM_WORKDIR.value, svd_path=_SVD_PATH.value)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"python -m launch.import_torch: {e}", file=sys.stderr)
        return 1
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"launch.import_torch: wrote {paths.join(workdir, 'checkpoints', '0')}; fine-tune with:\n"
          f"  python -m launch.train --config={spec} --workdir={workdir} " + " ".join(_overrides(config, base)),
          flush=True)
    return 0


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
