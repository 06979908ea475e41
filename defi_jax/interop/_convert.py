"""PyTorch state dicts <-> Flax NNX parameters, by one table of name / transpose rules run both ways.

Shared by every interop module (diffusers SVD, transformers CLIP / DINOv2 / T5). API:

``Rule(pattern, replacement, ndim=None, perm=None)``
    A regex substitution from a dotted NNX parameter path (``down_blocks.0.resnets.0.conv1.kernel``) to
    a torch key. The rule applies when ``pattern`` matches (``re.search``) and, if given, the parameter has
    ``ndim`` dims. All matching rules apply in order (module renames, then a leaf rule); at most one may
    carry ``perm``, meaning ``nnx_value = torch_value.transpose(perm)``; the inverse is used on export.
``DEFAULT_RULES``
    What ``defi_jax.nn`` layers need: ``kernel`` -> ``weight`` with Linear ([in, out] vs [out, in]) and
    Conv 1d/2d/3d (channels-last vs channels-first) transposes, and norm ``scale`` -> ``weight``. Models
    whose attribute names mirror the torch module need nothing else; put model-specific renames first.
``torch_key(path, ndim, rules) -> (key, perm | None)``
``to_torch(module, rules, *, lazy=False) -> dict[str, np.ndarray]``
    Every ``nnx.Param`` as a torch-layout numpy array under its torch key (export). ``lazy=True``: each value
    is a ``Lazy`` tensor (shape, dtype, ``astype``; made when written), so ``write_safetensors`` streams a
    model with one tensor in memory beside it, not a second copy.
``from_torch(module, tensors, rules, *, what="model", ignore=(), dtype=None) -> module``
    Fills every ``nnx.Param`` of ``module`` (a concrete module or an ``nnx.eval_shape`` one, so nothing
    random is ever allocated) from ``tensors`` (arrays or ``Lazy``, read one at a time); returns the filled
    module (use the return value). Raises ``ValueError`` listing missing keys, unexpected keys and mis-shaped
    tensors (all of them, not just the first).
    ``ignore`` (regexes) drops torch keys that carry no parameters of ours (buffers such as position ids).
``read_safetensors(folder, weights_name, variant=None) -> dict[str, Lazy]``
    ``<weights_name>.safetensors`` or a sharded ``<weights_name>.safetensors.index.json``; never pickle.
    ``variant="fp16"`` reads ``<weights_name>.fp16.safetensors`` or
    ``<weights_name>.safetensors.index.fp16.json`` (the Hugging Face naming). Streamed: only the headers are
    read here; each tensor is read from its file when ``from_torch`` takes it (``lazy_safetensors``).
``lazy_safetensors(file) -> dict[str, Lazy]``
    One ``.safetensors`` file's tensors, each read with a plain positioned read when made: a loader holds the
    model plus one tensor (a memory-mapped file would keep every page it touched resident until unmapped).
    Local files or object-store URIs (``gs://``, through ``defi_jax.paths``: one ranged read per tensor), as
    ``read_safetensors`` folders.
``write_safetensors(tensors, folder, weights_name, max_shard_bytes=10 GB, variant=None)``
    One file, or shards plus the index JSON that ``from_pretrained`` reads; written tensor by tensor
    (``write_safetensors_file``), never serialized whole in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    replacement: str
    ndim: int | None = None
    perm: tuple[int, ...] | None = None


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(r"\.kernel$", ".weight", ndim=2, perm=(1, 0)),             # Linear [out, in] -> [in, out]
    Rule(r"\.kernel$", ".weight", ndim=3, perm=(2, 1, 0)),          # Conv1d [o, i, k] -> [k, i, o]
    Rule(r"\.kernel$", ".weight", ndim=4, perm=(2, 3, 1, 0)),       # Conv2d [o, i, kh, kw] -> [kh, kw, i, o]
    Rule(r"\.kernel$", ".weight", ndim=5, perm=(2, 3, 4, 1, 0)),    # Conv3d [o, i, kt, kh, kw] -> [kt, kh, kw, i, o]
    Rule(r"\.scale$", ".weight"),                                   # GroupNorm / LayerNorm gamma
)

_SAFETENSORS = ".safetensors"
_INDEX = ".safetensors.index.json"


def _dotted(path: Sequence) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def torch_key(path: str, ndim: int, rules: Iterable[Rule]) -> tuple[str, tuple[int, ...] | None]:
    """Torch key and transpose for one NNX parameter path (dotted) of ``ndim`` dims."""
    key, perm = path, None
    for rule in rules:
        if rule.ndim is not None and rule.ndim != ndim:
            continue
        if not re.search(rule.pattern, key):
            continue
        if rule.perm is not None:
            if perm is not None:
                raise ValueError(f"two transpose rules match parameter {path!r}")
            perm = rule.perm
        key = re.sub(rule.pattern, rule.replacement, key)
    return key, perm


def _params(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    state = nnx.state(module, nnx.Param)
    return [(_dotted(path), var) for path, var in nnx.to_flat_state(state)]


class Lazy:
    """A tensor made only when written: ``shape``, ``dtype``, ``nbytes`` and ``astype`` without the data."""

    def __init__(self, shape: Sequence[int], dtype, make):
        self.shape, self.dtype, self._make = tuple(int(d) for d in shape), np.dtype(dtype), make

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def astype(self, dtype) -> Lazy:
        return Lazy(self.shape, dtype, lambda: np.asarray(self._make()).astype(dtype))

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self._make())
        return arr if dtype is None else arr.astype(dtype)


def _torch_layout(var: nnx.Variable, perm) -> np.ndarray:
    value = np.asarray(jax.device_get(var.get_value()))
    return np.ascontiguousarray(value.transpose(np.argsort(perm)) if perm else value)


def to_torch(module: nnx.Module, rules: Iterable[Rule] = DEFAULT_RULES, *, lazy: bool = False) -> dict:
    """Every parameter in torch layout under its torch key (numpy, the parameter's dtype; ``Lazy`` if ``lazy``)."""
    rules = tuple(rules)
    out: dict = {}
    for path, var in _params(module):
        value = var.get_value()
        key, perm = torch_key(path, value.ndim, rules)
        if key in out:
            raise ValueError(f"two parameters map to torch key {key!r} (second: {path!r})")
        if lazy:
            shape = tuple(value.shape[i] for i in np.argsort(perm)) if perm else value.shape
            out[key] = Lazy(shape, value.dtype, lambda var=var, perm=perm: _torch_layout(var, perm))
        else:
            out[key] = _torch_layout(var, perm)
    return out


def from_torch(module: nnx.Module, tensors: Mapping[str, np.ndarray], rules: Iterable[Rule] = DEFAULT_RULES, *,
               what: str = "model", ignore: Iterable[str] = (), dtype=None) -> nnx.Module:
    """``module`` with every parameter taken from ``tensors`` (torch names and layouts); see the module doc.

    ``dtype``: cast to this dtype instead of each parameter's own (``param_dtype``).
    """
    rules = tuple(rules)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    used, missing, bad = set(), [], []
    for path, var in flat:
        dotted = _dotted(path)
        shape = tuple(var.get_value().shape)
        key, perm = torch_key(dotted, len(shape), rules)
        if key not in tensors:
            missing.append(f"{key} (ours: {dotted}, shape {shape})")
            continue
        used.add(key)
        src = tensors[key]
        want = tuple(shape[i] for i in np.argsort(perm)) if perm else shape
        if tuple(src.shape) != want:
            bad.append(f"{key}: file {tuple(src.shape)}, expected {want} (ours: {dotted} {shape})")
            continue
        # numpy, not jnp: an eager jnp transpose compiles one XLA program per distinct shape. A ``Lazy`` is read
        # here, so a streamed file holds one tensor at a time beside the module.
        arr = np.asarray(src)
        if perm:
            arr = np.transpose(arr, perm)
        var.set_value(jnp.asarray(np.ascontiguousarray(arr, dtype=np.dtype(dtype or var.get_value().dtype))))
    ignored = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in tensors if k not in used and not any(p.search(k) for p in ignored))
    if missing or unexpected or bad:
        lines = [f"cannot load {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title} tensor(s): " + "; ".join(shown))
        raise ValueError("\n".join(lines))
    for _, var in nnx.to_flat_state(rest):
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise ValueError(f"{what}: non-parameter state is abstract; build the module concretely")
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _names(weights_name: str, variant: str | None) -> tuple[str, str, str]:
    """(single file, index file, shard stem) as Hugging Face names them, with an optional variant."""
    if not variant:
        return weights_name + _SAFETENSORS, weights_name + _INDEX, weights_name
    return (f"{weights_name}.{variant}{_SAFETENSORS}", f"{weights_name}.safetensors.index.{variant}.json",
            f"{weights_name}.{variant}")


