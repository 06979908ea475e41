"""``DeFIPolicyTorch``: the DeFI policy (stage 3) in PyTorch, from a folder of ``launch.export_torch``.

Folder layout (every weight file is safetensors; nothing is unpickled)::

    OUT/config.json                  sizes, views, resolution, horizon, tokenizers, sampler, GFDM feature settings
    OUT/gfdm/unet, OUT/gfdm/vae      diffusers UNetSpatioTemporalConditionModel / AutoencoderKLTemporalDecoder
    OUT/gfdm/text_encoder            transformers CLIPTextModel (the GFDM's instruction tower)
    OUT/text_encoder                 transformers CLIPTextModelWithProjection (the goal token)
    OUT/gidm                         config.json + model.safetensors: goal_emb.*, time_pos_emb, lam.* (the GIDM
                                     encoder, VQ and its instruction tower ``lam.text_encoder.*``)
    OUT/policy                       config.json + model.safetensors: Video_Former.*, model.* (the action head)
    OUT/action_stats.json            the statistics actions are unnormalized with (+ action_stats.safetensors)

Parameter names are the reference's stage-3 state dict (``Video_Former.``, ``model.``, ``goal_emb.``,
``time_pos_emb``, ``lam.``), so :meth:`DeFIPolicyTorch.load_stage3_state_dict` also reads the reference's
released checkpoints' trained part. Loading is strict: one ``ValueError`` lists every missing, unexpected and
mis-shaped tensor with both shapes.

The computation is ``defi_jax.policy.model.DeFIPolicyModel.act``'s: per view, the GFDM's one-step features
(VAE posterior mode, unscaled; noise x init_noise_sigma, c_in scaling; the UNet cut after
``up_blocks[feature_up_blocks - 1]``, earlier outputs nearest-upsampled, concatenated on channels), the views
stacked on the batch; the Video Former, the GIDM's latent-action tokens of the static view, the CLIP goal token;
the head's encoder once, then the DDIM (DPM-Solver-1) sampler. Works under ``torch.compile`` (``compile=True``
compiles the features and the head; checked on the CPU with the tiny policy: the compiled ``act`` matches the
eager one to 2e-7 relative, but inductor's first CPU compile takes minutes, so the test suite does not run it).
``act`` takes one observation: the GIDM's language mask then needs no row-order convention (the reference's
``reference_mask_order`` quirk and the fixed order agree for a batch of one).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from defi_jax.torch_ref import policy as tp

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------------------
# Strict, pickle-free weights
# ---------------------------------------------------------------------------------------------------

def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged or truncated file fails naming it."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (re-export the folder with python -m launch.export_torch)")
    try:
        return load_file(path)
    except Exception as err:   # noqa: BLE001 - SafetensorError / OSError variants
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the file is "
                         f"damaged or truncated, re-export the folder") from err


def mismatches(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
    """One line per missing / unexpected / mis-shaped name, with both shapes."""
    lines = [f"missing {k} {list(s)}" for k, s in sorted(expected.items()) if k not in found]
    lines += [f"unexpected {k} {list(s)}" for k, s in sorted(found.items()) if k not in expected]
    lines += [f"mis-shaped {k}: file {list(found[k])}, model {list(s)}" for k, s in sorted(expected.items())
              if k in found and tuple(found[k]) != tuple(s)]
    return lines


def strict_load(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """``module.load_state_dict(tensors)`` after checking every name and shape; one error lists every problem."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = mismatches(expected, {k: tuple(v.shape) for k, v in tensors.items()})
    if problems:
        raise ValueError(f"{what} does not match the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    module.load_state_dict(dict(tensors), strict=True)
    return module


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------

class ByteTextEncoder(nn.Module):
    """The tiny GIDM's instruction tower: an embedding over UTF-8 bytes (``lam.text_encoder.embed.weight``)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """``defi_jax.gfdm.edm.karras_sigmas``: decreasing Karras levels and a final 0, float32."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return np.concatenate([(max_inv + ramp * (min_inv - max_inv)) ** rho, [0.0]]).astype(np.float32)


def sincos_1d(dim: int, length: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def unet_up_block_features(unet, sample, timestep, encoder_hidden_states, added_time_ids, num_up_blocks: int):
    """diffusers' ``UNetSpatioTemporalConditionModel.forward`` stopped after ``up_blocks[num_up_blocks - 1]``:
    the outputs of the first ``num_up_blocks`` up blocks, each [B*T, C, h, w]."""
    batch_size, num_frames = sample.shape[:2]
    timesteps = timestep.expand(batch_size)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(sample.dtype))
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape(batch_size, -1).to(emb.dtype)
    emb = emb + unet.add_embedding(time_embeds)
    sample = sample.flatten(0, 1)
    emb = emb.repeat_interleave(num_frames, dim=0)
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
    sample = unet.conv_in(sample)
    indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)
    res = (sample,)
    for block in unet.down_blocks:
        kw = dict(encoder_hidden_states=encoder_hidden_states) if getattr(block, "has_cross_attention", False) else {}
        sample, more = block(hidden_states=sample, temb=emb, image_only_indicator=indicator, **kw)
        res += more
    sample = unet.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                            image_only_indicator=indicator)
    outs = []
    for block in unet.up_blocks[:num_up_blocks]:
        skips, res = res[-len(block.resnets):], res[:-len(block.resnets)]
        kw = dict(encoder_hidden_states=encoder_hidden_states) if getattr(block, "has_cross_attention", False) else {}
        sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, image_only_indicator=indicator,
                       **kw)
        outs.append(sample)
    return outs


