"""A training stage = a model + a loss + a data spec. The one trainer runs every stage.

Stages register by name (``config.stage``); modules are imported lazily so that running one stage never
imports another's dependencies. What every stage shares lives here: :class:`Tokenize` (the data workers'
instruction transform), :class:`NumericBatches`, :func:`jit_kwargs` (``config.train.compiler_options``),
:func:`compute_dtype` (``config.train.compute_dtype``) and :func:`eval_fns` (evaluation compiled once per run).
Every stage spells a concept with the same key: ``config.eval.batches``, ``config.model.attention_impl``,
``config.model.remat``, ``config.train.compute_dtype``, ``config.data.num_workers``, ``config.init.sources``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx


class DataIterator(Protocol):
    """Host-local batches: dicts of numpy arrays with leading dim = global batch / process count.

    ``get_state``/``set_state`` make the position checkpointable (grain iterators satisfy this).
    """

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


TextTokenizer = Callable[[str], tuple[np.ndarray, np.ndarray]]   # text -> (ids int32[L], mask int32[L])


class Tokenize:
    """The per-sample transform every stage runs in its data workers: the ``instruction`` -> token ids + masks.

    ``fields`` maps ``(ids key, mask key)`` to a tokenizer factory ``factory(config) -> TextTokenizer``, e.g.
    ``{("input_ids", "attention_mask"): gfdm.stage.tokenizer}``. ``prepare(sample) -> sample`` is an optional
    stage-specific step run first (the policy keeps the last observation frame). Factories and ``prepare`` are
    module-level functions: the transform is pickled into grain worker processes and builds its tokenizers
    there, on first use (a vocabulary is read once per worker, never pickled). The output holds the numeric
    fields only (strings cannot be batched onto devices).
    """

    def __init__(self, config, fields: Mapping[tuple[str, str], Callable[[Any], TextTokenizer]],
                 prepare: Callable[[dict], dict] | None = None):
        self.config, self.fields, self.prepare = config, dict(fields), prepare
        self._tokenizers: dict[tuple[str, str], TextTokenizer] | None = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _tokenizers=None)

    def tokenizers(self) -> dict[tuple[str, str], TextTokenizer]:
        if self._tokenizers is None:
            self._tokenizers = {keys: factory(self.config) for keys, factory in self.fields.items()}
        return self._tokenizers

    def __call__(self, sample: dict) -> dict:
        sample = self.prepare(sample) if self.prepare is not None else sample
        text = sample["instruction"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        out = {k: v for k, v in sample.items() if not isinstance(v, (str, bytes))}
        for (ids_key, mask_key), tokenize in self.tokenizers().items():
            ids, mask = tokenize(text)
            out[ids_key], out[mask_key] = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        return out


class NumericBatches:
    """A data loader's batches reduced to the numeric arrays a stage's step reads (strings cannot go to devices).

    Forwards the checkpointable position (``get_state`` / ``set_state``), ``close`` (grain workers) and
    ``skip_counts`` (unusable samples skipped per source, logged by the trainer) to the wrapped loader.
    """

    def __init__(self, it, keys):
        self._it, self._keys = it, tuple(keys)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        return {k: np.asarray(batch[k]) for k in self._keys if k in batch}

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)

    def skip_counts(self) -> dict[str, int]:
        counts = getattr(self._it, "skip_counts", None)
        return counts() if callable(counts) else {}

    def close(self) -> None:
        if callable(getattr(self._it, "close", None)):
            self._it.close()


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage gives the trainer.

    build_model(config, rngs) -> nnx.Module
        Constructs the model from ``config.model`` (its params carry logical axis names). Pure construction:
        it reads no file (the trainer traces it abstractly and inside its jitted init); pretrained weights
        come in through ``config.init`` sources (:mod:`defi_jax.weights`), which the stage's ``validate``
        requires for frozen pretrained towers (``weights.require_sources``).
    loss_fn(model, batch, rng, config) -> (scalar loss, dict of scalar metrics)
        Training loss on one device-resident batch; ``rng`` is a fresh key per step.
    make_data(config, process_index, process_count, split) -> DataIterator
        ``split`` is "train" or "eval"; the iterator yields numeric host-local batches.
    evaluate(model, config, workdir, step, eval_iter) -> dict of scalar metrics   (optional)
        Runs at ``config.train.eval_every``; may write samples (videos, images) under ``workdir``.
    resolve(config) -> None   (optional)
        Sets the keys that follow from the stage's own switches (the policy's ``policy.gidm_init=random`` empties
        ``init.sources.gidm.path``), before validation and before a run records its config
        (:func:`defi_jax.config_validation.resolve`); ``validate`` then only reads.
    validate(config) -> None   (optional)
        Extra config checks; raise ValueError naming the key. Reads the config, never writes it.
    batch_spec(config) -> dict of jax.ShapeDtypeStruct   (optional)
        Global batch shapes, so the train step can be compiled ahead of time without reading data.
    frozen(config) -> tuple of regexes   (optional)
        Parameters the stage freezes because of its own config keys (e.g. ``config.policy.finetune``), on top
        of ``config.train.frozen``; see :func:`frozen_patterns`.
    prepare(config) -> None   (optional)
        Runs before anything else of a run (e.g. the tiny policy trains the demo's GFDM / GIDM workdirs it starts
        from when they are missing).
    check_data(config) -> None   (optional)
        Checks, before the first step, that every dataset and split the run will read is there (one error
        listing every problem; ``data_pipelines.check_sources``), so a missing eval split does not end a long run.
    assets(config) -> dict of file name -> text   (optional)
        Files written to ``WORKDIR/assets/`` when a run starts (e.g. a policy's action statistics, which
        inference reads beside the checkpoint).
    """

    build_model: Callable[[Any, nnx.Rngs], nnx.Module]
    loss_fn: Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict]]
    make_data: Callable[[Any, int, int, str], DataIterator]
    evaluate: Callable[..., dict] | None = None
    validate: Callable[[Any], None] | None = None
    resolve: Callable[[Any], None] | None = None
    batch_spec: Callable[[Any], Mapping[str, jax.ShapeDtypeStruct]] | None = None
    frozen: Callable[[Any], tuple[str, ...]] | None = None
    assets: Callable[[Any], Mapping[str, str]] | None = None
    check_data: Callable[[Any], None] | None = None
    prepare: Callable[[Any], None] | None = None


