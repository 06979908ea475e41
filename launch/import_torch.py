"""Import PyTorch weights (the reference DeFI's checkpoints, diffusers SVD, our own exports) into a workdir.

    python -m launch.import_torch policy --src=saved_models/last.pt --workdir=/ckpt/defi_policy \\
        --svd_path=/ckpt/svd/checkpoint-100000 --config.init.tokenizer_path=/ckpt/clip-vit-base-patch32 \\
        --config.model.gidm.tokenizer_path=/ckpt/t5_base
    python -m launch.import_torch policy --src=last.pt --workdir=/tmp/policy --gfdm_workdir=/ckpt/gfdm
    python -m launch.import_torch gfdm --src=/ckpt/stable-video-diffusion-img2vid --workdir=/ckpt/gfdm \\
        --config=configs/gfdm.py:svd --config.init.clip_path=/ckpt/clip-vit-base-patch32
    python -m launch.import_torch gidm --src=stage2/last.ckpt --workdir=/ckpt/gidm
    python -m launch.import_torch export --src=/tmp/defi_torch --workdir=/ckpt/policy_again

Every kind writes a workdir at step 0 (``config.json``, ``checkpoints/0``, ``assets/``) that ``launch.train`` with
the printed command continues; the workdir must hold no checkpoint. ``checkpoints/0`` holds the weights only (no
optimizer moments: host memory holds the weights once); training starts from them with a fresh optimizer state
(and the EMA at the weights).

policy   the reference's stage-3 checkpoint (``saved_models/{step}.pt`` or ``last.pt``: ``{"model": state_dict,
         "args": ...}``, read with ``torch.load(weights_only=True)``; or a ``.safetensors`` of the state dict).
         Sizes are read off the tensors on top of ``--config`` (default ``configs/policy.py:defi``), which gives
         what weights cannot tell (attention heads, dropout, the GFDM); every tensor is mapped or reported.
         The GFDM is not in that file: ``--gfdm_workdir`` (a defi-jax GFDM workdir) or ``--svd_path`` (the
         reference's fine-tuned SVD folder, ``unet/`` + ``vae/``; the GFDM's CLIP text tower then comes from the
         file). The workdir gets ``config.json``, ``checkpoints/0`` and ``assets/action_stats.json`` (raw
         actions), so that ``DeFIPolicy.from_checkpoint(WORKDIR)`` serves it.
gfdm     a diffusers SVD folder (``unet/``, ``vae/``; the CLIP text tower from ``text_encoder/`` when present,
         else ``config.init.clip_path`` / ``config.init.sources.text_encoder.path``); the networks' sizes are
         read off the folders' ``config.json`` on top of ``--config`` (default ``configs/gfdm.py:svd``).
gidm     the reference's stage-2 checkpoint (Lightning ``.ckpt`` / ``.pt`` read with ``weights_only=True``, or
         ``.safetensors``): sizes read off the tensors on top of ``--config`` (default ``configs/gidm.py:defi``,
         which gives the heads and the DINOv2 / T5 sizes); the file's DINOv2 / T5 towers are used when it has
         them, else ``config.init.sources.dinov2`` / ``t5``.
export   a folder of ``launch.export_torch`` (its ``config.json`` names the stage): a policy, GFDM or GIDM
         workdir again; bitwise in float32 (a bfloat16 export is imported with a note that it is not bitwise).
         ``--config`` defaults to the stage's full-size config; a GFDM export's ``config.json`` records the run's
         ``config.model``, which is used as it is (an older export without it holds only the networks' sizes:
         then pass the config of the run it came from, for the frames and text tokens).
Without ``--config`` the gfdm / gidm / export kinds use the stage's default above (``DEFAULTS``); ``--config.*``
overrides need ``--config`` (they would otherwise apply to the policy config, the flag's default).
"""

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "policy.py") + ":defi",
                                          "Config the file's sizes go on top of (default: the stage's full-size "
                                          "config, see DEFAULTS).")
_SRC = flags.DEFINE_string("src", None, "What to import: a checkpoint file (.pt / .ckpt / .safetensors) or a folder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to write (local or gs://; must hold no checkpoint).")
_GFDM_WORKDIR = flags.DEFINE_string("gfdm_workdir", "", "A defi-jax GFDM workdir (the policy's frozen GFDM).")
_SVD_PATH = flags.DEFINE_string("svd_path", "", "A diffusers SVD folder (unet/, vae/): the reference's GFDM.")
flags.mark_flags_as_required(["src", "workdir"])
KINDS = ("policy", "gfdm", "gidm", "export")
DEFAULTS = {"policy": "policy.py:defi", "gfdm": "gfdm.py:svd", "gidm": "gidm.py:defi"}


def _overrides(config, base) -> list[str]:
    """``--config.k=v`` for every leaf (outside ``init``) where ``config`` differs from ``base``: the fine-tune
    command line. Keys ``base`` lacks cannot be set by flags; they are named instead."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = tuple(v) if isinstance(v, list) else v   # JSON's lists: the config files' tuples
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


def _base_config(stage: str):
    """``--config`` when given, else the stage's default (``DEFAULTS``); and the spec to print."""
    if flags.FLAGS["config"].present or stage == "policy":
        return _CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"])
    if any(flags.FLAGS[name].present for name in flags.FLAGS if name.startswith("config.")):
        raise ValueError(f"--config.* overrides without --config: name the {stage} config they apply to "
                         f"(e.g. --config=configs/{DEFAULTS[stage]})")
    import importlib
    name, variant = DEFAULTS[stage].split(":")
    module = importlib.import_module(f"configs.{name.removesuffix('.py')}")
    return module.get_config(variant), os.path.join(_ROOT, "configs", DEFAULTS[stage])


def main(argv):
    if len(argv) != 2 or argv[1] not in KINDS:
        print(f"python -m launch.import_torch: name what to import, one of {KINDS} (got {argv[1:]})", file=sys.stderr)
        return 2
    import logging
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every file it writes at INFO
    from defi_jax import paths
    from defi_jax.interop import defi_policy, import_stages

    kind = argv[1]
    src, workdir = paths.abspath(_SRC.value), paths.abspath(_WORKDIR.value)
    print(f"launch.import_torch: {kind} {src} -> {workdir}", flush=True)
    note = ""
    try:
        if (_GFDM_WORKDIR.value or _SVD_PATH.value) and kind != "policy":
            raise ValueError("--gfdm_workdir / --svd_path are for the policy import only")
        stage = import_stages.export_stage(src) if kind == "export" else kind
        base, spec = _base_config(stage)
        config = base.copy_and_resolve_references()
        if kind == "policy":
            config = defi_policy.import_policy_workdir(src, workdir, config, gfdm_workdir=_GFDM_WORKDIR.value,
                                                       svd_path=_SVD_PATH.value)
        elif kind == "gfdm":
            config = import_stages.import_gfdm(src, workdir, config)
        elif kind == "gidm":
            config = import_stages.import_gidm(src, workdir, config)
        else:
            config, note = import_stages.import_export(src, workdir, config)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"python -m launch.import_torch: {e}", file=sys.stderr)
        return 1
    if note:
        print(f"launch.import_torch: note: {note}", file=sys.stderr)
    print(f"launch.import_torch: wrote {paths.join(workdir, 'checkpoints', '0')}; fine-tune with:\n"
          f"  python -m launch.train --config={spec} --workdir={workdir} " + " ".join(_overrides(config, base)),
          flush=True)
    return 0


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
