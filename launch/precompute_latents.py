"""VAE-encode GFDM training clips once, into ArrayRecord shards the GFDM stage reads (released recipe).

    python -m launch.precompute_latents --config=configs/gfdm.py:tiny --out=/tmp/gfdm_latents
    python -m launch.train --config=configs/gfdm.py:tiny --workdir=/tmp/gfdm \\
        --config.data.source=latents --config.data.latents_dir=/tmp/gfdm_latents

Each JAX process reads its own disjoint slice of the ``gfdm_clip`` stream (``config.data``), encodes it on
its local devices (batch split over them) and writes ``<split>-PPPPP-of-NNNNN.array_record``; see
``defi_jax.gfdm.latents`` for the record format. The VAE is ``config.init.svd_path``'s (the same
weights the GFDM trains with); without it, the randomly initialised VAE of ``build_model(config,
Rngs(config.seed))``, which matches the trainer's for the same config (tests, demos).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow (RLDS readers)

import sys  # noqa: E402
import time  # noqa: E402

# The resource tracker's "leaked shared_memory objects" exit notice about grain workers' in-flight batches means
# nothing (they are freed); see launch/train.py.
sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from defi_jax import config_validation, paths  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "GFDM config, e.g. configs/gfdm.py:tiny.")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://) for the latent shards; a relative path "
                           "is made absolute.")
_SPLITS = flags.DEFINE_list("splits", ["train", "eval"], "Splits to encode.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 256, "Clips per split over all processes (the clip stream is "
                                  "a sampled mixture, so a count, not an epoch, bounds it).")
_BATCH = flags.DEFINE_integer("batch_per_device", 2, "Clips encoded per local device per call.")
flags.mark_flags_as_required(["config", "out"])


def load_vae(config):
    """The VAE the GFDM of ``config`` trains with."""
    from flax import nnx

    init = config.get("init", {})
    if init.get("svd_path", ""):
        from defi_jax.interop import diffusers_svd
        return diffusers_svd.load_vae(os.path.join(init.svd_path, "vae"))
    from defi_jax.gfdm.stage import build_model
    return build_model(config, nnx.Rngs(config.seed)).vae


def encode_split(config, vae, out_dir: str, split: str, num_clips: int, batch_per_device: int) -> dict:
    """Encodes ``num_clips`` clips of ``split`` (this process's share) into one shard; returns its metadata."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import data_pipelines
    from defi_jax.gfdm import latents as latent_store
    from defi_jax.gfdm.stage import loader_config

    pi, pc = jax.process_index(), jax.process_count()
    local = jax.local_devices()
    mesh = Mesh(np.asarray(local), ("batch",))
    per_call = batch_per_device * len(local)
    share = -(-num_clips // pc)  # this process's clips (ceil)
    loader = data_pipelines.make_loader("gfdm_clip", loader_config(config), global_batch_size=per_call * pc, process_index=pi,
                                        process_count=pc, seed=config.seed, split=split)
    sf = float(dict(config.model.vae).get("scaling_factor", 0.18215))
    shard = NamedSharding(mesh, P("batch"))

    @nnx.jit
    def encode(vae, frames_NTHW3):
        n, t, h, w, _ = frames_NTHW3.shape
        x = frames_NTHW3.reshape(n * t, h, w, 3).astype(jnp.float32) / 127.5 - 1.0
        z = vae.encode(x).astype(jnp.float32) * sf
        return z.reshape(n, t, *z.shape[1:])

    writer = latent_store.ShardWriter(out_dir, split, pi, pc, scaling_factor=sf,
                                      extra_meta={"vae": config.init.get("svd_path", "") or f"random(seed={config.seed})"})
    done, t0 = 0, time.time()
    while done < share:
        batch = next(loader)
        frames = jax.device_put(np.asarray(batch["frames"]), shard)
        z = np.asarray(encode(vae, frames))
        for i in range(min(len(z), share - done)):
            writer.add(z[i], str(batch["instruction"][i]), str(batch.get("dataset", [""] * len(z))[i]))
        done = min(share, done + len(z))
        logging.info("%s: %d / %d clips (%.1f clips/s)", split, done, share, done / (time.time() - t0))
    writer.close()
    return writer.meta


def main(argv):
    del argv
    import logging as py_logging
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)
    config, out = _CONFIG.value, paths.abspath(_OUT.value)
    if config.stage != "gfdm":
        print(f"launch.precompute_latents: --config stage is {config.stage!r}; precompute_latents needs a GFDM "
              "config (configs/gfdm.py:tiny | svd)", file=sys.stderr)
        return 2
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"launch.precompute_latents: {spec}, splits {','.join(_SPLITS.value)}, {_NUM_CLIPS.value} clips each "
          f"-> {out}", flush=True)
    from defi_jax import distributed
    distributed.initialize()

    vae = load_vae(config)
    for split in _SPLITS.value:
        meta = encode_split(config, vae, out, split, _NUM_CLIPS.value, _BATCH.value)
        logging.info("wrote %s: %s", split, meta)
        print(f"{split}: {meta['num_records']} clips, latents {meta['latent_shape']} -> {out}", flush=True)
    print(f"launch.precompute_latents: done; train on them with --config.data.source=latents "
          f"--config.data.latents_dir={out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=config_validation.parse_flags))
