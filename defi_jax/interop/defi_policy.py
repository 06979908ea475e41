"""Stage-3 (DeFI policy) networks <-> the reference's PyTorch state dict, by name / transpose rules.

Importing a whole reference checkpoint (``saved_models/{step}.pt`` / ``last.pt``)::

    config, params = load_reference_policy("saved_models/last.pt")        # sizes inferred on configs/policy.py:defi
    config = import_policy_workdir("last.pt", "/ckpt/policy", svd_path="/ckpt/svd")   # python -m launch.import_torch

``read_reference_checkpoint`` reads the file without unpickling anything but tensors (``weights_only=True``,
memory-mapped; stand-ins for the OmegaConf ``args``). ``infer_policy_config`` reads every size off the tensors
(heads, which weights cannot tell, and the GFDM, which the file does not hold, come from the base config).
``reference_policy_params`` maps every tensor to our parameter paths or reports it: the tables below, plus
``lam.text_encoder.*`` (T5, ``hf_t5``), ``language_goal.clip_rn50.*`` (OpenAI CLIP, renamed to transformers names
by ``openai_clip_text_to_hf``: fused ``in_proj`` split into q / k / v, ``text_projection`` used as ``x @ P``, then
``hf_clip``) and ``TVP_encoder.text_encoder.*`` (the GFDM's CLIP text, when it fits); the image tower of the goal
CLIP, the head's unused tensors and tied copies are skipped with a reason (``SKIPPED``). The ``reference_policy``
kind of ``defi_jax.weights`` reads a file through it, so the trainer's own init loads it.

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

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from defi_jax.interop._convert import DEFAULT_RULES, Rule, from_torch, to_torch, torch_key

_log = logging.getLogger(__name__)

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



# ---------------------------------------------------------------------------------------------------
# Importing a reference stage-3 checkpoint (saved_models/*.pt) as a whole policy
# ---------------------------------------------------------------------------------------------------

GOAL_CLIP_PREFIX = "language_goal.clip_rn50."        # OpenAI CLIP (the whole model; encode_text is used)
GIDM_T5_PREFIX = "lam.text_encoder."                  # transformers T5EncoderModel
GFDM_TEXT_PREFIX = "TVP_encoder.text_encoder."        # transformers CLIPTextModelWithProjection

# OpenAI CLIP text tower -> transformers CLIPTextModelWithProjection names (``text_model.`` dropped), so that
# ``hf_clip.RULES`` maps them on. The fused attention input projection (``in_proj_weight`` [3W, W], rows q, k, v
# as ``nn.MultiheadAttention`` packs them) is split in three; ``text_projection`` [W, P] is applied as
# ``x @ P`` by OpenAI, so transformers' Linear weight is its transpose (and our kernel P itself).
OPENAI_CLIP_TEXT_RULES: tuple[tuple[str, str], ...] = (
    (r"^token_embedding\.weight$", "embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^ln_final\.", "final_layer_norm."),
)
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
# The way back, for naming the file's tensors in messages.
_HF_TO_OPENAI: tuple[tuple[str, str], ...] = (
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\3"
                                                                         r" (\2 rows)"),
    (r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"^final_layer_norm\.", "ln_final."),
    (r"^text_projection\.weight$", "text_projection (transposed)"),
)


def _openai_name(hf_key: str) -> str:
    for pattern, replacement in _HF_TO_OPENAI:
        if re.search(pattern, hf_key):
            return re.sub(pattern, replacement, hf_key)
    return hf_key


# Tensors of the file that carry nothing of the policy we build, with the reason they are skipped.
SKIPPED: tuple[tuple[str, str], ...] = (
    (r"^model\.inner_model\.(pos_emb$|proprio_emb\.|goal_emb\.)", "never read by the reference head's forward"),
    (r"^language_goal\.clip_rn50\.(visual\.|logit_scale$)", "the goal CLIP's image tower: encode_text does not use it"),
    (r"^lam\.text_encoder\.encoder\.embed_tokens\.weight$", "T5's tied copy of lam.text_encoder.shared.weight"),
    (r"^TVP_encoder\.text_encoder\.text_projection\.", "the GFDM reads CLIP's last_hidden_state, not its projection"),
    (r"position_ids$", "a buffer (token positions), not a weight"),
    (r"^TVP_encoder\.(?!text_encoder\.)", "the GFDM comes from its own folder (--gfdm_workdir / --svd_path)"),
)


def openai_clip_text_to_hf(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """OpenAI CLIP text-tower tensors (``token_embedding.weight``, ``transformer.resblocks.{i}...``) under
    transformers ``CLIPTextModelWithProjection`` names; returns (renamed, OpenAI names it does not know)."""
    out, unknown = {}, []
    for key, value in tensors.items():
        if key == "text_projection":
            out["text_projection.weight"] = np.swapaxes(value, 0, 1)
            continue
        m = _IN_PROJ.match(key)
        if m:
            if value.shape[0] % 3:
                out[key] = value   # left under its own name: reported as unexpected, with its shape
                continue
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part
            continue
        for pattern, replacement in OPENAI_CLIP_TEXT_RULES:
            if re.search(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def read_reference_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a reference stage-3 file, flat, torch names and layouts (numpy; not yet float32).

    ``.pt`` / ``.pth`` / ``.ckpt``: ``torch.load(weights_only=True, mmap=True)``; the ``{"model": state_dict,
    "args": OmegaConf}`` wrapper's non-tensor ``args`` are replaced by inert stand-ins (never imported or run).
    ``.safetensors``: memory-mapped. A ``module.`` prefix (DDP) is dropped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage-3 checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from defi_jax.weights import read_safetensors_mmap
        raw = read_safetensors_mmap(path)
    else:
        obj = _torch_load(path)
        for wrapper in ("model", "state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict or {{'model': state_dict, ...}}, got {type(obj).__name__}")
        raw = {k: _numpy(v) for k, v in obj.items() if hasattr(v, "detach")}
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    return raw


def _torch_load(path: str):
    import torch

    from defi_jax.interop.defi_torch import _inert_class

    def load(mmap):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    def load_with_stubs(mmap):
        try:
            return load(mmap)
        except Exception as err:   # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:      # noqa: BLE001
                raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
            if not names:
                raise
            stubs = [_inert_class(*full.rpartition(".")[::2]) for full in names]
            with torch.serialization.safe_globals(stubs):
                return load(mmap)

    try:
        return load_with_stubs(True)
    except RuntimeError as err:    # the legacy (non-zip) format cannot be memory-mapped
        if "mmap" not in str(err):
            raise
        return load_with_stubs(False)


def _numpy(t) -> np.ndarray:
    import torch
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _f32(x: np.ndarray) -> np.ndarray:
    """Floating tensors (fp16 / bf16 / fp32) as float32; a float32 memory-mapped view stays a view."""
    x = np.asarray(x)
    return x.astype(np.float32, copy=False) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x


# ---- sizes --------------------------------------------------------------------------------------

def _need(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise KeyError(f"stage-3 checkpoint lacks tensor {key!r}: is this a DeFI stage-3 (policy) checkpoint "
                       f"(saved_models/*.pt)?")
    return tuple(tensors[key].shape)


def _count(tensors: Mapping[str, np.ndarray], prefix: str) -> int:
    idx = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _split(total: int, heads: int, what: str, key: str) -> int:
    if heads <= 0 or total % heads:
        raise ValueError(f"{what}: {total} is not divisible by {key}={heads} (heads are not stored in the weights; "
                         f"set {key} to the run's value)")
    return total // heads


def _file_sizes(t: Mapping[str, np.ndarray], base) -> dict:
    """Every size the weights fix, on top of ``base`` (a ``config.model``) for what they cannot tell (heads)."""
    vf, hd, gi = dict(base.video_former), dict(base.head), base.gidm
    F, Q, D = _need(t, "Video_Former.latents")
    inner, _ = _need(t, "Video_Former.layers.0.0.to_q.weight")
    heads = int(vf.get("heads", 8))
    video_former = dict(vf, dim=D, depth=_count(t, "Video_Former.layers."), queries_per_frame=Q, heads=heads,
                        dim_head=_split(inner, heads, "Video_Former to_q width", "config.model.video_former.heads"))
    # Keys VideoFormer defaults (ff_mult 4, one time embedding per frame) are only written where the file differs.
    for key, value, default in (("ff_mult", _need(t, "Video_Former.layers.0.2.1.weight")[0] // D, 4),
                                ("num_time_embeds", _need(t, "Video_Former.time_pos_emb")[0], F)):
        if value != vf.get(key, default):
            video_former[key] = value
    _split(D, int(vf.get("temporal_heads", heads) or heads), "Video_Former width",
           "config.model.video_former.temporal_heads")
    E, video_dim = _need(t, "model.inner_model.tok_emb.weight")
    head = dict(hd, dim=E, enc_layers=_count(t, "model.inner_model.encoder.blocks."),
                dec_layers=_count(t, "model.inner_model.decoder.blocks."))
    _split(E, int(hd.get("heads", 8)), "action head width", "config.model.head.heads")
    action_dim = _need(t, "model.inner_model.action_emb.weight")[1]
    if "model.inner_model.pos_emb" in t:   # unused by the reference, but it fixes the chunk length
        horizon = _need(t, "model.inner_model.pos_emb")[1] - 1 - F * Q
    else:
        horizon = int(base.horizon)
    # GIDM encoder (stage-2 names) and its T5.
    num_latents, latent_dim = _need(t, "lam.vq.codebook.weight")
    model_dim, text_dim = _need(t, "lam.lang_proj.weight")
    width = _need(t, "lam.action_latent")[-1]
    gidm = dict(num_latents=num_latents, latent_dim=latent_dim, model_dim=model_dim, text_dim=text_dim,
                feature_dim=width, enc_blocks=_count(t, "lam.encoder.transformer_blocks."))
    _split(model_dim, int(gi.num_heads), "GIDM width", "config.model.gidm.num_heads")
    p = GIDM_T5_PREFIX
    vocab, d_model = _need(t, p + "shared.weight") if p + "shared.weight" in t else \
        _need(t, p + "encoder.embed_tokens.weight")
    buckets, t5_heads = _need(t, p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    t5_inner = _need(t, p + "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in t
    d_ff = _need(t, p + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    from defi_jax.models.t5 import T5Config
    base_t5 = dataclasses.asdict(T5Config()) | dict(gi.get("t5", {}))   # the base's T5 (t5-base where unset)
    ffp = base_t5["feed_forward_proj"]   # the activation is not in the weights, only whether it is gated
    read = dict(vocab_size=vocab, d_model=d_model, d_kv=t5_inner // t5_heads, d_ff=d_ff, num_heads=t5_heads,
                num_layers=_count(t, p + "encoder.block."), relative_attention_num_buckets=buckets,
                feed_forward_proj=ffp if gated == ffp.startswith("gated") else ("gated-gelu" if gated else "relu"))
    t5 = dict(gi.get("t5", {})) | {k: v for k, v in read.items() if v != base_t5[k]}
    # Goal token: OpenAI CLIP encode_text (heads = width // 64, as OpenAI's build_model).
    g = GOAL_CLIP_PREFIX
    vocab_g, W = _need(t, g + "token_embedding.weight")
    if W % 64:
        raise ValueError(f"{g}: width {W} is not a multiple of 64 (OpenAI CLIP uses width // 64 heads)")
    goal_text = dict(dict(base.goal_text), vocab_size=vocab_g, hidden_size=W,
                     intermediate_size=_need(t, g + "transformer.resblocks.0.mlp.c_fc.weight")[0],
                     projection_dim=_need(t, g + "text_projection")[1],
                     num_hidden_layers=_count(t, g + "transformer.resblocks."), num_attention_heads=W // 64,
                     max_position_embeddings=_need(t, g + "positional_embedding")[0], hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, bos_token_id=vocab_g - 2, eos_token_id=vocab_g - 1, pad_token_id=0)
    return dict(video_former=video_former, head=head, action_dim=action_dim, horizon=horizon, gidm=gidm, t5=t5,
                t5_width=d_model,
                goal_text=goal_text, num_frames=F, feature_dim=_need(t, "Video_Former.goal_emb.0.weight")[1],
                video_dim=video_dim, goal_dim=_need(t, "model.inner_model.lang_emb.0.weight")[1],
                latent_action_dim=_need(t, "model.inner_model.tok_emb_token.weight")[1],
                la_feature_dim=_need(t, "goal_emb.0.weight")[1])


def _gfdm_feature_dim(m) -> int:
    unet = dict(m.gfdm.unet)
    return int(sum(list(reversed(unet["block_out_channels"]))[:int(m.gfdm.get("feature_up_blocks", 2))]))


def infer_policy_config(tensors: Mapping[str, np.ndarray], base=None):
    """The policy config of a reference stage-3 checkpoint: every size the weights fix (Video Former width /
    depth / queries / frames, head width / layers / chunk, GIDM encoder and VQ, its T5, the CLIP goal tower)
    on top of ``base`` (default ``configs/policy.py:defi``), which supplies what weights cannot tell (attention
    heads, dropout, the GFDM). Also ``model.gidm.reference_mask_order=True`` (the reference's language-mask
    quirk) and ``data.normalize_actions=False`` (the reference trains on raw CALVIN actions).

    Raises ``ValueError`` naming the config key where the file disagrees with the GFDM of ``base`` (which
    the file does not hold) or the parts disagree with each other.
    """
    if base is None:
        from configs import policy as policy_configs
        base = policy_configs.get_config("defi")
    c = base.copy_and_resolve_references()
    m = c.model
    s = _file_sizes(tensors, m)
    problems = []
    if s["num_frames"] != m.gfdm.num_frames:
        problems.append(f"Video_Former.latents holds {s['num_frames']} frames but config.model.gfdm.num_frames="
                        f"{m.gfdm.num_frames}")
    feat = _gfdm_feature_dim(m)
    for key, got in (("Video_Former.goal_emb.0.weight", s["feature_dim"]), ("goal_emb.0.weight", s["la_feature_dim"])):
        if got != feat:
            problems.append(f"{key} reads {got}-wide GFDM features but config.model.gfdm gives {feat} "
                            f"(unet.block_out_channels, feature_up_blocks)")
    for key, got, want in (("model.inner_model.tok_emb.weight", s["video_dim"], s["video_former"]["dim"]),
                           ("model.inner_model.lang_emb.0.weight", s["goal_dim"], s["goal_text"]["projection_dim"]),
                           ("model.inner_model.tok_emb_token.weight", s["latent_action_dim"], s["gidm"]["model_dim"]),
                           ("lam.lang_proj.weight", s["gidm"]["text_dim"], s["t5_width"])):
        if got != want:
            problems.append(f"{key} expects inputs of width {got}, its producer gives {want}")
    if s["horizon"] <= 0:
        problems.append(f"model.inner_model.pos_emb is too short for {s['num_frames']} x "
                        f"{s['video_former']['queries_per_frame']} video tokens")
    if problems:
        raise ValueError("stage-3 checkpoint does not fit the policy config: " + "; ".join(problems))
    m.video_former = s["video_former"]
    m.head = s["head"]
    m.action_dim, m.horizon = s["action_dim"], s["horizon"]
    for k, v in s["gidm"].items():
        m.gidm[k] = v
    m.gidm.text_encoder = "t5"
    m.gidm.t5 = s["t5"]
    m.gidm.reference_mask_order = True
    m.goal_text = s["goal_text"]
    c.data.action_horizon = s["horizon"]
    c.data.normalize_actions = False
    return c


# ---- mapping ------------------------------------------------------------------------------------

def _abstract_parts(m, *, feature_dim: int, num_frames: int, gfdm_text: Mapping | None) -> dict:
    """Our networks the file fills, shapes only, keyed by their path prefix in ``DeFIPolicyModel`` (built as
    its ``__init__`` builds them; a test checks the two agree)."""
    from flax import nnx

    from defi_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
    from defi_jax.models.t5 import T5Config, T5Encoder
    from defi_jax.policy.action_head import ActionHead
    from defi_jax.policy.latent_action import PolicyLatentActions
    from defi_jax.policy.video_former import VideoFormer

    vf, goal_dim = dict(m.video_former), int(dict(m.goal_text).get("projection_dim", 512))
    builders = {
        "video_former/": lambda rngs: VideoFormer(condition_dim=feature_dim, num_frames=num_frames, rngs=rngs, **vf),
        "head/": lambda rngs: ActionHead(rngs=rngs, goal_dim=goal_dim, video_dim=vf.get("dim", 384),
                                         latent_action_dim=m.gidm.model_dim, action_dim=m.action_dim,
                                         horizon=m.horizon, **dict(m.head)),
        "latent_actions/": lambda rngs: PolicyLatentActions(m.gidm, condition_dim=feature_dim,
                                                            frames=tuple(m.latent_action_frames), rngs=rngs),
        "latent_actions/lam/text_encoder/": lambda rngs: T5Encoder(T5Config(**dict(m.gidm.get("t5", {}))),
                                                                   rngs=rngs),
        "goal_text/": lambda rngs: CLIPTextEncoder(CLIPTextConfig(**dict(m.goal_text)), rngs=rngs,
                                                   with_projection=True),
    }
    if gfdm_text is not None:
        builders["gfdm/text_encoder/"] = lambda rngs: CLIPTextEncoder(CLIPTextConfig(**dict(gfdm_text)), rngs=rngs)
    out = {}
    for prefix, build in builders.items():
        state = nnx.state(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
        out[prefix] = {".".join(str(p) for p in path): tuple(v.get_value().shape)
                       for path, v in nnx.to_flat_state(state)}
    return out


def _part_tables(tensors: Mapping[str, np.ndarray]):
    """The file's tensors per part of ours: {our prefix: (checkpoint prefix, rules, tensors by relative name)},
    the skipped {key: reason}, and keys that belong to no part."""
    from defi_jax.interop import hf_clip, hf_t5

    skip_res = [(re.compile(p), why) for p, why in SKIPPED]
    shared, tied = GIDM_T5_PREFIX + "shared.weight", GIDM_T5_PREFIX + "encoder.embed_tokens.weight"
    if shared not in tensors and tied in tensors:   # an export that kept only the encoder's copy
        tensors = {(shared if k == tied else k): v for k, v in tensors.items()}
    groups: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("vf", "head", "la", "t5", "goal", "tvp")}
    skipped, stray = {}, []
    for key, value in tensors.items():
        why = next((w for p, w in skip_res if p.search(key)), None)
        if why is not None:
            skipped[key] = why
        elif key.startswith(VIDEO_FORMER_PREFIX):
            groups["vf"][key[len(VIDEO_FORMER_PREFIX):]] = value
        elif key.startswith(ACTION_HEAD_PREFIX):
            groups["head"][key[len(ACTION_HEAD_PREFIX):]] = value
        elif key.startswith(GIDM_T5_PREFIX):
            groups["t5"][key[len(GIDM_T5_PREFIX):]] = value
        elif _is_latent_action_key(key):
            groups["la"][key] = value
        elif key.startswith(GOAL_CLIP_PREFIX):
            groups["goal"][key[len(GOAL_CLIP_PREFIX):]] = value
        elif key.startswith(GFDM_TEXT_PREFIX):
            groups["tvp"][key[len(GFDM_TEXT_PREFIX):].removeprefix("text_model.")] = value
        else:
            stray.append(key)
    goal, unknown = openai_clip_text_to_hf(groups["goal"])
    stray += [GOAL_CLIP_PREFIX + k for k in unknown]
    stray = [f"{k} {tuple(tensors[k].shape)}" for k in stray]
    tables = {
        "video_former/": (VIDEO_FORMER_PREFIX, VIDEO_FORMER_RULES, groups["vf"]),
        "head/": (ACTION_HEAD_PREFIX, ACTION_HEAD_RULES, groups["head"]),
        "latent_actions/": ("", LATENT_ACTION_RULES, groups["la"]),
        "latent_actions/lam/text_encoder/": (GIDM_T5_PREFIX, hf_t5.RULES, groups["t5"]),
        "goal_text/": (GOAL_CLIP_PREFIX, hf_clip.RULES, goal),   # names as transformers', see _openai_name
        "gfdm/text_encoder/": (GFDM_TEXT_PREFIX, hf_clip.RULES, groups["tvp"]),
    }
    return tables, skipped, stray


def _gfdm_text_config_of(tvp: Mapping[str, np.ndarray], base: Mapping) -> dict | None:
    """The GFDM text tower's config as the file's ``TVP_encoder.text_encoder.*`` shapes give it (None: absent)."""
    if "embeddings.token_embedding.weight" not in tvp:
        return None
    vocab, width = tvp["embeddings.token_embedding.weight"].shape
    n = _count(tvp, "encoder.layers.")
    return dict(dict(base), vocab_size=vocab, hidden_size=width, num_hidden_layers=n,
                max_position_embeddings=tvp.get("embeddings.position_embedding.weight", np.zeros((77,))).shape[0],
                intermediate_size=tvp.get("encoder.layers.0.mlp.fc1.weight", np.zeros((4 * width,))).shape[0])


def _map_part(shapes: Mapping[str, tuple], prefix: str, table) -> tuple[dict, list, list, set]:
    """(params by our path, missing, mis-shaped, used checkpoint names) of one part."""
    ckpt_prefix, rules, group = table
    name = (lambda k: ckpt_prefix + _openai_name(k)) if ckpt_prefix == GOAL_CLIP_PREFIX else \
        (lambda k: ckpt_prefix + k)
    params, missing, bad, used = {}, [], [], set()
    for rel, shape in shapes.items():
        key, perm = torch_key(rel, len(shape), rules)
        ours = prefix + rel.replace(".", "/")
        if key not in group:
            missing.append(f"{name(key)} (ours: {ours} {shape})")
            continue
        used.add(key)
        value = group[key]
        want = tuple(shape[i] for i in np.argsort(perm)) if perm else shape
        if tuple(value.shape) != want:
            bad.append(f"{name(key)}: file {tuple(value.shape)}, expected {want} (ours: {ours} {shape})")
            continue
        params[ours] = _f32(np.transpose(value, perm) if perm else value)
    return params, missing, bad, used


def reference_policy_params(tensors: Mapping[str, np.ndarray], config=None) -> tuple[dict[str, np.ndarray], dict]:
    """(our parameters by path, {skipped checkpoint name: reason}) of a reference stage-3 state dict.

    ``config``: the policy config to fill (``infer_policy_config``); its GFDM text tower takes
    ``TVP_encoder.text_encoder.*`` when every shape fits, else those tensors are skipped with the reason.
    Without ``config`` every size comes from the file (what the ``reference_policy`` weights source does).
    Strict: one ``ValueError`` lists every missing, unexpected and mis-shaped tensor of every part.
    """
    tables, skipped, stray = _part_tables(tensors)
    tvp = tables["gfdm/text_encoder/"][2]
    if config is None:
        from configs import policy as policy_configs
        m = policy_configs.get_config("defi").model
        # Heads shape no parameter: one head each, so that any width divides.
        m.video_former = dict(m.video_former, heads=1, temporal_heads=1)
        m.head = dict(m.head, heads=1)
        m.gidm.num_heads = 1
        s = _file_sizes(tensors, m)
        m.video_former, m.head = s["video_former"], s["head"]
        m.action_dim, m.horizon, m.goal_text = s["action_dim"], s["horizon"], s["goal_text"]
        for k, v in s["gidm"].items():
            m.gidm[k] = v
        m.gidm.t5 = s["t5"]
        m.latent_action_frames = (0, 1)   # no parameter depends on them
        parts = _abstract_parts(m, feature_dim=s["feature_dim"], num_frames=s["num_frames"],
                                gfdm_text=_gfdm_text_config_of(tvp, m.gfdm.text_encoder))
    else:
        m = config.model
        parts = _abstract_parts(m, feature_dim=_gfdm_feature_dim(m), num_frames=m.gfdm.num_frames,
                                gfdm_text=m.gfdm.text_encoder if tvp else None)
    params, missing, bad, unexpected = {}, [], [], list(stray)
    for prefix, shapes in parts.items():
        got, miss, wrong, used = _map_part(shapes, prefix, tables[prefix])
        ckpt_prefix, _, group = tables[prefix]
        if prefix == "gfdm/text_encoder/" and config is not None and (miss or wrong):
            why = (f"does not fit config.model.gfdm.text_encoder ({(miss + wrong)[0]}); the GFDM's text tower "
                   f"must come from its own source")
            skipped |= {GFDM_TEXT_PREFIX + k: why for k in group}
            continue
        params |= got
        missing += miss
        bad += wrong
        unexpected += [f"{ckpt_prefix}{_openai_name(k) if ckpt_prefix == GOAL_CLIP_PREFIX else k} "
                       f"{tuple(group[k].shape)}" for k in sorted(set(group) - used)]
    if missing or unexpected or bad:
        lines = ["stage-3 checkpoint does not match the policy networks:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
            if items:
                shown = items[:30] + ([f"... and {len(items) - 30} more"] if len(items) > 30 else [])
                lines.append(f"  {len(items)} {title} tensor(s): " + "; ".join(shown))
        raise ValueError("\n".join(lines))
    return params, skipped


def load_reference_policy(path: str | os.PathLike, config=None) -> tuple:
    """``(config, params)`` of the reference's stage-3 checkpoint ``saved_models/{step}.pt`` / ``last.pt``.

    ``config``: the policy config whose sizes the file's replace (default ``configs/policy.py:defi``; see
    :func:`infer_policy_config`). ``params``: ``{"video_former/layers/0/cross_attn/to_q/kernel": float32
    numpy, ...}``, every parameter of ``video_former/``, ``head/``, ``latent_actions/`` (with the GIDM's T5),
    ``goal_text/`` and, when the file's tower fits, ``gfdm/text_encoder/``; the GFDM's UNet and VAE are not in
    the file. Skipped tensors are logged with the reason.
    """
    tensors = read_reference_checkpoint(path)
    config = infer_policy_config(tensors, config)
    params, skipped = reference_policy_params(tensors, config)
    for why in sorted(set(skipped.values())):
        names = sorted(k for k, w in skipped.items() if w == why)
        _log.info("%s: skipped %d tensor(s) (%s): %s%s", path, len(names), why, ", ".join(names[:3]),
                  " ..." if len(names) > 3 else "")
    return config, params


# ---- a policy workdir ---------------------------------------------------------------------------

def _all_but_gfdm(with_text: bool) -> str:
    return r"^(?!gfdm/(unet|vae)/)" if with_text else r"^(?!gfdm/)"


def import_policy_workdir(src: str, workdir: str, config=None, *, gfdm_workdir: str = "", svd_path: str = "",
                          mesh=None):
    """Writes a policy workdir from a reference stage-3 checkpoint; returns its config.

    The workdir is what ``launch.train`` reads: ``config.json``, a params-only ``checkpoints/0``
    (``import_stages.write_workdir``: the weights, made by ``Trainer.init_params`` through a ``reference_policy``
    source in ``config.init``; no optimizer moments) and
    ``assets/action_stats.json`` (raw actions: ``{"normalized": false}``), so ``DeFIPolicy.from_checkpoint``
    serves it and ``launch.train`` fine-tunes it (step 0: fresh optimizer state).

    The GFDM is not in the file: ``gfdm_workdir`` (one of our GFDM workdirs) or ``svd_path`` (a diffusers SVD
    folder with ``unet/`` and ``vae/``; the text tower then comes from the file's ``TVP_encoder.text_encoder``
    when it fits, else from ``config.init.sources.svd_clip``); neither: whatever ``config.init`` names.
    """
    from defi_jax import paths, weights
    from defi_jax.interop import import_stages

    src, workdir = paths.abspath(src), paths.abspath(workdir)
    import_stages.require_fresh(workdir)
    with weights.local_file(src) as local:   # gs://: a temporary local copy (torch.load needs a file)
        tensors = read_reference_checkpoint(local)
    config = infer_policy_config(tensors, config)
    params, skipped = reference_policy_params(tensors, config)   # every problem of the file, named, up front
    del tensors
    with_text = any(p.startswith("gfdm/text_encoder/") for p in params)
    s = config.init.sources
    if gfdm_workdir and svd_path:
        raise ValueError("pass --gfdm_workdir or --svd_path, not both")
    if gfdm_workdir:
        s.gfdm.path = paths.abspath(gfdm_workdir)
        with_text = False
    elif svd_path:
        svd_path = paths.abspath(svd_path)
        s.gfdm.path = ""
        s.svd_unet.path, s.svd_vae.path = paths.join(svd_path, "unet"), paths.join(svd_path, "vae")
        if not with_text and not s.svd_clip.path:
            raise ValueError(f"{src}: no TVP_encoder.text_encoder tensors that fit config.model.gfdm.text_encoder; "
                             f"set config.init.sources.svd_clip.path to the GFDM's CLIP text folder")
        with_text = with_text and not s.svd_clip.path
    else:
        text_source = any(re.match(a.target, "gfdm/text_encoder/") for a in weights.active_sources(config))
        with_text = with_text and not text_source
    target = _all_but_gfdm(with_text)
    covered = [p for p in params if re.match(target, p)]
    for name, entry in s.items():   # sources the file replaces (the tiny variant's GIDM workdir, the goal CLIP)
        if entry.path and any(re.match(entry.target, p) for p in covered):
            entry.path = ""
    with s.unlocked():   # a config from flags is locked
        s.reference = weights.source(target, "reference_policy", src)
    del params
    import_stages.write_workdir(config, workdir, mesh=mesh)   # checkpoints/0, config.json, assets/action_stats.json
    for why in sorted(set(skipped.values())):
        _log.info("%s: skipped %d tensor(s): %s", src, sum(w == why for w in skipped.values()), why)
    return config
