"""A self-contained PyTorch deployment folder from a stage workdir (no pickle anywhere).

    from defi_jax import export_torch
    export_torch.export("/tmp/policy", "/tmp/defi_torch")              # latest step of a policy workdir
    export_torch.export("/tmp/gfdm", "/tmp/gfdm_torch", dtype="bfloat16")   # a GFDM workdir alone: its stage

A policy workdir gives (see ``defi_jax_torch.policy`` for how each part is read)::

    OUT/config.json                 stage, sizes, views, resolution, horizon, tokenizers, sampler, GFDM feature
                                    settings (fps, motion bucket, noise aug 0, feature steps), normalization
    OUT/gfdm/{unet,vae}             diffusers folders (``from_pretrained`` works)
    OUT/gfdm/text_encoder           transformers CLIPTextModel (the GFDM's instruction tower)
    OUT/text_encoder                transformers CLIPTextModelWithProjection (the goal token)
    OUT/gidm/{config.json, model.safetensors}     goal_emb.*, time_pos_emb, lam.* (stage-3 names)
    OUT/policy/{config.json, model.safetensors}   Video_Former.*, model.* (stage-3 names)
    OUT/action_stats.json, OUT/action_stats.safetensors, OUT/tokenizers/ (BPE / SentencePiece files), README.md

A GFDM workdir gives ``OUT/gfdm/`` (and the run's ``config.model`` in ``OUT/config.json``, which
``launch.import_torch export`` rebuilds the model from); a GIDM workdir ``OUT/gidm/`` (the reference's stage-2
names). The folder is
written as ``OUT.tmp-XXXX``, every part is loaded back strictly (diffusers / transformers ``from_pretrained``,
``DeFIPolicyTorch.from_pretrained``), and only then renamed to ``OUT``; a mismatch fails with one error naming
every tensor with both shapes. Needs torch, diffusers and transformers.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np

_log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
FORMAT = 1


def export(workdir: str, out: str, *, step: int | None = None, ema: bool = False, dtype: str = "float32",
           lerobot: bool = False) -> dict:
    """Writes the deployment folder of ``workdir``'s checkpoint (latest ``step``) to ``out``; returns its config.

    ``lerobot`` (a policy workdir): also ``OUT/lerobot/``, the LeRobot saved-policy folder
    (:mod:`defi_jax_torch.lerobot_folder`; a second copy of every weight, in one ``model.safetensors``)."""
    from defi_jax import paths, trainer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} must be one of {DTYPES}")
    workdir = paths.abspath(workdir)
    config = trainer.checkpoint_config(workdir, step)
    stage = config.get("stage")
    if stage not in ("policy", "gfdm", "gidm"):
        raise ValueError(f"{workdir}: a {stage!r} checkpoint; export_torch writes policy, gfdm and gidm workdirs")
    if lerobot and stage != "policy":
        raise ValueError(f"{workdir}: a {stage} workdir; --lerobot writes a policy's LeRobot folder only")
    return export_model(lambda: trainer.restore_model(config, workdir, step=step, ema=ema), config, out,
                        dtype=dtype, lerobot=lerobot, source={"workdir": workdir, "step": step, "ema": ema})


def export_model(load: Callable[[], object], config, out: str, *, dtype: str = "float32", lerobot: bool = False,
                 source: dict) -> dict:
    """``export``'s body for the model ``load()`` returns (``config``'s stage; a policy reads its action
    statistics from ``source["workdir"]``). Host memory stays near one copy of the weights: the writers stream
    tensor by tensor, and the model is released before the folder is loaded back into PyTorch."""
    from defi_jax import paths

    stage = config.get("stage")
    with paths.staged_dir(out) as tmp:   # renamed into place only once written and verified
        model = load()
        if stage == "policy":
            meta = _write_policy(model, config, source["workdir"], tmp)
        elif stage == "gfdm":   # + the run's config.model: an import rebuilds the same model, nothing guessed
            meta = _write_gfdm(model, os.path.join(tmp, "gfdm")) | {
                "stage": "gfdm", "model": json.loads(config.model.to_json_best_effort())}
        else:
            meta = _write_gidm(model, config, os.path.join(tmp, "gidm")) | {"stage": "gidm"}
        del model
        gc.collect()
        meta = {"format": FORMAT, **meta, "dtype": dtype, "source": source,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if lerobot:
            meta["parts"] = meta["parts"] + ["lerobot"]
        _write_json(os.path.join(tmp, "config.json"), meta)
        if dtype == "bfloat16":
            _cast_floats(tmp, "bfloat16")
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_readme(meta))
        policy = verify(tmp)
        if lerobot:
            from defi_jax_torch import lerobot_folder
            lerobot_folder.write(tmp, os.path.join(tmp, "lerobot"), policy)
            verify_lerobot(os.path.join(tmp, "lerobot"))
    return meta


# ---------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)


def _jsonable(x):
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to config.json")


def _save_tensors(tensors: dict, path: str) -> None:
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _write_gfdm(gfdm, path: str) -> dict:
    from defi_jax.interop import diffusers_svd, hf_clip
    diffusers_svd.save_unet(gfdm.unet, os.path.join(path, "unet"))
    diffusers_svd.save_vae(gfdm.vae, os.path.join(path, "vae"))
    hf_clip.save_text_encoder(gfdm.text_encoder, os.path.join(path, "text_encoder"))
    return {"parts": ["gfdm/unet", "gfdm/vae", "gfdm/text_encoder"]}


def _gfdm_settings(config) -> dict:
    """What ``DeFIPolicyTorch.features`` needs besides the weights (``GFDMOptions`` and ``edm``'s schedule)."""
    from defi_jax.gfdm import edm
    from defi_jax.gfdm.model import GFDMOptions

    o = GFDMOptions.from_config(config.model.gfdm)
    unet, vae = dict(o.unet), dict(o.vae)
    return dict(num_frames=o.num_frames, text_tokens=o.text_tokens, text_position_encoding=o.text_position_encoding,
                fps=o.feature_fps, motion_bucket_id=o.motion_bucket_id, noise_aug=0.0, feature_steps=o.feature_steps,
                feature_up_blocks=o.feature_up_blocks, sigma_min=edm.SIGMA_MIN, sigma_max=edm.SIGMA_MAX, rho=edm.RHO,
                latent_channels=int(unet.get("out_channels", 4)),
                vae_downsample=2 ** (len(vae["block_out_channels"]) - 1))


def _gidm_text_tensors(tower, kind: str) -> tuple[dict, dict]:
    """(``lam.text_encoder.*`` tensors, the torch config of the tower)."""
    from defi_jax.gidm.model import GIDM_BYTES_VOCAB_SIZE

    if kind == "bytes":
        return ({"lam.text_encoder.embed.weight": np.asarray(tower.embed.embedding[...], np.float32)},
                {"bytes_vocab_size": GIDM_BYTES_VOCAB_SIZE})
    import dataclasses

    from defi_jax.interop import hf_t5
    cfg = tower.config
    t5 = dataclasses.asdict(cfg) | {"is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": True,
                                    "dense_act_fn": cfg.dense_act_fn, "is_gated_act": cfg.is_gated_act,
                                    "num_decoder_layers": cfg.num_layers}
    return {"lam.text_encoder." + k: v for k, v in hf_t5.to_state_dict(tower).items()}, {"t5": t5}


def _tokenizers(config, out: str) -> list[dict]:
    """One entry per text tower (gfdm, goal, gidm); BPE / SentencePiece files copied under ``OUT/tokenizers``."""
    m = config.model
    init = config.get("init", {})
    clip = init.get("tokenizer_path", "") or init.get("clip_path", "")
    if clip:
        dst = os.path.join(out, "tokenizers", "clip")
        shutil.copytree(clip, dst) if os.path.isdir(clip) else (os.makedirs(dst), shutil.copy(clip, dst))
        clip_kind = {"kind": "clip_bpe", "path": "tokenizers/clip"}
    else:
        clip_kind = {"kind": "clip_bytes"}
    if m.gidm.text_encoder == "bytes":
        gidm = {"kind": "gidm_bytes"}
    else:
        src = m.gidm.tokenizer_path
        src = os.path.join(src, "spiece.model") if os.path.isdir(src) else src
        os.makedirs(os.path.join(out, "tokenizers", "t5"), exist_ok=True)
        shutil.copy(src, os.path.join(out, "tokenizers", "t5", "spiece.model"))
        gidm = {"kind": "t5_sentencepiece", "path": "tokenizers/t5/spiece.model"}
    goal_len = int(dict(m.goal_text)["max_position_embeddings"])
    return [dict(clip_kind, max_length=int(m.gfdm.text_tokens)), dict(clip_kind, max_length=goal_len),
            dict(gidm, max_length=int(m.gidm.max_text_len))]


def _write_policy(model, config, workdir: str, out: str) -> dict:
    from defi_jax import paths
    from defi_jax.interop import defi_policy, hf_clip

    c = config.copy_and_resolve_references()
    m = c.model
    model.fold_feature_stats()   # model.center_features: the mean moves into the input layers' biases (exact)
    if m.latent_action != "vq":
        raise ValueError(f"config.model.latent_action={m.latent_action!r}: the PyTorch policy implements the "
                         f"reference's 'vq' latent actions only")
    asset = paths.join(workdir, "assets", "action_stats.json")
    if not paths.exists(asset):
        raise FileNotFoundError(f"{asset}: the policy's action statistics are missing; actions cannot be unnormalized")
    stats = json.loads(paths.read_text(asset))

    _write_gfdm(model.gfdm, os.path.join(out, "gfdm"))
    hf_clip.save_text_encoder(model.goal_text, os.path.join(out, "text_encoder"))
    vf, head = dict(m.video_former), dict(m.head)
    T = int(m.gfdm.num_frames)
    sd = defi_policy.policy_state_dict(model.video_former, model.head, model.latent_actions, with_unused=True,
                                       num_video_tokens=T * int(vf["queries_per_frame"]), num_goal_tokens=1,
                                       proprio_dim=8)
    sd = {k: v for k, v in sd.items() if not k.startswith("lam.text_encoder.")}
    text_sd, text_cfg = _gidm_text_tensors(model.latent_actions.lam.text_encoder, m.gidm.text_encoder)
    policy_keys = ("Video_Former.", "model.")
    g = m.gidm
    gidm_cfg = dict(feature_dim=int(g.feature_dim), model_dim=int(g.model_dim), latent_dim=int(g.latent_dim),
                    num_latents=int(g.num_latents), enc_blocks=int(g.enc_blocks), num_heads=int(g.num_heads),
                    text_dim=int(g.text_dim), max_text_len=int(g.max_text_len), text_encoder=g.text_encoder,
                    reference_mask_order=bool(g.get("reference_mask_order", False)), **text_cfg)
    _save_tensors({k: v for k, v in sd.items() if k.startswith(policy_keys)}, os.path.join(out, "policy"))
    _save_tensors({k: v for k, v in sd.items() if not k.startswith(policy_keys)} | text_sd, os.path.join(out, "gidm"))
    _write_json(os.path.join(out, "gidm", "config.json"), gidm_cfg)
    policy_cfg = dict(video_former=vf, head=head, feature_dim=int(model.feature_dim),
                      goal_dim=int(dict(m.goal_text).get("projection_dim", 512)), action_dim=int(m.action_dim),
                      horizon=int(m.horizon), latent_action_frames=list(m.latent_action_frames), proprio_dim=8)
    _write_json(os.path.join(out, "policy", "config.json"), policy_cfg)
    stats_arrays = {k: np.asarray(v, np.float32) for k, v in stats.get("stats", {}).items()
                    if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)}
    if stats_arrays:
        from safetensors.numpy import save_file
        save_file(stats_arrays, os.path.join(out, "action_stats.safetensors"))
    _write_json(os.path.join(out, "action_stats.json"), stats)
    return dict(stage="policy", views=list(c.data.views), resolution=int(c.data.resolution),
                num_views=int(m.num_views), gfdm_steps=int(m.gfdm_steps), sample_steps=int(m.sample_steps),
                sample_sigma_min=float(m.sample_sigma_min), gfdm=_gfdm_settings(c), gidm=gidm_cfg,
                tokenizers=_tokenizers(c, out), action_stats=stats, **policy_cfg,
                parts=["gfdm/unet", "gfdm/vae", "gfdm/text_encoder", "text_encoder", "gidm", "policy"])


