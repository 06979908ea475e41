"""Parameter counts and per-device memory of a config, without allocating the model.

    python -m launch.describe --config=configs/toy.py:small
    python -m launch.describe --config=configs/gfdm.py:svd --num_devices=8 --compile

Prints each top-level sub-module's parameter count as ``name: count`` and ``total: N``, then the bytes one
device holds of the sharded train state (params + optimizer state + EMA) for the configured mesh. With
``--compile`` the full train step is compiled (not run) and XLA's per-device memory analysis is printed.
``--num_devices=N`` fakes N CPU devices, e.g. to check an 8-way layout on a laptop. Only shapes are
needed: no ``config.init`` weight file is opened (sources may point at folders this machine lacks).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/toy.py:tiny.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Fake this many CPU devices (sets XLA_FLAGS).")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile the train step and print its memory analysis.")
flags.mark_flags_as_required(["config"])


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv):
    del argv
    if _NUM_DEVICES.value:
        # Must happen before the backend starts (the first jax.devices() call).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if _NUM_DEVICES.value:
        jax.config.update("jax_platforms", "cpu")
    import defi_jax  # noqa: F401
    from defi_jax import sharding, trainer

    config = _CONFIG.value
    for name, count in trainer.param_counts(config).items():
        print(f"{name}: {count}")
    mesh = sharding.make_mesh(config.mesh)
    print("mesh: " + " ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.devices.size} devices)")
    for name, n in trainer.state_bytes_per_device(config, mesh=mesh).items():
        print(f"state_bytes_per_device.{name}: {n} ({_gib(n)})")
    if _COMPILE.value:
        _, stats = trainer.compile_train_step(config, mesh=mesh)
        for name, n in stats.items():
            print(f"compiled_bytes_per_device.{name}: {n} ({_gib(n)})")


if __name__ == "__main__":
    from defi_jax import config_validation
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
