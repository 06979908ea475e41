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

The directory may be local or a ``gs://`` URI (through :mod:`defi_jax.paths`): ArrayRecord writes local files
only, so a shard for an object store is written to a local staging folder and uploaded when complete.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping

import grain
import msgpack
import numpy as np

from defi_jax import paths


def shard_name(split: str, process_index: int, process_count: int) -> str:
    return f"{split}-{process_index:05d}-of-{process_count:05d}"


def encode_record(latents_Thwc: np.ndarray, instruction: str, dataset: str = "") -> bytes:
    lat = np.ascontiguousarray(latents_Thwc, np.float32)
    return msgpack.packb({"latents": lat.tobytes(), "shape": list(lat.shape), "instruction": str(instruction),
                          "dataset": str(dataset)})


def decode_record(raw: bytes) -> dict:
    d = msgpack.unpackb(raw)
    lat = np.frombuffer(d["latents"], np.float32).reshape(d["shape"])
    return {"latents": lat, "instruction": d["instruction"], "dataset": d["dataset"]}


class ShardWriter:
    """Writes one process's shard of a split (records + a JSON sidecar with counts and shapes).

    ``out_dir`` local: written in place under a temporary name, renamed when complete. A URI (``gs://``):
    written to a local staging folder, uploaded on :meth:`close` (an object appears once its upload is
    complete), the staging folder removed. Either way a shard appears only complete, before its sidecar.
    """

    def __init__(self, out_dir: str, split: str, process_index: int, process_count: int, *,
                 scaling_factor: float, extra_meta: Mapping | None = None):
        from array_record.python import array_record_module

        name = shard_name(split, process_index, process_count)
        self.path, self.meta_path = paths.join(out_dir, name + ".array_record"), paths.join(out_dir, name + ".json")
        paths.makedirs(out_dir)
        if paths.is_remote(out_dir):
            self._staging = tempfile.mkdtemp(prefix="defi_jax_latents_")
            self._local = os.path.join(self._staging, name + ".array_record")
        else:
            self._staging, self._local = None, self.path + ".tmp"
        # group_size:1 keeps every record independently readable (random access for a global shuffle).
        self._writer = array_record_module.ArrayRecordWriter(self._local, "group_size:1")
        self.meta = {"num_records": 0, "latent_shape": None, "scaling_factor": float(scaling_factor),
                     "split": split, **dict(extra_meta or {})}

    def add(self, latents_Thwc: np.ndarray, instruction: str, dataset: str = "") -> None:
        shape = list(latents_Thwc.shape)
        if self.meta["latent_shape"] is None:
            self.meta["latent_shape"] = shape
        elif shape != self.meta["latent_shape"]:
            raise ValueError(f"{self.path}: latent shape {shape} differs from earlier records' "
                             f"{self.meta['latent_shape']}")
        self._writer.write(encode_record(latents_Thwc, instruction, dataset))
        self.meta["num_records"] += 1

    def close(self) -> None:
        self._writer.close()
        if self._staging is None:
            os.replace(self._local, self.path)  # a shard appears only once complete
        else:
            try:   # streamed: a shard can be larger than memory
                with open(self._local, "rb") as src, paths.open(self.path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            finally:
                shutil.rmtree(self._staging, ignore_errors=True)
        paths.write_text(self.meta_path, json.dumps(self.meta, indent=1))


def shard_paths(latents_dir: str, split: str) -> list[str]:
    """The split's shard files in ``latents_dir`` (local or URI), sorted."""
    names = paths.listdir(latents_dir) if paths.isdir(latents_dir) else []
    found = [paths.join(latents_dir, n) for n in names if fnmatch.fnmatch(n, f"{split}-*-of-*.array_record")]
    if not found:
        raise FileNotFoundError(f"config.data.latents_dir={latents_dir!r}: no {split}-*.array_record shards "
                                f"(write them with `python -m launch.precompute_latents`)")
    return found


def read_meta(latents_dir: str, split: str) -> dict:
    """Merged sidecar metadata of a split; checks the shards agree on shape and scaling factor."""
    metas = []
    for p in shard_paths(latents_dir, split):
        metas.append(json.loads(paths.read_text(p[: -len(".array_record")] + ".json")))
    for key in ("latent_shape", "scaling_factor"):
        values = {json.dumps(m[key]) for m in metas}
        if len(values) > 1:
            raise ValueError(f"{latents_dir}: {split} shards disagree on {key}: {sorted(values)}")
    return {**metas[0], "num_records": sum(m["num_records"] for m in metas)}


class _Prepare:
    """Record bytes -> example dict (a class, not a closure, so grain worker processes can pickle it)."""

    def __init__(self, transform, drop: tuple[str, ...]):
        self.transform, self.drop = transform, drop

    def __call__(self, raw: bytes) -> dict:
        ex = decode_record(raw)
        if self.transform is not None:
            ex = self.transform(ex)
        return {k: v for k, v in ex.items() if k not in self.drop}


def make_loader(latents_dir: str, split: str, *, global_batch_size: int, process_index: int, process_count: int,
                seed: int, transform: Callable[[dict], dict] | None = None, worker_count: int = 0,
                drop_keys: Iterable[str] = ("instruction", "dataset")):
    """Host-local batches ``{"latents": float32[b, T, h, w, 4], ...transform's keys}`` through grain.

    A global shuffle over every shard of the split, repeated forever; process ``i`` reads the
    ``i::process_count`` slice, so processes see disjoint examples. The iterator is checkpointable.
    """
    if global_batch_size % process_count:
        raise ValueError(f"config.train.batch_size={global_batch_size} is not divisible by {process_count} processes")
    local = global_batch_size // process_count
    source = grain.sources.ArrayRecordDataSource(shard_paths(latents_dir, split))
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].map(_Prepare(transform, tuple(drop_keys)))
    ds = ds.batch(local, drop_remainder=True).to_iter_dataset()
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)