def read_safetensors(folder: str, weights_name: str, variant: str | None = None) -> dict[str, Lazy]:
    """Tensors of ``folder/<weights_name>.safetensors``, or of every shard listed in its index JSON, each a
    ``Lazy`` read from its file when made (``lazy_safetensors``)."""
    from defi_jax import paths

    single_name, index_name, _ = _names(weights_name, variant)
    single = paths.join(folder, single_name)
    index = paths.join(folder, index_name)
    if paths.exists(single):
        return lazy_safetensors(single)
    if paths.exists(index):
        weight_map = json.loads(paths.read_text(index))["weight_map"]
        out: dict[str, Lazy] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(lazy_safetensors(paths.join(folder, shard)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{index}: tensors listed but absent from the shards: {missing[:10]}")
        return out
    present = paths.listdir(folder) if paths.isdir(folder) else "folder does not exist"
    raise FileNotFoundError(f"no {single_name} or {index_name} in {folder} (found: {present}); only "
                            f"safetensors are read, never pickle (pass variant= for e.g. *.fp16.safetensors)")


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def lazy_safetensors(file: str) -> dict[str, Lazy]:
    """Every tensor of one ``.safetensors`` file as a ``Lazy``: the header is read (and checked against the file's
    size) now, each tensor's bytes when it is made, with a plain positioned read into a fresh array. Unlike a
    memory map, nothing stays resident once the caller drops the array, so a loader taking one tensor at a time
    holds one tensor beside what it built. A truncated or malformed file raises naming the file (and tensor).
    ``file`` may be an object-store URI (``gs://``): the header and each tensor are ranged reads."""
    codes = {v: np.dtype(jnp.dtype(k)) for k, v in _ST_DTYPES.items()}
    size = _size(file)
    with _open(file) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header size {n}")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file, or a truncated one ({e})") from None
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        dtype = codes.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{file}: tensor {key!r} has dtype {info.get('dtype')!r}, which this reader cannot hold")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (8 + n + int(o) for o in info["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > size:
            raise ValueError(f"{file}: tensor {key!r} ({info['dtype']} {list(shape)}) spans bytes {start}..{end} of "
                             f"a {size}-byte file: truncated or corrupt")
        out[key] = Lazy(shape, dtype, lambda start=start, shape=shape, dtype=dtype: _read_at(file, start, shape, dtype))
    return out


def _open(file: str):
    from defi_jax import paths
    return paths.open(file, "rb") if paths.is_remote(file) else open(file, "rb")


def _size(file: str) -> int:
    from defi_jax import paths
    if not paths.is_remote(file):
        return os.path.getsize(file)
    from etils import epath
    return int(epath.Path(file).stat().length)


def _read_at(file: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    with _open(file) as f:
        f.seek(offset)
        if hasattr(f, "readinto"):
            got = f.readinto(buffer)
        else:   # an object-store file without readinto (tf.io.gfile): one ranged read, copied into place
            data = f.read(out.nbytes)
            got = len(data)
            buffer[:got] = data
    if got != out.nbytes:
        raise ValueError(f"{file}: {got} of {out.nbytes} bytes at offset {offset}: the file changed while read")
    return out


def lazy_tensors(handle) -> dict[str, Lazy]:
    """Every tensor of an open ``safetensors.safe_open(path, framework="pt")`` handle as a ``Lazy`` (read when
    written): a file rewritten (e.g. cast) one tensor at a time."""
    import torch

    names = {v: k for k, v in _ST_DTYPES.items()}

    def read(key: str, dtype: np.dtype) -> np.ndarray:
        t = handle.get_tensor(key)
        if t.dtype == torch.bfloat16:     # numpy has no bfloat16 of its own: the bits, viewed as ml_dtypes'
            return t.view(torch.int16).numpy().view(dtype)
        return t.numpy()

    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        dtype = np.dtype(jnp.dtype(names[sl.get_dtype()]))
        out[key] = Lazy(sl.get_shape(), dtype, lambda key=key, dtype=dtype: read(key, dtype))
    return out


def write_safetensors_file(path: str, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file written tensor by tensor (arrays or ``Lazy``): the header from shapes and dtypes
    first, then each tensor's bytes, so at most one tensor is materialized at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        dtype = np.dtype(t.dtype)
        if dtype.name not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype.name}, which safetensors cannot hold")
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype.name], "shape": [int(d) for d in t.shape],
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in sorted(tensors):
            arr = np.asarray(tensors[key])
            arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
            if tuple(arr.shape) != tuple(header[key]["shape"]) or _ST_DTYPES[arr.dtype.name] != header[key]["dtype"]:
                raise ValueError(f"{path}: tensor {key!r} came out as {arr.dtype.name} {list(arr.shape)}, announced "
                                 f"{header[key]['dtype']} {header[key]['shape']}")
            f.write(arr.reshape(-1).view(np.uint8).data)


def write_safetensors(tensors: Mapping, folder: str, weights_name: str,
                      max_shard_bytes: int = 10 * 1024**3, variant: str | None = None) -> list[str]:
    """Writes one file or size-bounded shards plus the index JSON, streaming (``write_safetensors_file``);
    returns the file names written."""
    single_name, index_name, stem = _names(weights_name, variant)
    os.makedirs(folder, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(tensors):
        arr = tensors[key]
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    for stale in (single_name, index_name):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if len(shards) == 1:
        write_safetensors_file(os.path.join(folder, single_name), shards[0], metadata={"format": "pt"})
        return [single_name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}{_SAFETENSORS}"
        write_safetensors_file(os.path.join(folder, name), shard, metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(folder, index_name), "w") as f:
        json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names + [index_name]