def _make_tokenizer(spec: Mapping, root: str):
    """One text tower's tokenizer from the folder's ``config.json`` entry (pure Python / numpy)."""
    n = int(spec["max_length"])
    kind = spec["kind"]
    if kind == "clip_bytes":
        from defi_jax.models.byte_tokenizer import clip_bytes
        return lambda t: clip_bytes(t, n)
    if kind == "gidm_bytes":
        from defi_jax.models.byte_tokenizer import gidm_bytes
        return lambda t: gidm_bytes(t, n)
    path = os.path.join(root, spec["path"])
    if kind == "clip_bpe":
        from defi_jax.models.clip_tokenizer import CLIPTokenizer
        tok = CLIPTokenizer.from_folder(path)
        return lambda t: tuple(np.asarray(a[0]) for a in tok([t], max_length=n))
    if kind == "t5_sentencepiece":
        from defi_jax.models.t5_tokenizer import T5Tokenizer
        tok = T5Tokenizer(path)
        return lambda t: tuple(np.asarray(a) for a in tok.encode_padded(t, n))
    raise ValueError(f"{root}/{CONFIG}: unknown tokenizer kind {kind!r}")


def _resize(image, size: int, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image {name!r}: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------------
# The networks from the folder's config
# ---------------------------------------------------------------------------------------------------

def build_video_former(c: Mapping) -> tp.VideoFormer3D:
    vf, T = c["video_former"], c["gfdm"]["num_frames"]
    return tp.VideoFormer3D(dim=vf["dim"], depth=vf["depth"], condition_dim=c["feature_dim"], dim_head=vf["dim_head"],
                            heads=vf["heads"], num_latents=T * vf["queries_per_frame"], num_frame=T,
                            num_time_embeds=vf.get("num_time_embeds", T), ff_mult=vf.get("ff_mult", 4),
                            temporal_heads=vf.get("temporal_heads") or vf["heads"])


def build_head(c: Mapping) -> tp.GCDenoiser:
    h, vf = c["head"], c["video_former"]
    return tp.GCDenoiser(sigma_data=h["sigma_data"], obs_dim=vf["dim"], goal_dim=c["goal_dim"],
                         action_dim=c["action_dim"], proprio_dim=c.get("proprio_dim", 8), embed_dim=h["dim"],
                         n_dec_layers=h["dec_layers"], n_enc_layers=h["enc_layers"], n_heads=h["heads"],
                         n_obs_token=c["gfdm"]["num_frames"] * vf["queries_per_frame"],
                         action_seq_len=c["horizon"], latent_action_dim=c["gidm"]["model_dim"],
                         attn_pdrop=h.get("attn_pdrop", 0.0), resid_pdrop=h.get("resid_pdrop", 0.0),
                         mlp_pdrop=h.get("mlp_pdrop", 0.0), cross_causal=h.get("cross_attention", "causal") == "causal")


def build_latent_actions(c: Mapping) -> tuple[nn.Sequential, tp.EncoderOnlyLAM]:
    """``goal_emb`` and ``lam`` (the GIDM encoder, VQ and its instruction tower ``lam.text_encoder``)."""
    g, width = c["gidm"], c["gidm"]["feature_dim"]
    goal_emb = nn.Sequential(nn.Linear(c["feature_dim"], width), nn.GELU(), nn.Linear(width, width))
    lam = tp.EncoderOnlyLAM(dino_dim=width, model_dim=g["model_dim"], latent_dim=g["latent_dim"],
                         num_latents=g["num_latents"], enc_blocks=g["enc_blocks"], num_heads=g["num_heads"],
                         text_dim=g["text_dim"])
    if g["text_encoder"] == "bytes":
        lam.text_encoder = ByteTextEncoder(g["bytes_vocab_size"], g["text_dim"])
    else:
        from transformers import T5Config, T5EncoderModel
        lam.text_encoder = T5EncoderModel(T5Config(**g["t5"]))
    return goal_emb, lam


# ---------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------

class DeFIPolicyTorch(nn.Module):
    """Every network of the policy; build with :meth:`from_pretrained`.

    Trained parts under the reference's stage-3 names (``Video_Former``, ``model``, ``goal_emb``,
    ``time_pos_emb``, ``lam``); frozen towers as ``unet``, ``vae``, ``gfdm_text``, ``goal_text``.
    """

    def __init__(self, config: Mapping, *, unet, vae, gfdm_text, goal_text, root: str = ""):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.views = tuple(c["views"])
        self.resolution = int(c["resolution"])
        self.unet, self.vae, self.gfdm_text, self.goal_text = unet, vae, gfdm_text, goal_text
        self.Video_Former = build_video_former(c)
        self.model = build_head(c)
        self.goal_emb, self.lam = build_latent_actions(c)
        self.time_pos_emb = nn.Parameter(torch.zeros(2, 1, c["gidm"]["feature_dim"]))
        self.latent_action_frames = tuple(int(f) for f in c["latent_action_frames"])
        self._tokenizers = [_make_tokenizer(s, root) for s in c["tokenizers"]]
        self.action_stats = c.get("action_stats", {"normalized": False})
        self._text_cache: dict[str, dict] = {}
        self._features_fn, self._head_fn = self.features, self._context_and_sample

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, *, compile: bool = False) -> DeFIPolicyTorch:
        """The policy of an exported folder, strictly loaded, in eval mode on ``device`` (default: CUDA when
        present). ``dtype`` (default: the folder's) is the GFDM's and the CLIP towers'; the Video Former, the
        GIDM and the head (small) compute in float32. ``compile=True``: ``torch.compile`` the features and the
        head."""
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        path = os.path.abspath(path)
        config = _read_config(path)
        unet = load_diffusers(UNetSpatioTemporalConditionModel, os.path.join(path, "gfdm", "unet"))
        vae = load_diffusers(AutoencoderKLTemporalDecoder, os.path.join(path, "gfdm", "vae"))
        gfdm_text = load_transformers(CLIPTextModel, os.path.join(path, "gfdm", "text_encoder"))
        goal_text = load_transformers(CLIPTextModelWithProjection, os.path.join(path, "text_encoder"))
        policy = cls(config, unet=unet, vae=vae, gfdm_text=gfdm_text, goal_text=goal_text, root=path)
        tensors = {}
        for part in ("gidm", "policy"):
            tensors.update(read_safetensors(os.path.join(path, part, WEIGHTS)))
        policy.load_stage3_state_dict(tensors, what=f"{path}/{{gidm,policy}}/{WEIGHTS}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or getattr(torch, config.get("dtype", "float32"))
        policy = policy.to(device=device).eval()
        for tower in (policy.unet, policy.vae, policy.gfdm_text, policy.goal_text):
            tower.to(dtype=dtype)   # the frozen towers in ``dtype``; the adapter and the head stay float32
        if compile:
            policy._features_fn = torch.compile(policy.features)
            policy._head_fn = torch.compile(policy._context_and_sample)
        return policy

    @classmethod
    def from_configs(cls, path: str) -> DeFIPolicyTorch:
        """The policy's networks built from the ``config.json`` files of a folder's parts, randomly initialised
        (float32, CPU): the skeleton a whole-policy state dict (``state_dict()``) loads into. ``path`` needs the
        folder's ``config.json``, ``gfdm/{unet,vae,text_encoder}/config.json``, ``text_encoder/config.json``
        and ``tokenizers/``; no weight file is read."""
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        path = os.path.abspath(path)
        config = _read_config(path)
        towers = {}
        for name, model_cls, folder in (("unet", UNetSpatioTemporalConditionModel, "gfdm/unet"),
                                        ("vae", AutoencoderKLTemporalDecoder, "gfdm/vae")):
            towers[name] = model_cls.from_config(model_cls.load_config(os.path.join(path, folder)))
        for name, model_cls, folder in (("gfdm_text", CLIPTextModel, "gfdm/text_encoder"),
                                        ("goal_text", CLIPTextModelWithProjection, "text_encoder")):
            towers[name] = model_cls(CLIPTextConfig.from_pretrained(os.path.join(path, folder)))
        return cls(config, root=path, **towers).eval()

    def trained_modules(self) -> nn.Module:
        """The stage-3 trained part as one module whose state dict has the reference's names."""
        holder = nn.Module()
        for name in ("Video_Former", "model", "goal_emb", "lam"):
            holder.add_module(name, getattr(self, name))
        holder.time_pos_emb = self.time_pos_emb
        return holder

    def load_stage3_state_dict(self, tensors: Mapping[str, torch.Tensor], *, what: str = "stage-3 state dict",
                               skip_frozen: bool = False) -> None:
        """Strictly loads ``Video_Former.*``, ``model.*``, ``goal_emb.*``, ``time_pos_emb``, ``lam.*``.

        ``skip_frozen`` (a reference checkpoint): the GFDM (``TVP_encoder.``) and the goal CLIP
        (``language_goal.``) keys are ignored (they load from their own folders). T5's tied
        ``encoder.embed_tokens.weight`` is filled from ``shared.weight`` when absent.
        """
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
        if skip_frozen:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(("TVP_encoder.", "language_goal."))}
        tied, shared = "lam.text_encoder.encoder.embed_tokens.weight", "lam.text_encoder.shared.weight"
        holder = self.trained_modules()
        if tied in holder.state_dict() and tied not in tensors and shared in tensors:
            tensors[tied] = tensors[shared]
        strict_load(holder, tensors, what)

    # ---- the computation -------------------------------------------------------------------------
    def _ids(self, instruction: str) -> list[torch.Tensor]:
        dev = self.time_pos_emb.device
        out = []
        for tok in self._tokenizers:
            ids, mask = tok(instruction)
            out += [torch.as_tensor(np.asarray(ids, np.int64), device=dev)[None],
                    torch.as_tensor(np.asarray(mask, np.int64), device=dev)[None]]
        return out

    @torch.no_grad()
    def encode_instruction(self, instruction: str) -> dict:
        """The three text towers' outputs for one instruction (cached per string): ``gfdm`` [1, L, 2D],
        ``goal`` [1, 1, P], ``gidm`` [1, L', text_dim] and ``gidm_mask``."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        if instruction not in self._text_cache:
            g = self.config["gfdm"]
            gi, gm, oi, om, ti, tm = self._ids(instruction)
            hidden = self.gfdm_text(input_ids=gi, attention_mask=gm).last_hidden_state[:, :g["text_tokens"]]
            if g.get("text_position_encoding", False):
                hidden = hidden + torch.as_tensor(sincos_1d(hidden.shape[-1], hidden.shape[1])).to(hidden)
            goal = self.goal_text(input_ids=oi, attention_mask=om).text_embeds[:, None]
            gidm = self.lam.text_encoder(input_ids=ti, attention_mask=tm)
            gidm = getattr(gidm, "last_hidden_state", gidm)
            self._text_cache[instruction] = {"gfdm": torch.cat([hidden, hidden], dim=-1), "goal": goal,
                                             "gidm": gidm, "gidm_mask": tm}
        return self._text_cache[instruction]

    def features(self, frames_BVHW3: torch.Tensor, gfdm_text_BLD: torch.Tensor, noise_NTchw: torch.Tensor):
        """GFDM one-step features [B, V, T, h*w, C] (float32); ``noise``: unit Gaussian [B*V, T, 4, h, w]."""
        g = self.config["gfdm"]
        B, V = frames_BVHW3.shape[:2]
        dtype = self.unet.dtype
        x = frames_BVHW3.reshape(B * V, *frames_BVHW3.shape[2:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        text = gfdm_text_BLD.repeat_interleave(V, dim=0).to(dtype)
        cond = self.vae.encode(x.to(dtype)).latent_dist.mode()
        sigmas = karras_sigmas(g["feature_steps"], g["sigma_min"], g["sigma_max"], g["rho"])
        N, T = noise_NTchw.shape[:2]
        lat = noise_NTchw.float() * float(np.sqrt(np.max(sigmas) ** 2 + 1.0))
        time_ids = torch.tensor([[g["fps"], g["motion_bucket_id"], g["noise_aug"]]], dtype=dtype,
                                device=x.device).expand(N, 3)

        def unet_input(lat, sigma):
            c_in = 1.0 / math.sqrt(sigma ** 2 + 1.0)
            sample = torch.cat([lat * c_in, cond[:, None].float().expand(-1, T, -1, -1, -1)], dim=2)
            return sample.to(dtype), torch.tensor(math.log(sigma) / 4.0, dtype=dtype, device=x.device)

        for i in range(int(self.config["gfdm_steps"]) - 1):   # the multi-step ablation: Euler steps first
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            sample, t = unet_input(lat, s)
            v = self.unet(sample, t, encoder_hidden_states=text, added_time_ids=time_ids).sample.float()
            x0 = lat / (s ** 2 + 1.0) - s / math.sqrt(s ** 2 + 1.0) * v
            lat = lat + (lat - x0) / s * (s_next - s)
        sample, t = unet_input(lat, float(sigmas[int(self.config["gfdm_steps"]) - 1]))
        ups = unet_up_block_features(self.unet, sample, t, text, time_ids, int(g["feature_up_blocks"]))
        last = ups[-1]
        parts = [F.interpolate(u, scale_factor=last.shape[-1] // u.shape[-1]) for u in ups[:-1]] + [last]
        feats = torch.cat([p.float() for p in parts], dim=1)                        # [N*T, C, h, w]
        C, h, w = feats.shape[1:]
        return feats.reshape(B, V, T, C, h * w).transpose(3, 4)

    def _context_and_sample(self, feats_BVTNC, goal, gidm, gidm_mask, noise_BAC):
        dtype = self.time_pos_emb.dtype
        B, V, T, N, C = feats_BVTNC.shape
        feats_BVTNC = feats_BVTNC.to(dtype)
        video = self.Video_Former(feats_BVTNC.transpose(1, 2).reshape(B, T, V * N, C))
        f0, f1 = self.latent_action_frames
        pair = torch.stack([feats_BVTNC[:, 0, f0], feats_BVTNC[:, 0, f1]], dim=1)   # static view
        tokens = self.lam(self.goal_emb(pair) + self.time_pos_emb.unsqueeze(0), gidm.to(dtype), gidm_mask)["tokens"]
        inner = self.model.inner_model
        context = inner.forward_enc_only(video, tokens, goal.to(dtype))
        h = self.config["head"]
        sigmas = tp.get_sigmas_exponential(int(self.config["sample_steps"]), float(self.config["sample_sigma_min"]),
                                           float(h["sigma_max"])).to(noise_BAC.device)
        x = noise_BAC.to(dtype) * float(h["sigma_max"])
        sd = self.model.sigma_data
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(B).to(dtype)
            c_skip = sd ** 2 / (s ** 2 + sd ** 2)
            c_out = s * sd / (s ** 2 + sd ** 2) ** 0.5
            c_in = 1 / (s ** 2 + sd ** 2) ** 0.5
            out = inner.forward_dec_only(context, x * c_in[:, None, None], s)
            denoised = c_skip[:, None, None] * x + c_out[:, None, None] * out
            if i == len(sigmas) - 2:   # the last sigma is 0: the sampler returns the denoised actions
                x = denoised
            else:
                r = sigmas[i + 1] / sigmas[i]
                x = r * x - torch.expm1(torch.log(r)) * denoised
        return x.float()

    def initial_noise(self, generator: torch.Generator | None = None) -> dict:
        """The noise of one ``act``: ``gfdm`` [V, T, 4, h, w] and ``actions`` [horizon, action_dim], unit Gaussian."""
        g = self.config["gfdm"]
        h = self.resolution // g["vae_downsample"]
        shapes = {"gfdm": (len(self.views), g["num_frames"], g["latent_channels"], h, h),
                  "actions": (self.config["horizon"], self.config["action_dim"])}
        return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}

    @torch.no_grad()
    def act(self, images: Mapping[str, np.ndarray], instruction: str, *, generator: torch.Generator | None = None,
            noise: Mapping[str, np.ndarray | torch.Tensor] | None = None, normalized: bool = False) -> np.ndarray:
        """float32 [horizon, action_dim] robot actions for one observation.

        ``noise``: ``{"gfdm": [V, T, 4, h, w], "actions": [horizon, action_dim]}`` unit Gaussian (see
        :meth:`initial_noise`), else drawn from ``generator``. ``normalized=True``: the model's units.
        """
        missing = [v for v in self.views if v not in images]
        if missing:
            raise KeyError(f"missing view(s) {missing}; the policy reads {list(self.views)}")
        dev = self.time_pos_emb.device
        frames = np.stack([_resize(images[v], self.resolution, v) for v in self.views])[None]
        noise = dict(noise) if noise is not None else self.initial_noise(generator)
        text = self.encode_instruction(instruction)
        feats = self._features_fn(torch.as_tensor(frames, device=dev), text["gfdm"],
                                  torch.as_tensor(noise["gfdm"], device=dev).float())
        out = self._head_fn(feats, text["goal"], text["gidm"], text["gidm_mask"],
                            torch.as_tensor(noise["actions"], device=dev).float()[None])
        actions = out[0].cpu().numpy().astype(np.float32)
        return actions if normalized else unnormalize(actions, self.action_stats)


def _read_config(path: str) -> dict:
    """A policy folder's ``config.json`` (format and stage checked)."""
    cfg_file = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: not a DeFI PyTorch folder (write one with python -m "
                                f"launch.export_torch)")
    with open(cfg_file) as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("stage") != "policy":
        raise ValueError(f"{cfg_file}: format {config.get('format')!r} stage {config.get('stage')!r}; this "
                         f"reads format {FORMAT} policy folders")
    return config


