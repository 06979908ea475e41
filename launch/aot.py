"""Compile a config's train step ahead of time for a TPU topology (or N fake CPU devices); run nothing.

    python -m launch.aot --config=configs/gfdm.py:svd --topology=v5p-128
    python -m launch.aot --config=configs/gidm.py:defi --topology=v6e-64 --step_time=0.8 --json=/tmp/aot.json
    python -m launch.aot --config=configs/toy.py:tiny --topology=v5p:2x2x2 --config.mesh.shape='(1,4,2)'
    python -m launch.aot --config=configs/toy.py:tiny --fake_devices=8
    python -m launch.aot --config=configs/gfdm.py:svd --topology=v5p-16 --per_block
    python -m launch.aot --config=configs/gidm.py:defi --topology=v5p-2 --max_batch --config.train.batch_size=64

``--topology`` runs the real TPU compiler on this machine (needs ``pip install -e '.[tpu]'``, i.e. libtpu;
no TPU attached): names like ``v5p-128`` / ``v4-32`` count TensorCores (two per chip), ``v5e-256`` /
``v6e-64`` count chips, ``v5p:4x4x4`` gives the chip grid (the mapping is in ``defi_jax/aot.py``).
``config.mesh.dcn_shape`` with more than one slice compiles for that many slices of the topology.
Prints per-device memory (arguments, temporaries, peak vs the chip's HBM), FLOPs per step, the ideal step
time at 100% and 50% MFU (or the MFU at ``--step_time``) and the collectives in the compiled program.
``--fake_devices=N`` compiles for N CPU devices instead: memory is then XLA:CPU's, not a TPU's.
The TPU compiler needs several GiB of host RAM for full-size models; ``--per_block`` (GFDM with
``model.remat``) compiles the step with its UNet res-blocks / transformers stood in plus each distinct block
on its own, and composes the peak (the stood-in step's + the largest block's temporaries) and the FLOPs.
``--max_batch`` then compiles other batch sizes until it has the largest one whose peak leaves ``--headroom``
(default 20%) of the chip's HBM free and the next one that does not (at most four more compiles).
"""

import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from defi_jax import config_validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/toy.py:tiny.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology: v5p-128, v4-32, v5e-256, v6e-64 or v5p:2x2x2.")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", None, "Compile for this many fake CPU devices instead.")
_STEP_TIME = flags.DEFINE_float("step_time", None, "Measured or assumed seconds per step: reports the MFU.")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
_PER_BLOCK = flags.DEFINE_bool("per_block", False, "Compose the GFDM step from per-block compiles (the step with its "
                               "UNet remat units stood in, plus each distinct unit): for models the compiler cannot "
                               "take whole on this host.")
_COMPARE_WHOLE = flags.DEFINE_bool("compare_whole", False, "With --per_block: also compile the whole step and report "
                                   "the composition's relative error (mid-size configs).")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False, "With --topology: also search the largest batch whose peak leaves "
                                "--headroom of the chip's HBM free (a few more compiles; with --per_block each "
                                "probe compiles the stood-in step and the largest unit only).")
_HEADROOM = flags.DEFINE_float("headroom", 0.2, "With --max_batch: the fraction of HBM to keep free.")
flags.mark_flags_as_required(["config"])
flags.mark_flags_as_mutual_exclusive(["topology", "fake_devices"], required=True)


def _prepare_environment():
    """Before jax is imported: compile only, never claim an attached accelerator."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if _FAKE_DEVICES.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_FAKE_DEVICES.value}").strip()
    else:
        # libtpu describes the machine it loads on before it describes the topology asked for; on a machine
        # without a TPU these keep it from probing the GCE metadata server and from taking the lock file
        # that guards real chips (a compile-only client touches none).
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                           ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                           ("TPU_WORKER_ID", "0")):
            os.environ.setdefault(key, value)


def main(argv):
    del argv
    _prepare_environment()
    import jax
    jax.config.update("jax_platforms", "cpu")
    import defi_jax  # noqa: F401  (flax settings)
    from defi_jax import aot

    config = _CONFIG.value
    if _TOPOLOGY.value:
        num_slices = math.prod(config.mesh.get("dcn_shape", None) or (1,))
        try:
            topology = aot.parse_topology(_TOPOLOGY.value, num_slices=num_slices)
            devices, chip = aot.topology_devices(topology), topology.chip
        except (ValueError, RuntimeError) as e:  # a bad name, or libtpu missing: one line, no traceback
            sys.exit(f"launch.aot: {e}")
        print(f"topology: {topology.name} = {topology.topology_name}" +
              (f" x {num_slices} slices" if num_slices > 1 else ""))
    else:
        devices, chip = jax.devices("cpu"), None
        if len(devices) != _FAKE_DEVICES.value:
            raise app.UsageError(f"--fake_devices={_FAKE_DEVICES.value}: jax started with {len(devices)} CPU "
                                 f"devices (XLA_FLAGS was set elsewhere?)")
    if _COMPARE_WHOLE.value and not _PER_BLOCK.value:
        raise app.UsageError("--compare_whole checks --per_block: give both")
    if _MAX_BATCH.value and not _TOPOLOGY.value:
        raise app.UsageError("--max_batch compares with a TPU chip's HBM: give --topology")
    if not 0 <= _HEADROOM.value < 1:
        raise app.UsageError(f"--headroom={_HEADROOM.value}: a fraction of HBM in [0, 1)")
    try:
        if _PER_BLOCK.value:
            report = aot.per_block_report(config, devices, chip=chip, step_time=_STEP_TIME.value,
                                          compare_whole=_COMPARE_WHOLE.value,
                                          log=lambda line: print(line, flush=True))
        else:
            report = aot.compile_report(config, devices, chip=chip, step_time=_STEP_TIME.value)
    except ValueError as e:  # a config --per_block cannot compose: one line naming the key
        sys.exit(f"launch.aot: {e}")
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler checks the step against the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        sys.exit(f"launch.aot: DOES NOT FIT at config.train.batch_size={config.train.batch_size} on "
                 f"{_TOPOLOGY.value or 'these devices'}: the compiler says {str(e).strip().splitlines()[0]} "
                 f"(a smaller batch, more chips, or model.remat)")
    if _TOPOLOGY.value:
        report |= {"topology": topology.name, "topology_name": topology.topology_name, "num_slices": num_slices}
    print(aot.format_report(report), flush=True)
    if _MAX_BATCH.value:
        try:
            report["max_batch"] = aot.max_batch_report(config, devices, report, chip=chip, headroom=_HEADROOM.value,
                                                       log=lambda line: print(line, flush=True))
        except ValueError as e:  # a probed batch the config rejects (e.g. more than its data holds)
            sys.exit(f"launch.aot: --max_batch: {e}")
        print(aot.format_max_batch(report["max_batch"]))
    if _JSON.value:
        from defi_jax import paths
        paths.write_text(_JSON.value, json.dumps(report, indent=2))  # atomic; local or gs://
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
