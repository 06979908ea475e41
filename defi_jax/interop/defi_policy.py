"""Stage-3 (DeFI policy) networks <-> the reference's PyTorch state dict, by name / transpose rules.

Three tables, one per trained network, each on paths relative to that network:

``VIDEO_FORMER_RULES``    ``defi_jax.policy.video_former.VideoFormer``   <-> ``Video_Former_3D``
    ``layers.{i}.cross_attn`` / ``temporal_attn`` / ``ffn.layers.{k}`` are the reference's
    ``layers.{i}.0`` / ``.1`` / ``.2.{k}``; ``goal_emb.layers.{k}`` is ``goal_emb.{k}``.
``ACTION_HEAD_RULES``     ``defi_jax.policy.action_head.ActionHead``     <-> ``GCDenoiser``
    Identical names (``inner_model.encoder.blocks.{i}.attn.query``, ``...adaLN_zero.modulation.1``) up to
    ``nnx.Sequential``'s ``layers`` level. The reference's unused ``inner_model.pos_emb`` /
    ``proprio_emb.*`` / ``goal_emb.*`` are ignored on import (``ACTION_HEAD_UNUSED``) and written as zeros
    on export when asked (``unused_head_tensors``) so that a strict ``load_state_dict`` accepts the file.
``LATENT_ACTION_RULES``   ``defi_jax.policy.latent_action.PolicyLatentActions`` <-> the policy's
    ``goal_emb.{0,2}``, ``time_pos_emb`` and ``lam.*`` (stage-2 names; ``lam.vq.codebook.weight`` is our
    ``lam.vq.codebook``, exported with dead-code restarts folded in). The frozen T5 (``lam.text_encoder.*``)
    goes through ``defi_jax.interop.hf_t5``.

Linear kernels are transposed, LayerNorm ``scale`` is ``weight`` (``_convert.DEFAULT_RULES``).

Whole stage-3 checkpoint (``saved_models/*.pt`` ``["model"]``): ``policy_state_dict`` writes the three
networks under the reference's prefixes (``Video_Former.``, ``model.``, none) and ``load_policy_state_dict``
reads them back strictly: every missing, unexpected or mis-shaped tensor of every part is listed in one
``ValueError``. Keys of the frozen towers (``TVP_encoder.``, ``language_goal.``, ``lam.text_encoder.``) are
left for their own interop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from defi_jax.interop._convert import DEFAULT_RULES, Rule, from_torch, to_torch

_SEQUENTIAL = Rule(r"\.layers\.(\d+)\.", r".\1.")   # nnx.Sequential's extra level: ``ffn.layers.1`` -> ``ffn.1``

VIDEO_FORMER_RULES: tuple[Rule, ...] = (
    Rule(r"\.cross_attn\.", ".0."),
    Rule(r"\.temporal_attn\.", ".1."),
    Rule(r"\.ffn\.layers\.", ".2."),
    _SEQUENTIAL,
    *DEFAULT_RULES,
)

ACTION_HEAD_RULES: tuple[Rule, ...] = (_SEQUENTIAL, *DEFAULT_RULES)
ACTION_HEAD_UNUSED: tuple[str, ...] = (r"^inner_model\.pos_emb$", r"^inner_model\.proprio_emb\.",
                                       r"^inner_model\.goal_emb\.")

_CODEBOOK = "lam.vq.codebook.weight"
LATENT_ACTION_RULES: tuple[Rule, ...] = (
    Rule(r"^lam\.vq\.codebook$", _CODEBOOK),
    _SEQUENTIAL,
    *DEFAULT_RULES,
)

# Checkpoint prefix of each part in the reference's stage-3 state dict.
VIDEO_FORMER_PREFIX = "Video_Former."
ACTION_HEAD_PREFIX = "model."
FROZEN_PREFIXES: tuple[str, ...] = ("TVP_encoder.", "language_goal.", "lam.text_encoder.")


# ---------------------------------------------------------------------------------------------------
# One network at a time (relative names)
# ---------------------------------------------------------------------------------------------------

def video_former_state_dict(model) -> dict[str, np.ndarray]:
    return to_torch(model, VIDEO_FORMER_RULES)


def load_video_former(model, tensors: Mapping[str, np.ndarray]):
    """``model`` (concrete or ``nnx.eval_shape``) filled from ``Video_Former_3D`` names; returns it."""
    return from_torch(model, tensors, VIDEO_FORMER_RULES, what="Video Former")


def unused_head_tensors(head, *, num_video_tokens: int = 224, num_goal_tokens: int = 1,
                        proprio_dim: int = 8) -> dict[str, np.ndarray]:
    """Zeros for the reference head's parameters that its forward never reads (strict-load fillers)."""
    inner = head.inner_model
    D = inner.dim
    goal_dim = inner.lang_emb.layers[0].kernel.shape[0]
    seq = num_goal_tokens + num_video_tokens + head.horizon
    shapes = {"inner_model.pos_emb": (1, seq, D),
              "inner_model.proprio_emb.0.weight": (2 * D, proprio_dim), "inner_model.proprio_emb.0.bias": (2 * D,),
              "inner_model.proprio_emb.2.weight": (D, 2 * D), "inner_model.proprio_emb.2.bias": (D,),
              "inner_model.goal_emb.0.weight": (2 * D, goal_dim), "inner_model.goal_emb.0.bias": (2 * D,),
              "inner_model.goal_emb.2.weight": (D, 2 * D), "inner_model.goal_emb.2.bias": (D,)}
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def action_head_state_dict(head, *, with_unused: bool = False, **unused_kw) -> dict[str, np.ndarray]:
    out = to_torch(head, ACTION_HEAD_RULES)
    if with_unused:
        out.update(unused_head_tensors(head, **unused_kw))
    return out


