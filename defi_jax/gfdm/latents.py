"""Precomputed VAE latents of training clips in ArrayRecord, as the released GFDM recipe trains on.

Layout of a latents directory (``launch.precompute_latents`` writes it; ``config.data.source = "latents"``
with ``config.data.latents_dir`` reads it)::

    <split>-PPPPP-of-NNNNN.array_record   one record per clip, written by JAX process PPPPP of NNNNN
    <split>-PPPPP-of-NNNNN.json           {"num_records", "latent_shape" [T, h, w, 4], "scaling_factor", ...}

A record is msgpack ``{"latents": float32 bytes, "shape": [T, h, w, 4], "instruction": str,
"dataset": str}``; ``latents`` are the VAE posterior *mode* of each frame times ``scaling_factor`` (the
reference stores a posterior sample; the SVD VAE's posterior std is tiny and the mode makes the store
deterministic). The GFDM stage takes frame 0's latent (unscaled) as the condition, as the reference's
pre-encoded path does.

The directory may be local or a ``gs://`` URI: the shards are :mod:`defi_jax.records` stores (staged locally and
uploaded when complete).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import msgpack
import numpy as np

from defi_jax import records

_KEY, _WRITER = "config.data.latents_dir", "python -m launch.precompute_latents"


def encode_record(latents_Thwc: np.ndarray, instruction: str, dataset: str = "") -> bytes:
    lat = np.ascontiguousarray(latents_Thwc, np.float32)
    return msgpack.packb({"latents": lat.tobytes(), "shape": list(lat.shape), "instruction": str(instruction),
                          "dataset": str(dataset)})


def decode_record(raw: bytes) -> dict:
    d = msgpack.unpackb(raw)
    lat = np.frombuffer(d["latents"], np.float32).reshape(d["shape"])
    return {"latents": lat, "instruction": d["instruction"], "dataset": d["dataset"]}


class ShardWriter(records.ShardWriter):
    """One process's shard of latents (:class:`defi_jax.records.ShardWriter`; sidecar ``latent_shape`` and
    ``scaling_factor``)."""

    def __init__(self, out_dir: str, split: str, process_index: int, process_count: int, *,
                 scaling_factor: float, extra_meta: Mapping | None = None):
        super().__init__(out_dir, split, process_index, process_count, shape_key="latent_shape",
                         meta={"scaling_factor": float(scaling_factor), **dict(extra_meta or {})})

    def add(self, latents_Thwc: np.ndarray, instruction: str, dataset: str = "") -> None:
        super().add(encode_record(latents_Thwc, instruction, dataset), np.shape(latents_Thwc))


def shard_paths(latents_dir: str, split: str) -> list[str]:
    """The split's shard files in ``latents_dir`` (local or URI), sorted."""
    return records.shard_paths(latents_dir, split, key=_KEY, writer=_WRITER)


def read_meta(latents_dir: str, split: str) -> dict:
    """Merged sidecar metadata of a split; checks the shards agree on shape and scaling factor."""
    return records.read_meta(shard_paths(latents_dir, split), latents_dir, split, ("latent_shape", "scaling_factor"))


def make_loader(latents_dir: str, split: str, *, global_batch_size: int, process_index: int, process_count: int,
                seed: int, transform: Callable[[dict], dict] | None = None, worker_count: int = 0,
                drop_keys: Iterable[str] = ("instruction", "dataset")):
    """Host-local batches ``{"latents": float32[b, T, h, w, 4], ...transform's keys}`` through grain
    (:func:`defi_jax.records.make_loader`: a global shuffle, repeated, disjoint per process, checkpointable)."""
    return records.make_loader(shard_paths(latents_dir, split), decode_record, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count, seed=seed,
                               transform=transform, worker_count=worker_count, drop_keys=drop_keys)
