"""The one trainer every stage runs through.

How a stage plugs in: ``config.stage`` names a :class:`defi_jax.stage.Stage` (``build_model``, ``loss_fn``,
``make_data``, optional ``evaluate`` / ``validate``). The trainer validates the config, builds the mesh
from ``config.mesh`` and lays the train state out (:class:`StateLayout`: the model built abstractly with
``nnx.eval_shape``, split into trainable params, frozen params (``config.train.frozen`` regexes over paths
like ``encoder/conv_in/kernel``) and other variables; every leaf sharded from its logical axis names through
``config.sharding.logical_axis_rules``). A fresh state is made by one jitted init that takes the pretrained
weights of ``config.init`` (:mod:`defi_jax.weights`, read on the host, already sharded) as arguments and
initialises the rest randomly. The train step (one ``jax.jit`` with in/out shardings and the
state donated) rebuilds the model with ``nnx.merge`` from params cast to ``compute_dtype``, calls the
stage's ``loss_fn`` under the sharding rules (so ``sharding.constrain`` in model code applies), averages
gradients over ``grad_accum_steps`` microbatches, clips, applies AdamW to the trainable params only
(frozen ones get no gradient and no optimizer state), updates the EMA, and skips the update when the
loss or the gradient norm is not finite (``config.train.max_nonfinite_steps`` in a row stop the run).

What lands in ``WORKDIR``:
  checkpoints/<step>/   Orbax: the train state as items ``params``, ``frozen``, ``extra``, ``opt_state``,
                        ``ema``, ``counters`` (so parameters are read without the optimizer state),
                        ``data`` (each process's data-iterator state) and ``config`` (JSON); keep-N, async.
                        An imported workdir's step 0 is params-only (``params``, ``frozen``, ``extra``): the
                        run starts from it as from a fresh init with those weights.
  metrics.jsonl         one JSON object per logged step: step, loss, grad_norm, lr, skipped updates,
                        the stage's metrics, steps/s, examples/s, MFU (where the peak is known).
  tensorboard/          the same scalars as TensorBoard events.
  config.json           the config the run started with.
A run resumes from the latest checkpoint in its workdir by itself (on any mesh / device count); SIGTERM
saves a checkpoint at the current step and returns with ``status="preempted"`` (multi-process: JAX's
preemption notifier catches the signal and every process stops at the same step).

Public: :func:`train`, :class:`Trainer`, :class:`StateLayout`, :func:`restore_model`, :func:`checkpoint_config`,
:func:`compile_train_step`, :func:`param_counts`, :func:`state_bytes_per_device`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from defi_jax import config_validation, distributed, metrics as metrics_lib, nn, optim, paths, sharding, stage as stage_lib
from defi_jax.checkpoint import Checkpointer

_log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was NaN/Inf for ``config.train.max_nonfinite_steps`` steps in a row."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes; all leaves are (sharded) arrays, pure nested dicts for params."""

    step: jax.Array        # int32, steps taken (skipped ones included)
    params: Any            # trainable params, config.train.param_dtype
    frozen: Any            # frozen params (no gradient, no optimizer state)
    extra: Any             # non-parameter variables the model may update (counters, statistics)
    opt_state: Any
    ema: Any               # EMA of the trainable params ({} when config.train.ema_decay == 0)
    rng: jax.Array         # uint32[2], split once per step
    nonfinite: jax.Array   # int32, consecutive skipped (non-finite) steps
    skipped: jax.Array     # int32, skipped steps in total

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    status: str            # "done" | "preempted"
    metrics: dict          # the last logged row


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _remat(fn, policy: str):
    if policy in ("none", "", None):
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


