"""Pretrained weights into a stage's parameters: the ``config.init`` table, read once on the host.

Every stage shares one table. ``config.init.sources.<name>`` maps a sub-tree of the model (``target``, a
regex matched at the start of parameter paths such as ``unet/conv_in/kernel``) to a source::

    c.init.sources.dinov2 = weights.source("^dino_encoder/", "hf_dinov2")     # path set on the command line
    python -m launch.train ... --config.init.sources.dinov2.path=/ckpt/dinov2-with-registers-base

An entry with an empty ``path`` is inactive. Kinds (what ``path`` points at):

  diffusers_unet / diffusers_vae   a diffusers folder (``diffusion_pytorch_model.safetensors`` or shards)
  hf_clip_text                     a transformers CLIPTextModel / CLIPModel folder (text tower)
  hf_dinov2                        a transformers Dinov2WithRegistersModel folder
  torch_hub_dinov2                 the facebookresearch/dinov2 state dict (``.safetensors``, or ``.pth``
                                   read with ``torch.load(weights_only=True)``)
  hf_t5_encoder                    a transformers T5 / T5EncoderModel folder
  reference_policy                 the reference DeFI's stage-3 checkpoint (``saved_models/last.pt``, read with
                                   ``weights_only=True``; or ``.safetensors``): its tensors under our full
                                   parameter paths (``defi_jax.interop.defi_policy``), so ``target`` must match
                                   without consuming the path, e.g. ``"^(?!gfdm/)"`` (all but the GFDM, which
                                   the file does not hold) or ``"^(?!gfdm/(unet|vae)/)"`` (+ the GFDM's text)
  reference_gidm                   the reference DeFI's stage-2 checkpoint (Lightning ``.ckpt`` / ``.pt`` read with
                                   ``weights_only=True``, or ``.safetensors``; ``lam.`` dropped), or the
                                   ``gidm/model.safetensors`` of our GIDM export: the latent action model and
                                   trainable (tiny) towers under the reference's names
                                   (``defi_jax.interop.defi_torch.GIDM_RULES``); its frozen DINOv2 / T5 enter
                                   through ``torch_hub_dinov2`` / ``hf_t5_encoder`` sources on the same file with
                                   ``prefix="dino_encoder."`` / ``"text_encoder."``
  torch_export                     a policy folder of ``launch.export_torch`` (``policy/`` + ``gidm/``
                                   ``model.safetensors``): ``video_former/``, ``head/`` and ``latent_actions/``
                                   under the reference's stage-3 names (``defi_jax.interop.import_stages``);
                                   target ``"^(?=(video_former|head|latent_actions)/)"`` (a lookahead: it maps
                                   full paths; the GFDM and goal towers come from the folder's diffusers /
                                   transformers sub-folders)
  feature_stats                    a ``launch.precompute_features`` folder: the GFDM features' per-channel
                                   ``mean`` and ``std`` (its ``feature_stats.safetensors``), for
                                   ``model.center_features`` / ``scale_features``
  workdir                          another stage's workdir: its parameters at ``step`` (-1 = latest), the
                                   EMA with ``ema=True``; ``prefix`` is the sub-tree of that model read
                                   (the part of our path matched by ``target`` is replaced by ``prefix``)

Every ``path`` may be local or an object-store URI (``gs://bucket/...``): folders are listed and safetensors
read through :mod:`defi_jax.paths` (a ranged read per tensor); a torch file (``.pth`` / ``.pt`` / ``.ckpt``, still
``torch.load(weights_only=True)``) or a reference checkpoint read with a prefix is first copied, streamed, to a
temporary local file (:func:`local_file`).

For the file kinds, ``prefix`` names the sub-tree of the file read: only its tensors, with ``prefix`` dropped
from their names (a frozen tower stored inside another model's checkpoint). A single file read with a prefix is
read as a reference checkpoint (``defi_torch.read_state_dict``: a Lightning ``state_dict`` unwrapped, ``lam.``
dropped), so ``prefix="dino_encoder."`` finds ``lam.dino_encoder.*`` in ``.ckpt`` / ``.pt`` / ``.safetensors``.

The name / transpose tables are the interop modules' (``defi_jax.interop``). :func:`load_init_params` reads
every active source once, outside any trace, streamed: of a safetensors file only the header is read up
front, each tensor when its parameter is placed (a plain read, nothing mapped stays resident), straight into
its sharding, so host memory holds the placed parameters plus one tensor. The trainer passes the arrays to its
jitted init as arguments (donated: each becomes its slot of the state) and no weight becomes a constant of a
compiled program. Missing and mis-shaped tensors of all sources are reported together, by name, with both shapes.

``config.init.allow_random`` (False): a stage's validation refuses a frozen pretrained tower (DINOv2, T5,
the GFDM's VAE / CLIP text) without a source, unless this is set (tests, debugging).
``config.init.svd_path`` / ``config.init.clip_path`` (the GFDM's README keys) fill the ``unet`` / ``vae``
(``<svd_path>/unet``, ``<svd_path>/vae``) and ``text_encoder`` sources whose own path is empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from defi_jax import paths

_log = logging.getLogger(__name__)

# Folder keys kept for the README's commands: key -> ((source name, sub-folder), ...).
FOLDER_KEYS = {"svd_path": (("unet", "unet"), ("vae", "vae")), "clip_path": (("text_encoder", ""),)}


def source(target: str, kind: str, path: str = "", *, prefix: str = "", step: int = -1,
           ema: bool = False) -> ml_collections.ConfigDict:
    """One ``config.init.sources`` entry (inactive while ``path`` is empty)."""
    if kind not in KINDS:
        raise ValueError(f"weights source kind {kind!r} is not one of {sorted(KINDS)}")
    return ml_collections.ConfigDict(dict(target=target, kind=kind, path=path, prefix=prefix, step=step, ema=ema))


def init_config() -> ml_collections.ConfigDict:
    """``config.init`` of the base config: no sources, random towers refused."""
    return ml_collections.ConfigDict(dict(allow_random=False, sources=ml_collections.ConfigDict()))


@dataclasses.dataclass(frozen=True)
class Active:
    """An active source: ``key`` is the config key that set its path (for error messages)."""
    name: str
    key: str
    target: str
    kind: str
    path: str
    prefix: str = ""
    step: int = -1
    ema: bool = False


def active_sources(config) -> list[Active]:
    """The entries of ``config.init.sources`` with a path (``svd_path`` / ``clip_path`` filled in)."""
    init = config.get("init", None) or {}
    sources = dict(init.get("sources", None) or {})
    out = []
    for name, entry in sorted(sources.items()):
        entry = dict(entry)
        path, key = entry.get("path", ""), f"config.init.sources.{name}.path"
        if not path:
            for folder_key, fills in FOLDER_KEYS.items():
                for filled, sub in fills:
                    if filled == name and init.get(folder_key, ""):
                        path, key = paths.join(init[folder_key], sub) if sub else init[folder_key], \
                            f"config.init.{folder_key}"
        if not path:
            continue
        if entry.get("kind") not in KINDS:
            raise ValueError(f"config.init.sources.{name}.kind={entry.get('kind')!r} is not one of {sorted(KINDS)}")
        try:
            re.compile(entry.get("target", ""))
        except re.error as e:
            raise ValueError(f"config.init.sources.{name}.target={entry.get('target')!r}: not a regex: {e}") from None
        out.append(Active(name=name, key=key, target=entry["target"], kind=entry["kind"], path=path,
                          prefix=entry.get("prefix", ""), step=int(entry.get("step", -1)),
                          ema=bool(entry.get("ema", False))))
    return out


def require_sources(config, towers: Mapping[str, str]) -> None:
    """Stage validation: every frozen pretrained tower has a source, unless ``config.init.allow_random``.

    ``towers``: source name -> the tower's path prefix in the model (``{"dinov2": "dino_encoder/"}``).
    """
    init = config.get("init", None) or {}
    if init.get("allow_random", False):
        return
    from defi_jax import stage as stage_lib
    frozen = [re.compile(p) for p in stage_lib.frozen_patterns(config)]
    covered = [s.target for s in active_sources(config)]
    lines = []
    for name, prefix in towers.items():
        if not any(r.search(prefix) for r in frozen) or any(re.match(t, prefix) for t in covered):
            continue
        also = [f"config.init.{k}" for k, fills in FOLDER_KEYS.items() if name in (f for f, _ in fills)
                and k in init]
        lines.append(f"config.init.sources.{name}.path is empty{' (and ' + ', '.join(also) + ')' if also else ''}, "
                     f"but {prefix}* is frozen (config.train.frozen): the run would keep a randomly initialised "
                     f"{name}")
    if lines:
        raise ValueError("; ".join(lines) + ". Point the source at the pretrained weights, or set "
                         "config.init.allow_random=True (tests, debugging).")


# ------------------------------------------------------------------------------------------ reading

def _is_file(path: str) -> bool:
    return paths.exists(path) and not paths.isdir(path)


@contextlib.contextmanager
def local_file(path: str):
    """``path`` as a local file, for the readers that need one (``torch.load``, a memory map): a local path is
    itself; an object-store URI (``gs://``) is copied through :mod:`defi_jax.paths` (streamed, 64 MiB at a time)
    into a temporary folder, removed when the block ends (arrays mapped from it stay valid: the mapping outlives
    the unlinked file). Errors raised inside name ``path``, not the copy."""
    if not paths.is_remote(path):
        yield path
        return
    if not _is_file(path):
        raise FileNotFoundError(f"{path} does not exist (or is a folder)")
    with tempfile.TemporaryDirectory(prefix="defi_jax_weights-") as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
        with paths.open(path, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 64 << 20)
        try:
            yield local
        except (OSError, ValueError) as e:
            if local in str(e) and len(e.args) == 1:
                raise type(e)(str(e).replace(local, path)) from e
            raise


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_mmap(file: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a read-only view of the memory-mapped file (no copy).

    The format is an 8-byte little-endian header size, a JSON header (dtype, shape, byte offsets per
    tensor), then the raw bytes; bfloat16 is viewed through ``ml_dtypes``.
    """
    import ml_dtypes

    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def _read_torch(file: str) -> dict[str, np.ndarray]:
    """A torch state-dict file, read with ``weights_only=True`` (tensors only: never a full unpickle)."""
    import torch

    sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def _sub_tree(tensors: dict[str, np.ndarray], prefix: str, path: str) -> dict[str, np.ndarray]:
    """The tensors named ``prefix...``, ``prefix`` dropped (all of them for an empty prefix)."""
    if not prefix:
        return tensors
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not out:
        raise FileNotFoundError(f"{path}: no tensor named {prefix}* (the source's prefix)")
    return out


def _read(path: str, weights_name: str, prefix: str = "") -> dict[str, np.ndarray]:
    """A folder's ``<weights_name>.safetensors`` (or shards) or one file, local or ``gs://`` alike: safetensors
    streamed (headers now, each tensor when placed: ``_convert``'s readers, ranged reads on an object store);
    torch files and towers inside a reference checkpoint through :func:`local_file`."""
    from defi_jax.interop import _convert, defi_torch

    is_file = _is_file(path)   # (two round trips on an object store: asked once)
    if is_file and prefix:   # a tower inside a reference checkpoint (Lightning, ``lam.`` dropped)
        with local_file(path) as local:
            return _sub_tree(defi_torch.read_state_dict(local), prefix, path)
    if is_file and path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        with local_file(path) as local:
            return _read_torch(local)
    tensors = _convert.lazy_safetensors(path) if is_file else _convert.read_safetensors(path, weights_name)
    return _sub_tree(tensors, prefix, path)


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of source is read: ``read(path, prefix="")`` gives the tensors (torch names, torch layouts);
    ``rules()`` the name / transpose table, or ``key(path, ndim) -> (torch name, transpose)`` for kinds whose
    names depend on the sub-tree (``torch_export``)."""
    read: Callable[..., dict[str, np.ndarray]]
    rules: Callable[[], tuple] = tuple
    key: Callable[[str, int], tuple] | None = None

    def torch_key(self, path: str, ndim: int) -> tuple:
        from defi_jax.interop._convert import torch_key
        return self.key(path, ndim) if self.key is not None else torch_key(path, ndim, self.rules())


def _diffusers(model: str) -> Kind:
    def rules():
        from defi_jax.interop import diffusers_svd
        return diffusers_svd.UNET_RULES if model == "unet" else diffusers_svd.VAE_RULES
    return Kind(read=lambda p, prefix="": _read(p, "diffusion_pytorch_model", prefix), rules=rules)


def _clip_rules():
    from defi_jax.interop import hf_clip
    return hf_clip.RULES


def _dinov2_rules():
    from defi_jax.interop import hf_dinov2
    return hf_dinov2.RULES


def _t5_rules():
    from defi_jax.interop import hf_t5
    return hf_t5.RULES


def _gidm_rules():
    from defi_jax.interop import defi_torch
    return defi_torch.GIDM_RULES


def _read_clip(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    return {k.removeprefix("text_model."): v for k, v in _read(path, "model", prefix).items()}


def _read_dinov2(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    from defi_jax.interop import hf_dinov2
    out = {}
    for k, v in _read(path, "model", prefix).items():
        k = k.removeprefix("dinov2_with_registers.")
        for pattern, replacement in hf_dinov2._V5_TO_V4:  # transformers 5 names -> the rules' v4 names
            k = pattern.sub(replacement, k)
        out[k] = v
    return out


def _read_torch_hub_dinov2(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    from defi_jax.interop import hf_dinov2
    return hf_dinov2.hub_to_hf_names(_read(path, "model", prefix))


def _read_t5(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    out = _read(path, "model", prefix)
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out.pop("encoder.embed_tokens.weight")
    return out


def _whole_file(read: Callable[[str], dict[str, np.ndarray]], kind: str) -> Callable[..., dict[str, np.ndarray]]:
    def read_all(path: str, prefix: str = "") -> dict[str, np.ndarray]:
        if prefix:
            raise ValueError(f"a {kind} source reads the whole file: its prefix must be empty (got {prefix!r})")
        return read(path)
    return read_all


def _read_reference_policy(path: str) -> dict[str, np.ndarray]:
    from defi_jax.interop import defi_policy
    with local_file(path) as local:
        params, _ = defi_policy.reference_policy_params(defi_policy.read_reference_checkpoint(local))
    return {k.replace("/", "."): v for k, v in params.items()}


def _read_reference_gidm(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    from defi_jax.interop import defi_torch
    with local_file(path) as local:
        return _sub_tree(defi_torch.read_state_dict(local), prefix, path)


def _read_torch_export(path: str) -> dict[str, np.ndarray]:
    from defi_jax.interop import import_stages
    return import_stages.read_policy_export(path)


def _read_feature_stats(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    from defi_jax.policy import features
    return features.read_stats(path, prefix)


def _torch_export_key(path: str, ndim: int) -> tuple:
    from defi_jax.interop import import_stages
    return import_stages.policy_export_key(path, ndim)


KINDS: dict[str, Kind | None] = {
    "diffusers_unet": _diffusers("unet"),
    "diffusers_vae": _diffusers("vae"),
    "hf_clip_text": Kind(read=_read_clip, rules=_clip_rules),
    "hf_dinov2": Kind(read=_read_dinov2, rules=_dinov2_rules),
    "torch_hub_dinov2": Kind(read=_read_torch_hub_dinov2, rules=_dinov2_rules),
    "hf_t5_encoder": Kind(read=_read_t5, rules=_t5_rules),
    "reference_policy": Kind(read=_whole_file(_read_reference_policy, "reference_policy")),   # our names already
    "reference_gidm": Kind(read=_read_reference_gidm, rules=_gidm_rules),
    "torch_export": Kind(read=_whole_file(_read_torch_export, "torch_export"), key=_torch_export_key),
    "feature_stats": Kind(read=_read_feature_stats),   # a launch.precompute_features folder: {"mean", "std": [C]}
    "workdir": None,   # read through defi_jax.checkpoint.restore_params
}


# ------------------------------------------------------------------------------------------ loading

def _place(value: np.ndarray, like: jax.ShapeDtypeStruct) -> jax.Array:
    """``value`` (host, possibly a memory-mapped view) as a global array in ``like``'s sharding; every
    process copies only the slices of its own devices."""
    dtype = np.dtype(like.dtype)
    return jax.make_array_from_callback(tuple(like.shape), like.sharding,
                                        lambda index: np.ascontiguousarray(value[index], dtype=dtype))


def load_init_params(config, abstract: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Reads every active ``config.init`` source; returns ``path -> array`` in each parameter's sharding.

    ``abstract``: ``"unet/conv_in/kernel" -> ShapeDtypeStruct`` (with sharding and the dtype to store) of
    every parameter the sources may fill. Raises ``ValueError`` listing every missing / mis-shaped tensor of
    every source (and parameters claimed by two sources); ``FileNotFoundError`` naming the config key.
    """
    out: dict[str, jax.Array] = {}
    claimed: dict[str, str] = {}
    problems: list[str] = []
    for src in active_sources(config):
        matched = {}
        for path, like in abstract.items():
            m = re.match(src.target, path)
            if m:
                matched[path] = (path[m.end():], like)
        if not matched:
            problems.append(f"{src.key}: target {src.target!r} matches no parameter of the model")
            continue
        twice = sorted(p for p in matched if p in claimed)
        if twice:
            problems.append(f"{src.key}: parameters also filled by {claimed[twice[0]]}: {', '.join(twice)}")
            continue
        claimed |= {p: src.key for p in matched}
        if src.kind == "workdir":
            from defi_jax import checkpoint
            try:
                got = checkpoint.restore_params(src.path, None if src.step < 0 else src.step, ema=src.ema,
                                                prefix=src.prefix, target={rel: like for rel, like in matched.values()})
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{src.key}={src.path!r}: {e}")
                continue
            out |= {path: got[rel] for path, (rel, _) in matched.items()}
            _log.info("init: %d parameters from %s (%s)", len(matched), src.path, src.key)
            continue
        kind = KINDS[src.kind]
        try:
            tensors = kind.read(src.path, src.prefix)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{src.key}={src.path!r} ({src.kind}): {e}") from None
        missing, bad, used = [], [], set()
        for path, (rel, like) in matched.items():
            shape = tuple(like.shape)
            key, perm = kind.torch_key(rel.replace("/", "."), len(shape))
            if key not in tensors:
                missing.append(f"{key} (ours: {path} {shape})")
                continue
            used.add(key)
            value = tensors[key]
            want = tuple(shape[i] for i in np.argsort(perm)) if perm else shape
            if tuple(value.shape) != want:
                bad.append(f"{key}: file {tuple(value.shape)}, expected {want} (ours: {path} {shape})")
                continue
            value = np.asarray(value)   # a streamed (``Lazy``) tensor is read now: one at a time beside the placed
            out[path] = _place(np.transpose(value, perm) if perm else value, like)
        if missing or bad:
            lines = [f"{src.key}={src.path!r} ({src.kind}):"]
            lines += [f"  missing {m}" for m in missing] + [f"  mis-shaped {b}" for b in bad]
            problems.append("\n".join(lines))
        else:
            _log.info("init: %d parameters from %s (%s; %d tensors of the source unused)", len(matched), src.path,
                      src.key, len(tensors) - len(used))
        tensors = value = None   # the last tensor read is not kept beside the next source's
    if problems:
        raise ValueError("config.init: cannot load the pretrained weights:\n" + "\n".join(problems))
    return out