def _write_gidm(model, config, path: str) -> dict:
    from defi_jax.interop import defi_torch
    _save_tensors(defi_torch.gidm_state_dict(model), path)
    _write_json(os.path.join(path, "config.json"), config.model.copy_and_resolve_references().to_dict())
    return {"parts": ["gidm"]}


def _cast_floats(root: str, dtype: str) -> None:
    """Every float tensor of every safetensors file under ``root`` rewritten as ``dtype``, one tensor at a time."""
    import jax.numpy as jnp
    from safetensors import safe_open

    from defi_jax.interop import _convert

    target = np.dtype(jnp.dtype(dtype))
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(folder, name)
                with safe_open(path, framework="pt") as f:
                    tensors = {k: (v.astype(target) if np.issubdtype(v.dtype, np.floating) else v)
                               for k, v in _convert.lazy_tensors(f).items()}
                    _convert.write_safetensors_file(path + ".cast", tensors, metadata={"format": "pt"})
                os.replace(path + ".cast", path)


# ---------------------------------------------------------------------------------------------------
# Loading back, strictly
# ---------------------------------------------------------------------------------------------------

def verify(path: str):
    """Loads every part of an exported folder back strictly; raises naming every mismatched tensor. Returns the
    ``DeFIPolicyTorch`` of a policy folder (on the CPU), else None."""
    from defi_jax_torch import policy as tpolicy

    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta["stage"] == "policy":
        return tpolicy.DeFIPolicyTorch.from_pretrained(path, device="cpu")
    if meta["stage"] == "gfdm":
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPTextModel
        tpolicy.load_diffusers(UNetSpatioTemporalConditionModel, os.path.join(path, "gfdm", "unet"))
        tpolicy.load_diffusers(AutoencoderKLTemporalDecoder, os.path.join(path, "gfdm", "vae"))
        tpolicy.load_transformers(CLIPTextModel, os.path.join(path, "gfdm", "text_encoder"))
        return None
    # gidm: the reference's stage-2 names, read back into our model strictly (defi_torch's own checks).
    import ml_collections
    from flax import nnx

    from defi_jax.gidm.model import LatentActionModel
    from defi_jax.interop import defi_torch

    with open(os.path.join(path, "gidm", "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    model = nnx.eval_shape(lambda: LatentActionModel(cfg, rngs=nnx.Rngs(0)))   # shapes only: every tensor is read
    tensors = {k: v.float().numpy() for k, v in tpolicy.read_safetensors(
        os.path.join(path, "gidm", "model.safetensors")).items()}
    defi_torch.load_gidm_state_dict(model, tensors)
    return None


def verify_lerobot(path: str) -> None:
    """The LeRobot folder's ``model.safetensors`` loaded strictly into the skeleton its ``defi/`` configs build
    (what LeRobot's ``DeFIPolicy.from_pretrained`` does, without LeRobot)."""
    import torch

    from defi_jax_torch import lerobot_folder
    from defi_jax_torch import policy as tpolicy

    holder = torch.nn.Module()
    holder.defi = tpolicy.DeFIPolicyTorch.from_configs(os.path.join(path, lerobot_folder.SKELETON))
    weights = os.path.join(path, lerobot_folder.WEIGHTS)
    tensors = tpolicy.read_safetensors(weights)
    expected = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    # safetensors stores a tied tensor once (under one of its names): the others are filled from it.
    problems = [p for p in tpolicy.mismatches(expected, {k: tuple(v.shape) for k, v in tensors.items()})
                if not (p.startswith("missing ") and _tied(holder, p.split()[1], tensors))]
    if problems:
        raise ValueError(f"{weights} does not match the policy ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))


def _tied(module, name: str, tensors) -> bool:
    """Whether parameter ``name`` shares its storage with a tensor present in ``tensors``."""
    state = module.state_dict(keep_vars=True)
    ptr = state[name].data_ptr()
    return any(k in tensors for k, v in state.items() if k != name and v.data_ptr() == ptr)


def _readme(meta: dict) -> str:
    stage = meta["stage"]
    lines = [f"# DeFI {stage} for PyTorch", "",
             f"Exported by `python -m launch.export_torch` from `{meta['source']['workdir']}` "
             f"(step {meta['source']['step'] or 'latest'}{', EMA' if meta['source']['ema'] else ''}), "
             f"{meta['dtype']} weights, {meta['created']}. Every weight file is safetensors (no pickle).", "",
             "| folder | what | load with |", "|---|---|---|"]
    rows = {
        "gfdm/unet": ("GFDM UNet (Stable Video Diffusion, language-conditioned)",
                      "`diffusers.UNetSpatioTemporalConditionModel.from_pretrained`"),
        "gfdm/vae": ("GFDM VAE", "`diffusers.AutoencoderKLTemporalDecoder.from_pretrained`"),
        "gfdm/text_encoder": ("GFDM instruction tower (CLIP last_hidden_state, 20 tokens, doubled on channels)",
                              "`transformers.CLIPTextModel.from_pretrained`"),
        "text_encoder": ("goal token (CLIP text_embeds)", "`transformers.CLIPTextModelWithProjection.from_pretrained`"),
        "gidm": ("GIDM encoder, VQ and instruction tower: `goal_emb.*`, `time_pos_emb`, `lam.*`" if stage == "policy"
                 else "GIDM (the reference's stage-2 state-dict names)", "`safetensors.torch.load_file`"),
        "policy": ("Video Former (`Video_Former.*`) and action head (`model.*`)", "`safetensors.torch.load_file`"),
        "lerobot": ("the LeRobot saved-policy folder (type `defi`; every weight again, in one file)",
                    "`defi_jax_torch.lerobot.DeFIPolicy.from_pretrained` (LeRobot installed)"),
    }
    lines += [f"| `{p}` | {rows[p][0]} | {rows[p][1]} |" for p in meta["parts"]]
    if stage == "policy":
        lines += ["", "The whole policy (needs `pip install defi-jax[torch] diffusers transformers`):", "", "```python",
                  "from defi_jax_torch import DeFIPolicyTorch",
                  "policy = DeFIPolicyTorch.from_pretrained(\"THIS_FOLDER\")           # CUDA when present",
                  f"actions = policy.act({{{', '.join(repr(v) + ': rgb_uint8_HW3' for v in meta['views'])}}}, "
                  f"\"open the drawer\")   # [{meta['horizon']}, {meta['action_dim']}]", "```", "",
                  f"Images: uint8 [H, W, 3], resized to {meta['resolution']} px. Actions are unnormalized with "
                  "`action_stats.json`. The GFDM runs "
                  f"{meta['gfdm_steps']} denoising step(s) (fps {meta['gfdm']['fps']}, motion bucket "
                  f"{meta['gfdm']['motion_bucket_id']}, noise aug 0, sigma of a {meta['gfdm']['feature_steps']}-step "
                  f"schedule); the head samples {meta['sample_steps']} DDIM steps down to sigma "
                  f"{meta['sample_sigma_min']}. `config.json` lists every setting. `gidm/` + `policy/` together are "
                  "the reference's stage-3 state dict (its trained part): "
                  "`DeFIPolicyTorch.load_stage3_state_dict` also reads the reference's released checkpoints."]
    return "\n".join(lines) + "\n"