def unnormalize(actions: np.ndarray, stats_asset: Mapping) -> np.ndarray:
    """``data_pipelines.actions.unnormalize`` for the [-1, 1] quantile scheme: q01..q99 for the first six
    dimensions, the gripper to [0, 1]; identity for raw actions."""
    if not stats_asset.get("normalized", False):
        return np.asarray(actions, np.float32)
    lo = np.asarray(stats_asset["stats"]["q01"], np.float32)[:6]
    hi = np.asarray(stats_asset["stats"]["q99"], np.float32)[:6]
    pos = (np.clip(actions[..., :6], -1, 1) + 1) / 2 * (hi - lo) + lo
    grip = (np.clip(actions[..., 6:], -1, 1) + 1) / 2
    return np.concatenate([pos, grip], axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Library folders, strictly
# ---------------------------------------------------------------------------------------------------

def _loading_problems(info: Mapping, path: str) -> list[str]:
    lines = [f"missing {k}" for k in info.get("missing_keys", [])]
    lines += [f"unexpected {k}" for k in info.get("unexpected_keys", [])]
    for item in info.get("mismatched_keys", []):
        k, file_shape, model_shape = (tuple(item) + (None, None))[:3]
        lines.append(f"mis-shaped {k}: file {list(file_shape or [])}, model {list(model_shape or [])}")
    return lines


def load_diffusers(cls, path: str):
    """``cls.from_pretrained(path)`` (safetensors only) failing on any missing / unexpected / mis-shaped tensor."""
    try:
        model, info = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                          low_cpu_mem_usage=False)
    except Exception as err:   # noqa: BLE001 - diffusers raises ValueError / OSError / SafetensorError
        raise ValueError(f"{path}: cannot load a diffusers {cls.__name__} ({type(err).__name__}: {err})") from err
    problems = _loading_problems(info, path)
    if problems:
        raise ValueError(f"{path}: {cls.__name__} weights do not match its config:\n  " + "\n  ".join(problems))
    return model.eval()


def load_transformers(cls, path: str):
    """``cls.from_pretrained(path)`` (safetensors only) failing on any missing / unexpected / mis-shaped tensor."""
    try:
        model, info = cls.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    except Exception as err:   # noqa: BLE001
        raise ValueError(f"{path}: cannot load a transformers {cls.__name__} ({type(err).__name__}: {err})") from err
    problems = [p for p in _loading_problems(info, path) if not p.endswith("position_ids")]
    if problems:
        raise ValueError(f"{path}: {cls.__name__} weights do not match its config:\n  " + "\n  ".join(problems))
    return model.eval()
