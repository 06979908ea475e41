"""Toy next-frame stage (a small real model for exercising the trainer).

    python -m launch.train --config=configs/toy.py:tiny --workdir=/tmp/toy --config.train.num_steps=20

Variants: ``tiny`` (tests, seconds on CPU), ``small`` (default; a minute on CPU), ``wide`` (benchmarks).
"""

import ml_collections

from configs.base import get_base_config


def get_config(arg: str | None = None):
    variant = arg or "small"
    c = get_base_config()
    c.stage = "toy"

    c.model.frame_size = 16
    c.model.channels = 3
    c.model.width = 32
    c.model.hidden = 128

    c.data.seed = 0
    c.data.num_examples = 4096
    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 4                 # held-out batches per evaluation
    c.data.worker_count = 0            # grain worker processes (0 = in-process)

    c.train.batch_size = 32
    c.train.num_steps = 500
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 1e-4
    c.train.log_every = 25
    c.train.save_every = 250

    if variant == "tiny":
        c.model.frame_size = 8
        c.model.width = 8
        c.model.hidden = 32
        c.data.num_examples = 512
        c.eval.batches = 2
        c.train.batch_size = 16
        c.train.num_steps = 20
        c.train.warmup_steps = 2
        c.train.log_every = 5
        c.train.save_every = 10
    elif variant == "wide":
        c.model.frame_size = 32
        c.model.width = 64
        c.model.hidden = 512
        c.train.batch_size = 64
    elif variant != "small":
        raise ValueError(f"configs/toy.py: unknown variant {variant!r} (tiny | small | wide)")
    return c
