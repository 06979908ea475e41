"""Import / export of the reference DeFI PyTorch checkpoints (LogosRoboticsGroup/DeFi).

GIDM (stage 2): ``load_gidm(path)`` reads the reference's latent action model weights: a Lightning
``.ckpt`` (``{"state_dict": {"lam.encoder...": ...}}``), a bare torch state dict (``.pt``/``.pth``/``.bin``)
or a ``.safetensors`` file, with or without the ``lam.`` prefix. Torch files are read with
``torch.load(weights_only=True)``; a Lightning checkpoint's non-tensor extras (hyper-parameters naming
optimizer classes) are replaced by inert stand-ins, never imported or executed.

The name mapping is one rule table run in both directions (``gidm_state_dict`` / ``load_gidm_state_dict``):
the JAX parameter path and the torch key differ only by ``nnx.Sequential``'s ``layers`` level and the leaf
name / layout of each layer kind (``_LEAF_RULES``). The frozen DINOv2 (``dino_encoder.*``, torch-hub
names) and T5 (``text_encoder.*``, transformers names) sub-trees are handed to the encoders' own interop
(``defi_jax.interop.hf_dinov2`` / ``hf_t5``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from defi_jax.interop._convert import DEFAULT_RULES, Rule

_PREFIX = "lam."


# ---------------------------------------------------------------------------------------------------
# Reading torch / safetensors files without unpickling arbitrary objects
# ---------------------------------------------------------------------------------------------------

def _inert_class(module: str, name: str) -> type:
    """A do-nothing stand-in carrying ``module.name`` so torch's weights-only unpickler accepts it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    cls = type(name.split(".")[-1], (), {"__init__": __init__, "__setstate__": __setstate__,
                                          "__module__": module, "__qualname__": name})
    return cls


