"""Learning-rate schedules and the optimizer (optax AdamW with global-norm clipping) from ``config.train``."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_cosine", "tri_stage", "constant")


def schedule(t) -> optax.Schedule:
    """``t`` = config.train. Every schedule starts with a linear warmup."""
    lr, steps = float(t.lr), int(t.num_steps)
    if t.schedule == "warmup_cosine":
        warmup = min(int(t.warmup_steps), steps - 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps,
            end_value=lr * float(t.end_lr_factor))
    if t.schedule == "tri_stage":
        return tri_stage(lr, steps, t.tri_stage, init_scale=float(t.get("tri_stage_init_scale", 0.01)),
                         final_scale=float(t.get("tri_stage_final_scale", 0.01)))
    if t.schedule == "constant":
        warmup = int(t.warmup_steps)
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"config.train.schedule={t.schedule!r} is not one of {SCHEDULES}")


def tri_stage(peak: float, steps: int, fractions, *, init_scale: float = 0.01,
              final_scale: float = 0.01) -> optax.Schedule:
    """Warmup / hold / decay (fairseq's tri-stage, used by the DeFI policy recipe: 2% / 8% / 90%).

    Linear warmup from ``init_scale * peak`` to ``peak``, hold, then exponential decay to
    ``final_scale * peak`` at the end of the decay phase (held there afterwards).
    """
    warmup, hold, decay = (max(1, int(round(f * steps))) for f in fractions)
    decay_rate = -math.log(final_scale) / decay

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (init_scale + (1.0 - init_scale) * step / warmup)
        decayed = peak * jnp.exp(-decay_rate * jnp.minimum(step - warmup - hold, decay))
        return jnp.where(step < warmup, warm, jnp.where(step < warmup + hold, peak, decayed))

    return fn


def optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay on every parameter, like torch.optim.AdamW) after clipping."""
    sched = schedule(t)
    parts = []
    if float(t.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
    parts.append(optax.adamw(sched, b1=float(t.b1), b2=float(t.b2), eps=float(t.get("eps", 1e-8)),
                             weight_decay=float(t.weight_decay)))
    return optax.chain(*parts), sched