def data_config(config, stage_keys: tuple[str, ...]):
    """``config.data`` without the stage's own keys (``stage_keys``, e.g. ``source``): what ``data_pipelines`` gets."""
    import ml_collections

    d = {k: v for k, v in config.data.to_dict().items() if k not in stage_keys}
    if isinstance(d.get("mixture"), dict):  # a ConfigDict cannot hold a plain dict: use the "name:w,..." form
        d["mixture"] = ",".join(f"{name}:{w}" for name, w in d["mixture"].items())
    return ml_collections.ConfigDict(d)


def jit_kwargs(config) -> dict:
    """``jax.jit`` keyword arguments of every compile of a run: ``config.train.compiler_options`` (XLA options)."""
    opts = config.train.compiler_options
    return {"compiler_options": dict(opts)} if opts else {}


def compute_dtype(config):
    """``config.train.compute_dtype`` as the ``dtype`` models take: None for float32 (the parameters' own)."""
    name = config.train.compute_dtype
    return None if name == "float32" else jax.numpy.dtype(name)


_EVAL_FNS: dict[str, tuple[Any, Any]] = {}


def eval_fns(name: str, config, graphdef: nnx.GraphDef, build: Callable[[nnx.GraphDef, Any], Any]):
    """``build(graphdef, config)`` (a stage's jitted evaluation functions), built once per run.

    Every evaluation of a run passes the same model structure and config, so it gets the functions jitted at
    the first one, and their compiled programs; another structure or config (a new run in the same process)
    builds again. One entry per stage ``name`` is kept, so an earlier run's programs are freed.
    """
    key = (graphdef, config.to_json_best_effort(sort_keys=True))
    cached = _EVAL_FNS.get(name)
    if cached is None or cached[0] != key:
        _EVAL_FNS[name] = cached = (key, build(graphdef, config))
    return cached[1]


_REGISTRY: dict[str, str] = {
    "toy": "defi_jax.toy:STAGE",
    "gfdm": "defi_jax.gfdm.stage:STAGE",
    "gidm": "defi_jax.gidm.stage:STAGE",
    "policy": "defi_jax.policy.stage:STAGE",
    "vae": "defi_jax.vae.stage:STAGE",
}


def get(name: str) -> Stage:
    if name not in _REGISTRY:
        raise ValueError(f"config.stage={name!r} is not one of {sorted(_REGISTRY)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def names() -> list[str]:
    return sorted(_REGISTRY)


def frozen_patterns(config) -> tuple[str, ...]:
    """Every frozen-parameter regex of a run: ``config.train.frozen`` plus the stage's own (``Stage.frozen``)."""
    own = get(config.stage).frozen
    return tuple(config.train.frozen) + (tuple(own(config)) if own is not None else ())
