"""Sharded ArrayRecord stores of precomputed examples: what a stage reads instead of computing it every step.

Layout of a store (one per kind of example; ``defi_jax.gfdm.latents`` for VAE latents, ``defi_jax.policy.features``
for the policy's GFDM features)::

    <split>-PPPPP-of-NNNNN.array_record   one record per example, written by JAX process PPPPP of NNNNN
    <split>-PPPPP-of-NNNNN.json           {"num_records", <shape key>, ...}, written after its shard

The directory may be local or a ``gs://`` URI (through :mod:`defi_jax.paths`): ArrayRecord writes local files only,
so a shard for an object store is written to a local staging folder and uploaded when complete.
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


def encode_arrays(arrays: Mapping[str, np.ndarray], **strings: str) -> bytes:
    """msgpack ``{name: {"data", "shape", "dtype"}}`` of numeric arrays, plus plain string fields."""
    out = {k: {"data": np.ascontiguousarray(v).tobytes(), "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.str}
           for k, v in arrays.items()}
    return msgpack.packb(out | {k: str(v) for k, v in strings.items()})


def decode_arrays(raw: bytes) -> dict:
    """:func:`encode_arrays`'s record back: arrays (read-only views of the record) and strings."""
    d = msgpack.unpackb(raw)
    return {k: (np.frombuffer(v["data"], np.dtype(v["dtype"])).reshape(v["shape"]) if isinstance(v, dict) else v)
            for k, v in d.items()}


class ShardWriter:
    """Writes one process's shard of a split (records + a JSON sidecar with the count and ``shape_key``).

    ``out_dir`` local: written in place under a temporary name, renamed when complete. A URI (``gs://``):
    written to a local staging folder, uploaded on :meth:`close` (an object appears once its upload is
    complete), the staging folder removed. Either way a shard appears only complete, before its sidecar.
    """

    def __init__(self, out_dir: str, split: str, process_index: int, process_count: int, *, shape_key: str,
                 meta: Mapping | None = None):
        from array_record.python import array_record_module

        name = shard_name(split, process_index, process_count)
        self.path, self.meta_path = paths.join(out_dir, name + ".array_record"), paths.join(out_dir, name + ".json")
        paths.makedirs(out_dir)
        if paths.is_remote(out_dir):
            self._staging = tempfile.mkdtemp(prefix="defi_jax_records_")
            self._local = os.path.join(self._staging, name + ".array_record")
        else:
            self._staging, self._local = None, self.path + ".tmp"
        # group_size:1 keeps every record independently readable (random access for a global shuffle).
        self._writer = array_record_module.ArrayRecordWriter(self._local, "group_size:1")
        self.shape_key = shape_key
        self.meta = {"num_records": 0, shape_key: None, "split": split, **dict(meta or {})}

    def add(self, raw: bytes, shape) -> None:
        """One encoded record whose main array has ``shape`` (every record of a shard has the same)."""
        shape = [int(s) for s in shape]
        if self.meta[self.shape_key] is None:
            self.meta[self.shape_key] = shape
        elif shape != self.meta[self.shape_key]:
            raise ValueError(f"{self.path}: {self.shape_key} {shape} differs from earlier records' "
                             f"{self.meta[self.shape_key]}")
        self._writer.write(raw)
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


def shard_paths(root: str, split: str, *, key: str, writer: str) -> list[str]:
    """The split's shard files in ``root`` (local or URI), sorted; ``key`` names the config key that set ``root``,
    ``writer`` the command that writes such a store (both for the error)."""
    names = paths.listdir(root) if paths.isdir(root) else []
    found = [paths.join(root, n) for n in names if fnmatch.fnmatch(n, f"{split}-*-of-*.array_record")]
    if not found:
        raise FileNotFoundError(f"{key}={root!r}: no {split}-*.array_record shards (write them with `{writer}`)")
    return sorted(found)


def read_meta(shards: list[str], root: str, split: str, agree: Iterable[str]) -> dict:
    """The shards' merged sidecars (``num_records`` summed); the ``agree`` keys must be equal in every shard."""
    metas = [json.loads(paths.read_text(p[: -len(".array_record")] + ".json")) for p in shards]
    for key in agree:
        values = {json.dumps(m.get(key)) for m in metas}
        if len(values) > 1:
            raise ValueError(f"{root}: {split} shards disagree on {key}: {sorted(values)}")
    return {**metas[0], "num_records": sum(m["num_records"] for m in metas)}


class _Prepare:
    """Record bytes -> example dict (a class, not a closure, so grain worker processes can pickle it)."""

    def __init__(self, decode, transform, drop: tuple[str, ...]):
        self.decode, self.transform, self.drop = decode, transform, drop

    def __call__(self, raw: bytes) -> dict:
        ex = self.decode(raw)
        if self.transform is not None:
            ex = self.transform(ex)
        return {k: v for k, v in ex.items() if k not in self.drop}


def make_loader(shards: list[str], decode: Callable[[bytes], dict], *, global_batch_size: int, process_index: int,
                process_count: int, seed: int, transform: Callable[[dict], dict] | None = None,
                worker_count: int = 0, drop_keys: Iterable[str] = ()):
    """Host-local batches of decoded (and ``transform``-ed) records through grain.

    A global shuffle over every shard, repeated forever; process ``i`` reads the ``i::process_count`` slice, so
    processes see disjoint examples. The iterator is checkpointable.
    """
    if global_batch_size % process_count:
        raise ValueError(f"config.train.batch_size={global_batch_size} is not divisible by {process_count} processes")
    local = global_batch_size // process_count
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards)).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].map(_Prepare(decode, transform, tuple(drop_keys)))
    # Read ahead two batches of records, not grain's default 500 elements: batched before reading ahead, those
    # were 500 batches (37 GB of the demo's 1.2 MB feature records at batch 64).
    read = grain.ReadOptions(num_threads=min(4, local), prefetch_buffer_size=2 * local)
    ds = ds.to_iter_dataset(read).batch(local, drop_remainder=True)
    if worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ds)