def _torch_load(path: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:      # noqa: BLE001
            raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
        if not names:
            raise ValueError(f"{path}: torch.load(weights_only=True) failed: {err}") from err
        stubs = []
        for full in names:
            module, _, name = full.rpartition(".")
            stubs.append(_inert_class(module, name))
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat ``{name: float32 numpy}`` from a safetensors / torch / Lightning file; ``lam.`` stripped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GIDM checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from defi_jax.weights import read_safetensors_mmap
        raw = read_safetensors_mmap(path)   # float32 tensors stay views of the mapped file
    else:
        obj = _torch_load(path)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict (or a Lightning checkpoint), got {type(obj).__name__}")
        raw = {}
        for k, v in obj.items():
            if hasattr(v, "detach"):
                raw[k] = v.detach().to(dtype=__import__("torch").float32).cpu().numpy() \
                    if v.is_floating_point() else v.detach().cpu().numpy()
    if any(k.startswith(_PREFIX) for k in raw):
        raw = {k[len(_PREFIX):]: v for k, v in raw.items() if k.startswith(_PREFIX)}
    return {k: np.asarray(v, np.float32) if _is_float(v) else np.asarray(v) for k, v in raw.items()}


def _is_float(x) -> bool:
    return np.asarray(x).dtype.kind == "f" or np.asarray(x).dtype.name == "bfloat16"


# ---------------------------------------------------------------------------------------------------
# The rule table
# ---------------------------------------------------------------------------------------------------

def _t2(x):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


# JAX leaf -> (torch leaf, JAX->torch, torch->JAX), keyed also by rank where layouts differ.
_LEAF_RULES: dict[tuple[str, int], tuple[str, Any, Any]] = {
    ("kernel", 2): ("weight", _t2, _t2),                                   # nn.Linear [out, in]
    ("kernel", 4): ("weight", lambda x: np.transpose(x, (3, 2, 0, 1)),     # nn.Conv2d [out, in, kh, kw]
                    lambda x: np.transpose(x, (2, 3, 1, 0))),
    ("scale", 1): ("weight", None, None),                                  # nn.LayerNorm
    ("bias", 1): ("bias", None, None),
    ("embedding", 2): ("weight", None, None),                              # nn.Embedding
}
# Whole-path rules where the torch module has no layer-kind leaf of ours.
_PATH_RULES = {
    "vq.codebook": "vq.codebook.weight",   # nn.Embedding in the reference, a bare Param here
    "action_latent": "action_latent",
}


# The same table as ``_convert.Rule`` s (our dotted path -> reference key), for ``config.init`` sources of kind
# ``reference_gidm`` (``defi_jax.weights``): the latent action model and the tiny config's trainable towers.
GIDM_RULES: tuple[Rule, ...] = (
    Rule(r"(^|\.)layers\.", r"\1"),                       # nnx.Sequential's extra level
    Rule(r"^vq\.codebook$", _PATH_RULES["vq.codebook"]),
    Rule(r"\.embedding$", ".weight", ndim=2),
    *DEFAULT_RULES,
)


def _lam_params(model, *, with_towers: bool = True) -> dict[tuple, nnx.Variable]:
    """Parameters mapped by the table: the latent action model plus, with ``with_towers``, the tiny
    config's trainable encoder towers. Reference towers (DINOv2 / T5) go through their own interop."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] in ("dino_encoder", "text_encoder"):
            reference = (model.visual_encoder_kind == "dinov2") if path[0] == "dino_encoder" \
                else (model.text_encoder_kind == "t5")
            if reference or not with_towers:
                continue
        out[tuple(path)] = var
    return out


def _name_and_rule(path: tuple, value_ndim: int) -> tuple[str, Any, Any]:
    """Our parameter path -> (reference state-dict key, JAX->torch, torch->JAX)."""
    dotted = ".".join(str(p) for p in path if p != "layers")   # drop nnx.Sequential's extra level
    if dotted in _PATH_RULES:
        return _PATH_RULES[dotted], None, None
    leaf = str(path[-1])
    rule = _LEAF_RULES.get((leaf, value_ndim))
    if rule is None:
        raise KeyError(f"no interop rule for parameter {'/'.join(map(str, path))} (leaf {leaf!r}, rank {value_ndim})")
    torch_leaf, to_t, to_j = rule
    return dotted.rsplit(".", 1)[0] + "." + torch_leaf, to_t, to_j


def unexpected_tensors(model_config, state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """``"name (shape)"`` of every tensor of a stage-2 state dict that no parameter of the GIDM of
    ``model_config`` reads (built abstractly); the frozen reference towers' sub-trees are not looked into."""
    from defi_jax.gidm.model import LatentActionModel

    model = nnx.eval_shape(lambda: LatentActionModel(model_config, rngs=nnx.Rngs(0)))
    towers = tuple(p for p, ref in (("dino_encoder.", model.visual_encoder_kind == "dinov2"),
                                    ("text_encoder.", model.text_encoder_kind == "t5")) if ref)
    known = {_name_and_rule(path, len(var.get_value().shape))[0] for path, var in _lam_params(model).items()}
    return [f"{k} {tuple(np.shape(v))}" for k, v in sorted(state_dict.items())
            if k not in known and not (towers and k.startswith(towers))]


def gidm_state_dict(model) -> dict[str, np.ndarray]:
    """Our GIDM -> the reference's state-dict names (without ``lam.``); the VQ codebook is exported
    with any dead-code restarts folded in. Frozen reference towers are exported by their own interop."""
    sd = {}
    for path, var in _lam_params(model).items():
        value = np.asarray(var.get_value(), np.float32)
        if path == ("vq", "codebook"):
            value = np.asarray(model.vq.effective_codebook(), np.float32)
        name, to_t, _ = _name_and_rule(path, value.ndim)
        sd[name] = to_t(value) if to_t else value
    sd.update(_encoder_state_dicts(model))
    return sd


def load_gidm_state_dict(model, state_dict: Mapping[str, np.ndarray], *, skip_encoders: bool = False) -> None:
    """Writes reference-named weights into ``model`` in place; errors list missing / unexpected keys."""
    state_dict = dict(state_dict)
    reference_towers = tuple(p for p, ref in (("dino_encoder.", model.visual_encoder_kind == "dinov2"),
                                              ("text_encoder.", model.text_encoder_kind == "t5"))
                             if ref or skip_encoders)
    lam = {k: v for k, v in state_dict.items() if not k.startswith(reference_towers)} if reference_towers \
        else state_dict
    targets = {}
    for path, var in _lam_params(model, with_towers=not skip_encoders).items():
        name, _, to_j = _name_and_rule(path, np.ndim(var.get_value()))
        targets[name] = (path, var, to_j)
    missing = sorted(set(targets) - set(lam))
    unexpected = sorted(set(lam) - set(targets))
    if missing or unexpected:
        raise KeyError(f"GIDM checkpoint does not match the model: missing {missing[:20]}"
                       f"{' ...' if len(missing) > 20 else ''} ({len(missing)}), unexpected {unexpected[:20]}"
                       f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})")
    for name, (path, var, to_j) in targets.items():
        value = lam[name]
        value = to_j(value) if to_j else value
        want = tuple(np.shape(var.get_value()))
        if tuple(value.shape) != want:
            raise ValueError(f"GIDM checkpoint tensor {name!r} has shape {tuple(value.shape)}, "
                             f"parameter {'/'.join(map(str, path))} expects {want}")
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    model.vq.codebook_shift.set_value(jnp.zeros_like(model.vq.codebook_shift.get_value()))
    if not skip_encoders:
        _load_encoder_state_dicts(model, state_dict)