def load_action_head(head, tensors: Mapping[str, np.ndarray]):
    return from_torch(head, tensors, ACTION_HEAD_RULES, what="action head", ignore=ACTION_HEAD_UNUSED)


def latent_actions_state_dict(model) -> dict[str, np.ndarray]:
    out = to_torch(model, LATENT_ACTION_RULES)
    out[_CODEBOOK] = np.asarray(model.lam.vq.effective_codebook(), out[_CODEBOOK].dtype)
    return out


def load_latent_actions(model, tensors: Mapping[str, np.ndarray]):
    """Fills goal_emb / time_pos_emb / lam.* and clears any dead-code restart shift; returns the module."""
    model = from_torch(model, tensors, LATENT_ACTION_RULES, what="latent actions",
                       ignore=(r"^lam\.text_encoder\.",))
    _clear_codebook_shift(model)
    return model


def _clear_codebook_shift(model) -> None:
    shift = model.lam.vq.codebook_shift
    shift.set_value(jnp.zeros_like(shift.get_value()))


# ---------------------------------------------------------------------------------------------------
# The whole stage-3 state dict
# ---------------------------------------------------------------------------------------------------

def _is_latent_action_key(key: str) -> bool:
    return key.startswith("lam.") or key.startswith("goal_emb.") or key == "time_pos_emb"


def policy_state_dict(video_former, action_head, latent_actions, *, with_unused: bool = True,
                      **unused_kw) -> dict[str, np.ndarray]:
    """The three trained networks under the reference's stage-3 keys (torch layouts, numpy)."""
    out = {VIDEO_FORMER_PREFIX + k: v for k, v in video_former_state_dict(video_former).items()}
    out.update({ACTION_HEAD_PREFIX + k: v for k, v in
                action_head_state_dict(action_head, with_unused=with_unused, **unused_kw).items()})
    out.update(latent_actions_state_dict(latent_actions))
    return out


def load_policy_state_dict(video_former, action_head, latent_actions, tensors: Mapping[str, np.ndarray], *,
                           ignore: Iterable[str] = ()):
    """(video_former, action_head, latent_actions) filled from a stage-3 state dict.

    Strict: one ``ValueError`` lists every missing / unexpected / mis-shaped tensor of every part. Frozen
    tower keys (``FROZEN_PREFIXES``) and ``ignore`` regexes are skipped.
    """
    skip = [re.compile(p) for p in ignore]
    parts: dict[str, dict[str, np.ndarray]] = {"vf": {}, "head": {}, "la": {}}
    stray = []
    for key, value in tensors.items():
        if key.startswith(FROZEN_PREFIXES) or any(p.search(key) for p in skip):
            continue
        if key.startswith(VIDEO_FORMER_PREFIX):
            parts["vf"][key[len(VIDEO_FORMER_PREFIX):]] = value
        elif key.startswith(ACTION_HEAD_PREFIX):
            parts["head"][key[len(ACTION_HEAD_PREFIX):]] = value
        elif _is_latent_action_key(key):
            parts["la"][key] = value
        else:
            stray.append(key)
    errors, loaded = [], {}
    for name, module, fn in (("vf", video_former, load_video_former), ("head", action_head, load_action_head),
                             ("la", latent_actions, load_latent_actions)):
        try:
            loaded[name] = fn(module, parts[name])
        except ValueError as err:
            errors.append(str(err))
    if stray:
        errors.append(f"cannot load policy:\n  {len(stray)} unexpected tensor(s) outside Video_Former. / model. / "
                      f"lam. / goal_emb. / time_pos_emb: " + "; ".join(sorted(stray)[:20]))
    if errors:
        raise ValueError("stage-3 checkpoint does not match the policy networks:\n" + "\n".join(errors))
    return loaded["vf"], loaded["head"], loaded["la"]