class StateLayout:
    """The train state of ``config`` on ``mesh``, apart from the loop: the model's structure, the split into
    trainable params / frozen params (``config.train.frozen`` regexes over paths like ``encoder/conv_in/kernel``)
    / other variables, every leaf's sharding (logical axis names through ``config.sharding.logical_axis_rules``),
    the abstract state, and restore (whole state, or parameters only). Restore, describe and export use it
    without building a trainer; nothing is allocated and no weight file is read.

    ``mesh`` defaults to ``sharding.make_mesh(config.mesh)`` over all devices.
    """

    def __init__(self, config, *, mesh=None):
        self.config = config
        self.stage = stage_lib.get(config.stage)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        self.rules = dict(config.sharding.logical_axis_rules)
        t = config.train
        self.param_dtype = _DTYPES[t.param_dtype]
        self.tx, self.schedule = optim.optimizer(t)
        frozen_res = [re.compile(p) for p in stage_lib.frozen_patterns(config)]

        def trainable(path, x):
            return isinstance(x, nnx.Param) and not any(r.search(_path_str(path)) for r in frozen_res)

        self.filters = (trainable, nnx.Param, ...)
        abstract = nnx.eval_shape(lambda: self.build_model())
        self.graphdef, a_train, a_frozen, a_extra = nnx.split(abstract, *self.filters)
        self.logical = dict(params=a_train, frozen=a_frozen, extra=a_extra)
        self.shardings = self._make_shardings()
        self._abstract = None

    def build_model(self, seed: int | None = None) -> nnx.Module:
        """The stage's model, randomly initialised (pure construction: no file is read)."""
        with nn.fast_traced_rngs():
            return self.stage.build_model(self.config, nnx.Rngs(self.config.seed if seed is None else seed))

    def _shardings_of(self, abstract_state: nnx.State):
        return nnx.to_pure_dict(sharding.state_shardings(abstract_state, self.mesh, self.rules))

    def _make_shardings(self) -> TrainState:
        rep = NamedSharding(self.mesh, P())
        params_sh = self._shardings_of(self.logical["params"])
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self.param_dtype),
                                       nnx.to_pure_dict(self.logical["params"]))
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        # Optimizer moments shard like their parameters; counters and the like are replicated.
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, params_sh,
                                       transform_non_params=lambda _: rep)
        return TrainState(
            step=rep, params=params_sh, frozen=self._shardings_of(self.logical["frozen"]),
            extra=self._shardings_of(self.logical["extra"]), opt_state=opt_sh,
            ema=params_sh if self.config.train.ema_decay > 0 else {}, rng=rep, nonfinite=rep, skipped=rep)

    def assemble(self, params, frozen, extra) -> TrainState:
        """A fresh train state around initial parameters (pure dicts, already in ``param_dtype``)."""
        zero = jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero, params=params, frozen=frozen, extra=extra, opt_state=self.tx.init(params),
            ema=params if self.config.train.ema_decay > 0 else {},
            rng=jax.random.PRNGKey(self.config.seed + 1), nonfinite=zero, skipped=zero)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target and the AOT-compile input."""
        if self._abstract is None:
            pure = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(v))
                    for k, v in self.logical.items()}
            shapes = jax.eval_shape(
                lambda p, f, e: self.assemble(_cast(p, self.param_dtype), _cast(f, self.param_dtype), e),
                pure["params"], pure["frozen"], pure["extra"])
            self._abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          shapes, self.shardings)
        return self._abstract

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``"encoder/conv_in/kernel" -> ShapeDtypeStruct`` (with sharding) of every parameter, trainable and
        frozen: what ``config.init`` sources and params-only restores fill."""
        a = self.abstract_state()
        return _flat(a.params) | _flat(a.frozen)

    def model(self, state: TrainState, *, ema: bool = False) -> nnx.Module:
        """The stage's model holding ``state``'s params (the EMA params with ``ema=True``, when kept)."""
        params = state.ema if ema and state.ema else state.params
        return nnx.merge(self.graphdef, params, state.frozen, state.extra)

    def restore(self, ckpt: Checkpointer, step: int, *, data: bool = False) -> tuple[TrainState, Any]:
        """The whole train state of checkpoint ``step`` in this layout (any saved mesh), and the data state.

        A params-only step (``Checkpointer.params_only``: an imported workdir) gives the state a fresh init with
        its parameters would: fresh optimizer state, EMA = params, step 0 and the seed's rng."""
        target = self.abstract_state().as_dict()
        params_only = ckpt.params_only(step)
        if params_only:
            target = {k: target[k] for k in ("params", "frozen", "extra")}
        try:
            state, data_state = ckpt.restore(step, target, data=data)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise RuntimeError(
                f"{ckpt.directory / str(step)}: the checkpoint does not fit this config's train state "
                f"(model, frozen set, optimizer or EMA changed?). Compare the config.json next to it with the "
                f"current config, or start in a fresh workdir. Orbax said: {e}") from e
        if not params_only:
            return TrainState.from_dict(state), data_state
        _log.info("%s holds the parameters only (an imported workdir): the optimizer state starts fresh%s",
                  ckpt.directory / str(step), ", the EMA at the parameters" if self.config.train.ema_decay > 0 else "")
        fresh = jax.jit(self.assemble, out_shardings=self.shardings, donate_argnums=(0, 1, 2),
                        **stage_lib.jit_kwargs(self.config))
        return fresh(state["params"], state["frozen"], state["extra"]), data_state

    def restore_model(self, workdir: str, *, step: int | None = None, ema: bool = False) -> nnx.Module:
        """The model holding a checkpoint's parameters (EMA or not); reads no optimizer state."""
        from defi_jax import checkpoint
        a = self.abstract_state()
        flat = checkpoint.restore_params(workdir, step, ema=ema, target=self.abstract_params())
        params, frozen = _unflat(a.params, flat), _unflat(a.frozen, flat)
        extra = {}
        if jax.tree.leaves(a.extra):
            ckpt = Checkpointer(workdir, read_only=True)
            try:
                extra = ckpt.restore(step if step is not None else ckpt.latest_step(), {"extra": a.extra},
                                     data=False)[0]["extra"]
            finally:
                ckpt.close()
        with sharding.use_rules(self.mesh, self.rules):
            return nnx.merge(self.graphdef, params, frozen, extra)