def _encoder_state_dicts(model) -> dict[str, np.ndarray]:
    out = {}
    if model.visual_encoder_kind == "dinov2":
        from defi_jax.interop import hf_dinov2
        out.update({"dino_encoder." + k: v for k, v in hf_dinov2.to_torch_hub_state_dict(model.dino_encoder).items()})
    if model.text_encoder_kind == "t5":
        from defi_jax.interop import hf_t5
        out.update({"text_encoder." + k: v for k, v in hf_t5.to_state_dict(model.text_encoder).items()})
    return out


def _load_encoder_state_dicts(model, state_dict: Mapping[str, np.ndarray]) -> None:
    for prefix, kind, wanted in (("dino_encoder.", model.visual_encoder_kind, "dinov2"),
                                 ("text_encoder.", model.text_encoder_kind, "t5")):
        if kind != wanted:
            continue   # a trainable tiny tower: already loaded through the rule table
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not sub:
            raise KeyError(f"GIDM checkpoint has no {prefix}* weights for the frozen {wanted} tower; pass "
                           f"skip_encoders=True and load it with defi_jax.interop.hf_{wanted} instead")
        if wanted == "dinov2":
            from defi_jax.interop import hf_dinov2
            hf_dinov2.load_torchhub_state_dict(model.dino_encoder, sub)
        else:
            from defi_jax.interop import hf_t5
            hf_t5.load_state_dict(model.text_encoder, sub)


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------

def infer_gidm_config(state_dict: Mapping[str, np.ndarray], base=None):
    """``config.model`` for a reference checkpoint: sizes read off the tensors, the rest from ``base``
    (default ``configs/gidm.py:defi``). ``num_heads`` cannot be read off weights: it comes from ``base``."""
    if base is None:
        from configs import gidm as gidm_configs
        base = gidm_configs.get_config("defi").model
    c = base.copy_and_resolve_references()
    try:
        c.num_latents, c.latent_dim = state_dict["vq.codebook.weight"].shape
        c.latent_dim, c.model_dim = state_dict["to_codebook.weight"].shape
        c.feature_dim = state_dict["action_latent"].shape[-1]
        c.text_dim = state_dict["lang_proj.weight"].shape[1]
    except KeyError as err:
        raise KeyError(f"GIDM checkpoint lacks tensor {err.args[0]!r}: is this a DeFi stage-2 (latent action) "
                       f"checkpoint?") from err

    def depth(prefix):
        idx = [int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
        return max(idx) + 1 if idx else 0

    c.enc_blocks = depth("encoder.transformer_blocks.")
    c.dec_blocks = depth("decoder.transformer_blocks.")
    out_dim = state_dict["decoder.out.weight"].shape[0]
    if out_dim != c.feature_dim:
        c.target = "pixels"
    return c


def load_gidm(path: str | os.PathLike, config=None, *, skip_encoders: bool = False, seed: int = 0,
              reference_mask_order: bool = True):
    """The reference's stage-2 latent action model as our ``LatentActionModel``.

    ``config``: a ``config.model`` ConfigDict; default: inferred from the tensors on top of
    ``configs/gidm.py:defi`` (so a 128-entry codebook checkpoint loads without flags).
    ``skip_encoders``: leave DINOv2 / T5 as initialised when the file holds only the trained part.
    ``reference_mask_order``: the reference's language-mask row order (see ``LatentActionModel``); on by
    default so that an imported checkpoint computes what it computed in the reference (off: 2.5e-2 relative
    error on batches of mixed-length instructions).
    """
    import defi_jax  # noqa: F401  (flax sharding flags)
    from defi_jax.gidm.model import LatentActionModel

    sd = read_state_dict(path)
    config = (infer_gidm_config(sd) if config is None else config).copy_and_resolve_references()
    config.reference_mask_order = reference_mask_order
    model = LatentActionModel(config, rngs=nnx.Rngs(seed))
    load_gidm_state_dict(model, sd, skip_encoders=skip_encoders)
    return model


def save_gidm(model, path: str | os.PathLike) -> None:
    """Writes the reference layout (``lam.``-prefixed, as in its Lightning ``state_dict``) to safetensors."""
    from safetensors.numpy import save_file
    sd = {_PREFIX + k: np.ascontiguousarray(v) for k, v in gidm_state_dict(model).items()}
    save_file(sd, os.fspath(path))
