"""Train-step time of the one trainer on the toy stage, and its overhead over a bare jit step.

    python -m launch.benchmark trainer                       # toy:small, all devices, 20 timed steps
    python -m launch.benchmark trainer --config=wide --steps=50 --mesh=1,-1,1

Rows: ``trainer`` = ``Trainer.step`` (sharded jit, donated state, NaN guard, clipping, AdamW, EMA when
configured); ``bare`` = the same model, loss and AdamW in a minimal jit step with the same shardings.
``ratio`` = trainer / bare median (the cost of the trainer's machinery).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax
from flax import nnx

from defi_jax import metrics as metrics_lib, sharding
from defi_jax import trainer as trainer_lib


def _time(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def run(args: list[str]) -> list[dict]:
    from configs import toy
    p = argparse.ArgumentParser(prog="launch.benchmark trainer")
    p.add_argument("--config", default="small", help="configs/toy.py variant")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    p.add_argument("--compute_dtype", default="float32")
    a = p.parse_args(args)

    config = toy.get_config(a.config)
    config.mesh.shape = tuple(int(x) for x in a.mesh.split(","))
    config.train.compute_dtype = a.compute_dtype
    tr = trainer_lib.Trainer(config)
    data = tr.stage.make_data(config, 0, 1, "train")
    batch = tr.global_batch(next(data))
    state = tr.init_state()

    box = [state]

    def trainer_step():
        box[0], out = tr.step(box[0], batch)
        return out["loss"]

    t0 = time.perf_counter()
    trainer_step()  # compiles
    compile_s = time.perf_counter() - t0
    flops = metrics_lib.compiled_flops(tr.compiled)
    trainer_step()

    # A bare step: same model / loss / optimizer / shardings, none of the trainer's extras.
    graphdef, tx, stage = tr.graphdef, tr.tx, tr.stage
    sh = tr.state_shardings

    def bare(params, opt_state, batch):
        def loss(p):
            return stage.loss_fn(nnx.merge(graphdef, p, box[0].frozen, box[0].extra), batch, None, config)[0]
        l, g = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l

    bare_jit = jax.jit(bare, in_shardings=(sh.params, sh.opt_state, tr.batch_shardings(batch)),
                       out_shardings=(sh.params, sh.opt_state, None), donate_argnums=(0, 1))
    pbox = [jax.tree.map(lambda x: x.copy(), box[0].params), jax.tree.map(lambda x: x.copy(), box[0].opt_state)]

    def bare_step():
        with sharding.use_rules(tr.mesh, tr.rules):
            pbox[0], pbox[1], l = bare_jit(pbox[0], pbox[1], batch)
        return l

    bare_step(); bare_step()
    # Interleaved, so that load changes on a shared machine hit both alike.
    times = [(_time(trainer_step, 1)[0], _time(bare_step, 1)[0]) for _ in range(a.steps)]
    t_trainer = statistics.median(t for t, _ in times)
    t_bare = statistics.median(b for _, b in times)

    dev = jax.devices()[0]
    device = f"{dev.platform}:{dev.device_kind} x{jax.device_count()}"
    cfg = (f"toy:{a.config} frame {config.model.frame_size} width {config.model.width} batch "
           f"{config.train.batch_size} mesh {tuple(tr.mesh.shape.values())} {a.compute_dtype}")
    peak = metrics_lib.peak_flops(dev)
    row = dict(case="trainer", what="Trainer.step (toy)", config=cfg, device=device, median_s=t_trainer,
               steps_per_s=1 / t_trainer, examples_per_s=config.train.batch_size / t_trainer,
               compile_s=compile_s, ratio=t_trainer / t_bare)
    if flops and peak:
        row["mfu"] = flops / t_trainer / peak
    bare_row = dict(case="trainer", what="bare jit step (toy)", config=cfg, device=device, median_s=t_bare,
                    steps_per_s=1 / t_bare, examples_per_s=config.train.batch_size / t_bare, ratio=1.0)
    return [row, bare_row]