FINISHED = "finished.json"   # in a workdir: {"step", "metrics"} of a run that reached num_steps and evaluated


def _finished(workdir: str) -> dict | None:
    path = paths.join(workdir, FINISHED)
    try:
        return json.loads(paths.read_text(path)) if paths.exists(path) else None
    except (OSError, json.JSONDecodeError):
        return None


def _jsonable(row: Mapping) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in row.items()}


def record_config(workdir: str, config_json: str) -> None:
    """Keeps the run's config history in ``WORKDIR``: ``config.json`` is the config the run started with (never
    overwritten), and ``config_history/NNNN.json`` each start's config when it differs from the previous start,
    with ``NNNN.diff`` (a unified diff against it); a changed config is logged naming the changed keys."""
    import difflib

    first = paths.join(workdir, "config.json")
    if not paths.exists(first):
        paths.write_text(first, config_json)
    hist = paths.join(workdir, "config_history")
    entries = sorted(n for n in (paths.listdir(hist) if paths.isdir(hist) else []) if n.endswith(".json"))
    previous = paths.read_text(paths.join(hist, entries[-1])) if entries else None
    if previous == config_json:
        return
    n = len(entries)
    paths.write_text(paths.join(hist, f"{n:04d}.json"), config_json)
    if previous is not None:
        old, new = previous.splitlines(), config_json.splitlines()
        if previous.lstrip().startswith("{") and config_json.lstrip().startswith("{"):
            old = json.dumps(json.loads(previous), indent=1, sort_keys=True).splitlines()
            new = json.dumps(json.loads(config_json), indent=1, sort_keys=True).splitlines()
        diff = list(difflib.unified_diff(old, new, f"config_history/{n - 1:04d}.json",
                                         f"config_history/{n:04d}.json", lineterm=""))
        paths.write_text(paths.join(hist, f"{n:04d}.diff"), "\n".join(diff) + "\n")
        changed = [line[1:].strip().split(":")[0].strip('"') for line in diff
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        _log.warning("%s: the config differs from the previous start (keys %s); history in %s",
                     workdir, sorted(set(changed))[:20], hist)


def _flat(tree) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(like, flat: Mapping[str, Any]):
    """``like``'s nested structure (its key types included) with the leaves of ``flat``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[_path_str(p)], like)


class Trainer:
    """Builds the sharded state and the jitted step for ``config``; :meth:`fit` runs the loop.

    ``mesh`` defaults to ``sharding.make_mesh(config.mesh)`` over all devices. The layout of the state is
    ``self.layout`` (:class:`StateLayout`); ``config.init`` weights are read by :meth:`init_state` only.
    """

    def __init__(self, config, *, mesh=None, validate: bool = True):
        config_validation.resolve(config)   # the stage's derived keys, as config.json then records them
        if validate:
            config_validation.validate(config, num_devices=None if mesh is None else mesh.devices.size)
        self.config = config
        self.layout = StateLayout(config, mesh=mesh)
        self.stage, self.mesh, self.rules = self.layout.stage, self.layout.mesh, self.layout.rules
        self.graphdef, self.state_shardings = self.layout.graphdef, self.layout.shardings
        self.tx, self.schedule = self.layout.tx, self.layout.schedule
        t = config.train
        self.param_dtype = self.layout.param_dtype
        self.compute_dtype = _DTYPES[t.compute_dtype]
        # XLA options for every compile of this run (e.g. {"xla_backend_optimization_level": 0} makes CPU
        # test compiles ~5x faster); empty by default.
        self._jit_kwargs = stage_lib.jit_kwargs(config)
        if not jax.tree.leaves(self.layout.logical["params"]):
            raise config_validation.ConfigError(
                f"config.train.frozen={tuple(t.frozen)!r}: every parameter is frozen, nothing to train")
        self.compiled = self._init_fn = None
        self._sigterm = False

    # ------------------------------------------------------------------ state
    def _init_parts(self, loaded: Mapping[str, jax.Array]) -> dict:
        """Random init of the model with the ``config.init`` weights (``loaded``, arguments) in place: the
        ``params``, ``frozen`` and ``extra`` of the state."""
        _, params, frozen, extra = nnx.split(self.layout.build_model(), *self.layout.filters)

        def fill(tree):
            return jax.tree_util.tree_map_with_path(lambda p, x: loaded.get(_path_str(p), x), tree)

        return dict(params=fill(_cast(nnx.to_pure_dict(params), self.param_dtype)),
                    frozen=fill(_cast(nnx.to_pure_dict(frozen), self.param_dtype)), extra=nnx.to_pure_dict(extra))

    def _init(self, loaded: Mapping[str, jax.Array]) -> TrainState:
        return self.layout.assemble(**self._init_parts(loaded))

    def _jitted_init(self):
        if self._init_fn is None:
            # The loaded weights are donated: each becomes its slot of the state without a second copy.
            self._init_fn = jax.jit(self._init, out_shardings=self.state_shardings, donate_argnums=0,
                                    **self._jit_kwargs)
        return self._init_fn

    def load_init_params(self) -> dict[str, jax.Array]:
        """The ``config.init`` weights, read now (host, outside any trace) into their shardings."""
        from defi_jax import weights
        return weights.load_init_params(self.config, self.layout.abstract_params())

    def lower_init(self):
        """The lowered (not compiled) init program, on abstract weights: for inspection (no file is read)."""
        from defi_jax import weights
        abstract = self.layout.abstract_params()
        names = {p for s in weights.active_sources(self.config) for p in abstract if re.match(s.target, p)}
        with sharding.use_rules(self.mesh, self.rules):
            return self._jitted_init().lower({p: abstract[p] for p in sorted(names)})

    def init_state(self) -> TrainState:
        """A freshly initialized train state, created directly in its sharded layout, with the ``config.init``
        weights (read once per call, outside the trace, and passed to the jitted init as arguments)."""
        loaded = self.load_init_params()
        with sharding.use_rules(self.mesh, self.rules):
            return self._jitted_init()(loaded)

    def init_params(self) -> dict:
        """What :meth:`init_state` starts from without the optimizer state and the EMA: ``{"params", "frozen",
        "extra"}`` in their shardings (the ``config.init`` weights donated into place, the rest drawn), which is
        what a params-only checkpoint holds (an import: host memory holds the weights once, not the moments)."""
        loaded = self.load_init_params()
        s = self.state_shardings
        fn = jax.jit(self._init_parts, out_shardings=dict(params=s.params, frozen=s.frozen, extra=s.extra),
                     donate_argnums=0, **self._jit_kwargs)
        with sharding.use_rules(self.mesh, self.rules):
            return fn(loaded)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target and the AOT-compile input."""
        return self.layout.abstract_state()

    def model(self, state: TrainState, *, ema: bool = False) -> nnx.Module:
        """The stage's model holding ``state``'s params (the EMA params with ``ema=True``)."""
        return self.layout.model(state, ema=ema)

    # ------------------------------------------------------------------ step
    def _loss_and_grads(self, state: TrainState, batch, rng):
        c = self.config
        stage, graphdef, cdt = self.stage, self.graphdef, self.compute_dtype
        frozen = jax.lax.stop_gradient(_cast(state.frozen, cdt))

        def loss_on(params, extra, micro, key):
            model = nnx.merge(graphdef, _cast(params, cdt), frozen, extra)
            loss, aux = stage.loss_fn(model, micro, key, c)
            new_extra = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
            return jnp.asarray(loss, jnp.float32), (aux, new_extra)

        grad_fn = jax.value_and_grad(_remat(loss_on, c.train.remat_policy), has_aux=True)
        accum = c.train.grad_accum_steps
        if accum == 1:
            (loss, (aux, extra)), grads = grad_fn(state.params, state.extra, batch, rng)
            return loss, aux, extra, grads

        def split(x):  # [B, ...] -> [A, B/A, ...]; each device keeps its own rows in every microbatch
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(self.mesh, P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))))

        micro = jax.tree.map(split, batch)
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, (aux0, _)), _ = jax.eval_shape(grad_fn, state.params, state.extra, first, rng)

        def body(carry, xs):
            g_sum, l_sum, a_sum, extra = carry
            mb, i = xs
            (l, (a, extra)), g = grad_fn(state.params, extra, mb, jax.random.fold_in(rng, i))
            add = lambda u, v: jax.tree.map(lambda p, q: p + q.astype(jnp.float32), u, v)
            return (add(g_sum, g), l_sum + l, add(a_sum, a), extra), None

        init = (zeros(state.params), jnp.zeros((), jnp.float32), zeros(aux0), state.extra)
        (g_sum, l_sum, a_sum, extra), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), g_sum, state.params)
        return l_sum / accum, jax.tree.map(lambda a: a / accum, a_sum), extra, grads

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        t = self.config.train
        rng, step_rng = jax.random.split(state.rng)
        loss, aux, extra, grads = self._loss_and_grads(state, batch, step_rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema
            if t.ema_decay > 0:
                d = t.ema_decay
                ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, params)
            return params, opt_state, ema, extra

        def skip(_):
            return state.params, state.opt_state, state.ema, state.extra

        params, opt_state, ema, extra = jax.lax.cond(ok, apply, skip, None)
        bad = (~ok).astype(jnp.int32)
        new = TrainState(step=state.step + 1, params=params, frozen=state.frozen, extra=extra,
                         opt_state=opt_state, ema=ema, rng=rng,
                         nonfinite=jnp.where(ok, 0, state.nonfinite + 1), skipped=state.skipped + bad)
        out = dict(aux) | {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state.step),
                           "nonfinite_steps": new.nonfinite, "skipped_steps": new.skipped}
        return new, out

    def batch_shardings(self, batch) -> dict:
        return jax.tree.map(lambda x: sharding.batch_sharding(self.mesh, np.ndim(x)), batch)

    def jit_step(self, batch_like):
        """The jitted train step for batches shaped like ``batch_like`` (arrays or ShapeDtypeStructs)."""
        rep = NamedSharding(self.mesh, P())
        return jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings(batch_like)),
                       out_shardings=(self.state_shardings, rep), donate_argnums=0, **self._jit_kwargs)

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """One optimizer step on a global (device-resident) batch; ``state`` is donated.

        Compiled ahead of time on the first call (``self.compiled`` then also gives the FLOP count for MFU);
        every batch must have the first one's shapes.
        """
        if self.compiled is None:
            with sharding.use_rules(self.mesh, self.rules):
                self.compiled = self.jit_step(batch).lower(state, batch).compile()
        return self.compiled(state, batch)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict:
        """Host-local numpy batch -> global arrays split over (data, fsdp) across all processes."""
        n = jax.process_count()

        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(
                sharding.batch_sharding(self.mesh, x.ndim), x, (x.shape[0] * n, *x.shape[1:]))

        return jax.tree.map(one, dict(local))

    # ------------------------------------------------------------------ loop
    def _on_sigterm(self, signum, frame):
        _log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._sigterm = True

    def _preempted(self, ckpt: Checkpointer, step: int) -> bool:
        if jax.process_count() == 1:
            return self._sigterm
        # Multi-host: every process must stop at the same step. jax.distributed's preemption notifier catches
        # SIGTERM (we install no Python handler then) and the sync point agrees on the step.
        return ckpt.manager.reached_preemption(step)

    def _evaluate(self, state: TrainState, workdir: str, step: int) -> dict:
        if self.stage.evaluate is None:
            return {}
        raw = self.stage.make_data(self.config, jax.process_index(), jax.process_count(), "eval")
        batches = (self.global_batch(b) for b in raw)
        with sharding.use_rules(self.mesh, self.rules):
            model = self.model(state, ema=bool(self.config.train.get("eval_ema", True)))
            return self.stage.evaluate(model, self.config, workdir, step, batches)

    def restore_or_init(self, ckpt: Checkpointer | None, data_iter=None) -> TrainState:
        """The newest readable checkpoint of ``ckpt`` (a damaged newer one is skipped with a warning naming
        it), or a fresh state when there is none. When no checkpoint can be read, the newest one's error."""
        steps = sorted(ckpt.all_steps(), reverse=True) if ckpt is not None else []
        if not steps:
            return self.init_state()
        first_error, damaged = None, []
        for step in steps:
            try:
                state, data_state = self.layout.restore(ckpt, step, data=data_iter is not None)
                if data_iter is not None and data_state is not None:
                    data_iter.set_state(data_state)
            except Exception as e:   # noqa: BLE001  (Orbax / tensorstore raise many kinds on damaged files)
                first_error = first_error or e
                damaged.append(step)
                _log.warning("checkpoint %s could not be read (%s: %s)", ckpt.directory / str(step),
                             type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                continue
            if damaged:
                aside = ckpt.directory.parent / "damaged_checkpoints"
                if distributed.is_primary():   # out of the manager's way (training saves those steps again)
                    aside.mkdir(parents=True, exist_ok=True)
                    for d in damaged:
                        (ckpt.directory / str(d)).rename(aside / f"{d}-{int(time.time())}")
                distributed.sync("defi_jax.trainer.damaged_checkpoints")
                ckpt.manager.reload()
                _log.warning("resumed from the newest readable checkpoint, step %d; the newer step(s) %s could not "
                             "be read and were moved to %s for inspection", step, damaged, aside)
            else:
                _log.info("resumed from %s at step %d", ckpt.directory / str(step), step)
            return state
        raise first_error

    def fit(self, workdir: str) -> TrainResult:
        """Trains to ``config.train.num_steps``, resuming from ``workdir`` when it holds a checkpoint."""
        c, t = self.config, self.config.train
        primary = distributed.is_primary()
        config_json = c.to_json_best_effort(sort_keys=True)
        if primary:
            paths.makedirs(workdir)
            record_config(workdir, config_json)
            for name, text in (self.stage.assets(c) if self.stage.assets is not None else {}).items():
                paths.write_text(paths.join(workdir, "assets", name), text)   # atomic, local or gs://
        if self.stage.prepare is not None:
            self.stage.prepare(c)
        if self.stage.check_data is not None:
            self.stage.check_data(c)   # every dataset and both splits, before anything is spent
        ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.get("async_checkpointing", True))
        data_iter = self.stage.make_data(c, jax.process_index(), jax.process_count(), "train")
        try:
            state = self.restore_or_init(ckpt, data_iter)
        except BaseException:
            ckpt.close()
            raise
        step = int(jax.device_get(state.step))
        done = _finished(workdir)
        if step >= t.num_steps and done is not None and done.get("step") == step:
            # A rerun of a finished run: nothing to train or evaluate again (raise num_steps to extend it).
            ckpt.close()
            if callable(getattr(data_iter, "close", None)):
                data_iter.close()
            print(f"{workdir}: already finished at step {step} (config.train.num_steps={t.num_steps}); nothing to "
                  f"do. Raise config.train.num_steps to train further.", flush=True)
            return TrainResult(state=state, step=step, status="done", metrics=dict(done.get("metrics", {})))
        writer = metrics_lib.MetricWriter(workdir, enabled=primary, resume_step=step)
        bar = metrics_lib.progress_bar(t.num_steps, step, enabled=primary and t.progress_bar)
        old_handler = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm = False

        throughput = None
        last_row: dict = {}
        pending = None  # previous step's non-finite counter, checked one step late to keep dispatch async
        status = "done"
        try:
            while step < t.num_steps:
                batch = self.global_batch(next(data_iter))
                state, out = self.step(state, batch)
                step += 1
                if throughput is None:  # start timing after the first (compiling) step
                    jax.block_until_ready(out["loss"])
                    throughput = metrics_lib.Throughput(t.batch_size, metrics_lib.compiled_flops(self.compiled))
                    throughput.start(step)
                self._check_finite(pending, step - 1)
                pending = out["nonfinite_steps"]
                if bar is not None:
                    bar.update(1)
                if step % t.log_every == 0 or step == t.num_steps:
                    row = {k: v.item() for k, v in jax.device_get(out).items()}
                    row |= throughput.measure(step)
                    skips = getattr(data_iter, "skip_counts", None)   # unusable samples skipped, per source
                    if callable(skips):
                        row |= {f"data/skipped/{name}": n for name, n in skips().items()}
                    writer.write(step, row)
                    last_row = {"step": step} | row
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}")
                    elif primary:
                        _log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
                if t.eval_every and step % t.eval_every == 0 and self.stage.evaluate is not None:
                    row = self._evaluate(state, workdir, step)
                    writer.write(step, row)
                    last_row |= row
                if step % t.save_every == 0 and step < t.num_steps:
                    ckpt.save(step, state.as_dict(), data_iter.get_state(), config_json)
                if step < t.num_steps and self._preempted(ckpt, step):
                    if step % t.save_every:  # (else it was saved just above)
                        ckpt.save(step, state.as_dict(), data_iter.get_state(), config_json)
                    ckpt.wait()
                    _log.warning("preempted: checkpoint saved at step %d in %s; exiting cleanly", step,
                                 ckpt.directory)
                    status = "preempted"
                    break
            self._check_finite(pending, step)
            if status == "done":
                if ckpt.latest_step() != step:
                    ckpt.save(step, state.as_dict(), data_iter.get_state(), config_json)
                if self.stage.evaluate is not None and not (t.eval_every and step % t.eval_every == 0):
                    row = self._evaluate(state, workdir, step)
                    if row:
                        writer.write(step, row)
                        last_row |= row
                ckpt.wait()
                if primary:   # marks the run finished: a rerun returns at once instead of evaluating again
                    paths.write_text(paths.join(workdir, FINISHED),
                                     json.dumps({"step": step, "metrics": _jsonable(last_row)}, indent=1))
        finally:
            ckpt.close()
            writer.close()
            if callable(getattr(data_iter, "close", None)):
                data_iter.close()  # stops grain worker processes
            if bar is not None:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        return TrainResult(state=state, step=step, status=status, metrics=last_row)

    def _check_finite(self, counter, step: int) -> None:
        if counter is None:
            return
        n = int(jax.device_get(counter))
        if n >= self.config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {step}: loss or gradient norm was NaN/Inf for {n} steps in a row "
                f"(config.train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}); those updates "
                f"were skipped and the run stops. Lower config.train.lr, check the data, or resume from the "
                f"last checkpoint.")

    # ------------------------------------------------------------------ AOT
    def abstract_batch(self) -> dict:
        """Global batch shapes: from the stage's ``batch_spec`` when it has one, else one real batch."""
        spec = getattr(self.stage, "batch_spec", None)
        if spec is not None:
            shapes = spec(self.config)
        else:
            local = next(self.stage.make_data(self.config, 0, 1, "train"))
            shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in local.items()}
        return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(self.mesh, len(s.shape)))
                for k, s in shapes.items()}

    def compile(self):
        """Compiles (does not run) the train step on abstract inputs: returns (compiled, memory stats)."""
        batch = self.abstract_batch()
        with sharding.use_rules(self.mesh, self.rules):
            compiled = self.jit_step(batch).lower(self.abstract_state(), batch).compile()
        return compiled, memory_stats(compiled)


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled executable (arguments, outputs, temporaries, code)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    out = {k.removesuffix("_size_in_bytes"): int(getattr(m, k, 0) or 0) for k in keys}
    # Donated state aliases its outputs: live bytes = arguments + outputs - aliased + temporaries.
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def train(config, workdir: str) -> TrainResult:
    """Validates ``config``, then trains (or resumes) in ``workdir``."""
    return Trainer(config).fit(workdir)


