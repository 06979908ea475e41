"""VAE training (the demo's first stage): the tiny GFDM's autoencoder on the demo's video clips.

    python -m launch.train --config=configs/vae.py:tiny --workdir=/tmp/vae      # a few minutes on a CPU

The full GFDM loads SVD's published VAE (``configs/gfdm.py:svd``); no weights fit the tiny GFDM's, so the demo
trains this one and the tiny GFDM reads it frozen through ``config.init.sources.vae_workdir`` (a ``workdir``
source, target ``^vae/``). ``model.vae`` is ``configs/gfdm.py:tiny``'s, so the shapes always match.

Variants:
  ``tiny``  the tiny GFDM's VAE (two levels, 32 px frames -> 16 x 16 x 4 latents) on clips of its length.
"""

import ml_collections

from configs import gfdm as gfdm_configs
from configs.base import get_base_config
from data_pipelines.config import default_data_config


def get_config(arg: str | None = None):
    variant = arg or "tiny"
    if variant != "tiny":
        raise ValueError(f"configs/vae.py: unknown variant {variant!r} (tiny)")
    gfdm = gfdm_configs.get_config("tiny")
    c = get_base_config()
    c.stage = "vae"

    m = c.model
    m.vae = gfdm.model.vae.to_dict()
    m.kl_weight = 1e-4                 # x mean KL per latent element: keeps latents near unit scale, sharp frames
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)  # None = XLA; "cudnn" on GPU

    c.data = default_data_config()     # the GFDM's clips: same frames, resolution and clip length
    for key in ("mixture", "data_dir", "resolution", "num_frames", "views"):
        c.data[key] = gfdm.data[key]

    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 2                 # held-out batches (reconstruction through the posterior mode)
    c.eval.num_videos = 4              # clips in the GIF (real above, reconstructed below)
    c.eval.gif_fps = 4

    t = c.train
    t.batch_size = 8
    t.lr = 2e-3
    t.schedule = "warmup_cosine"
    t.warmup_steps = 10
    t.end_lr_factor = 0.1
    t.weight_decay = 0.0
    t.compiler_options = {"xla_backend_optimization_level": 0}  # CPU: compiles dominate a tiny run
    t.num_steps = 200
    t.log_every = 20
    t.eval_every = 0
    t.save_every = 200
    return c
