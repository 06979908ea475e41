"""A training stage = a model + a loss + a data spec. The one trainer runs every stage.

Stages register by name (``config.stage``); modules are imported lazily so that running one stage never
imports another's dependencies.
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
    validate(config) -> None   (optional)
        Extra config checks; raise ValueError naming the key.
    batch_spec(config) -> dict of jax.ShapeDtypeStruct   (optional)
        Global batch shapes, so the train step can be compiled ahead of time without reading data.
    frozen(config) -> tuple of regexes   (optional)
        Parameters the stage freezes because of its own config keys (e.g. ``config.policy.finetune``), on top
        of ``config.train.frozen``; see :func:`frozen_patterns`.
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
    batch_spec: Callable[[Any], Mapping[str, jax.ShapeDtypeStruct]] | None = None
    frozen: Callable[[Any], tuple[str, ...]] | None = None
    assets: Callable[[Any], Mapping[str, str]] | None = None
    check_data: Callable[[Any], None] | None = None


_REGISTRY: dict[str, str] = {
    "toy": "defi_jax.toy:STAGE",
    "gfdm": "defi_jax.gfdm.stage:STAGE",
    "gidm": "defi_jax.gidm.stage:STAGE",
    "policy": "defi_jax.policy.stage:STAGE",
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