def restore_model(config, workdir: str, *, step: int | None = None, ema: bool = False, mesh=None) -> nnx.Module:
    """The stage's model holding the params of a checkpoint in ``workdir`` (latest step by default).

    Reads the parameters (or their EMA) only, never the optimizer state. ``mesh`` defaults to
    ``config.mesh`` on all devices; the checkpoint may come from any mesh.
    """
    if not paths.isdir(paths.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoints in this workdir")
    return StateLayout(config, mesh=mesh).restore_model(workdir, step=step, ema=ema)


def checkpoint_config(workdir: str, step: int | None = None):
    """The config a checkpoint was written with, as an ml_collections ConfigDict."""
    import ml_collections
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ml_collections.ConfigDict(ckpt.restore_config(step))
    finally:
        ckpt.close()


def compile_train_step(config, mesh=None):
    """AOT: ``(compiled, memory_stats)`` of the full train step for the configured mesh, nothing run.

    For a bigger topology on a small machine, start Python with fake CPU devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=8``; ``launch.describe --num_devices=8``).
    """
    return Trainer(config, mesh=mesh).compile()


def param_counts(config) -> dict[str, int]:
    """Parameter count of each top-level sub-module (abstract, nothing allocated) and ``total``."""
    stage = stage_lib.get(config.stage)
    abstract = nnx.eval_shape(lambda: stage.build_model(config, nnx.Rngs(config.seed)))  # no file is read
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    counts = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in params.items()}
    counts["total"] = sum(counts.values())
    return counts


def state_bytes_per_device(config, mesh=None) -> dict[str, int]:
    """Bytes one device holds of each part of the sharded train state (largest shard per leaf)."""
    abstract = StateLayout(config, mesh=mesh).abstract_state()

    def nbytes(tree):
        return sum(math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(tree))

    out = {k: nbytes(getattr(abstract, k)) for k in ("params", "frozen", "opt_state", "ema")}
    out["total"] = nbytes(abstract)
    return out
