"""PyTorch stand-in for the reference DeFI stage-3 networks, for parity tests and export checks.

Same module trees and parameter names as the reference (DeFi ``Step3_DeFI/policy_models``): ``VideoFormer3D``
is ``Video_Former_3D`` (checkpoint prefix ``Video_Former.``), ``GCDenoiser`` with its ``inner_model`` is the
action head (prefix ``model.``), ``PolicyLatentActions`` holds the policy's ``goal_emb`` / ``time_pos_emb``
and the encoder-only latent action model ``lam`` (the frozen T5 tower excluded). Written from scratch
with the reference's computation, quirks included: the decoder's cross-attention uses torch's
``is_causal`` with 10 queries against 229 keys (top-left aligned), AdaLN has no "1 +", the unused
``pos_emb`` / ``proprio_emb`` / ``goal_emb`` of the inner model exist so the state dict has every key.
Also the reference's training sigma density, exponential schedule and "ddim" sampler.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from defi_jax.torch_ref.gidm import SpatioTemporalTransformer, VectorQuantizer

# ---------------------------------------------------------------------------------------------------
# Video Former
# ---------------------------------------------------------------------------------------------------


class PerceiverAttentionLayer(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features, latents):
        b, n, _ = features.shape
        q_len = latents.shape[1]
        x = self.norm_media(features)
        latents = self.norm_latents(latents)
        kv_in = torch.cat([x, latents], dim=1)

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q, k, v = heads(self.to_q(latents)), heads(self.to_k(kv_in)), heads(self.to_v(kv_in))
        sim = torch.einsum("bhqd,bhfd->bhqf", q * self.dim_head ** -0.5, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("bhqf,bhfd->bhqd", sim.softmax(dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, self.heads * self.dim_head))


class FusedAttention(nn.Module):
    """The Video Former's temporal ``Attention`` (qkv bias, no cross-attention, all-ones float mask)."""

    def __init__(self, dim: int, num_heads: int, num_frames: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_mask = torch.ones((num_frames, num_frames))   # added to the logits: a no-op, kept as is

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask.to(x))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def feed_forward_layer(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class VideoFormer3D(nn.Module):
    def __init__(self, dim=384, depth=6, condition_dim=2560, dim_head=64, heads=8, num_latents=224,
                 num_frame=16, num_time_embeds=16, ff_mult=4, temporal_heads=None):
        super().__init__()
        temporal_heads = heads if temporal_heads is None else temporal_heads   # one ``heads`` in the reference
        self.dim, self.num_frame = dim, num_frame
        self.goal_emb = nn.Sequential(nn.Linear(condition_dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.latents = nn.Parameter(torch.randn(num_frame, num_latents // num_frame, dim))
        self.time_pos_emb = nn.Parameter(torch.randn(num_time_embeds, 1, dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttentionLayer(dim, dim_head, heads),
                           FusedAttention(dim, temporal_heads, num_frame), feed_forward_layer(dim, ff_mult)])
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_f):
        b, T, n, _ = x_f.shape
        x_f = self.goal_emb(x_f) + self.time_pos_emb[:T].unsqueeze(0)
        x_f = x_f.reshape(b * T, n, self.dim)
        x = self.latents.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * T, -1, self.dim)
        q = x.shape[1]
        for attn, temp_attn, ffw in self.layers:
            x = x + attn(x_f, x)
            x = x.reshape(b, T, q, self.dim).transpose(1, 2).reshape(b * q, T, self.dim)
            x = x + temp_attn(x)
            x = x.reshape(b, q, T, self.dim).transpose(1, 2).reshape(b * T, q, self.dim)
            x = x + ffw(x)
        return self.norm(x.reshape(b, T * q, self.dim))


# ---------------------------------------------------------------------------------------------------
# Action head: DiffusionTransformer + GCDenoiser
# ---------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (the reference's, eps 1e-5)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, attn_pdrop, resid_pdrop, causal=False, bias=False):
        super().__init__()
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = nn.Dropout(attn_pdrop)
        self.resid_dropout = nn.Dropout(resid_pdrop)
        self.n_head, self.causal = n_head, causal

    def forward(self, x, context=None):
        B, T, C = x.shape
        src = x if context is None else context
        h = self.n_head
        k = self.key(src).view(B, -1, h, C // h).transpose(1, 2)
        q = self.query(x).view(B, T, h, C // h).transpose(1, 2)
        v = self.value(src).view(B, -1, h, C // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout.p if self.training else 0.0,
                                           is_causal=self.causal)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd, bias, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd, n_heads, attn_pdrop, resid_pdrop, mlp_pdrop, causal, use_cross_attention=False,
                 bias=False):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = Attention(n_embd, n_heads, attn_pdrop, resid_pdrop, causal, bias)
        self.use_cross_attention = use_cross_attention
        if use_cross_attention:
            self.cross_att = Attention(n_embd, n_heads, attn_pdrop, resid_pdrop, causal, bias)
            self.ln3 = nn.LayerNorm(n_embd)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias, mlp_pdrop)

    def forward(self, x, context=None):
        x = x + self.attn(self.ln_1(x))
        if self.use_cross_attention and context is not None:
            x = x + self.cross_att(self.ln3(x), context)
        return x + self.mlp(self.ln_2(x))


class AdaLNZero(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, c):
        return self.modulation(c).chunk(6, dim=-1)


class ConditionedBlock(Block):
    def __init__(self, n_embd, n_heads, attn_pdrop, resid_pdrop, mlp_pdrop, causal, use_cross_attention, bias=False):
        super().__init__(n_embd, n_heads, attn_pdrop, resid_pdrop, mlp_pdrop, causal, use_cross_attention, bias)
        self.adaLN_zero = AdaLNZero(n_embd)

    def forward(self, x, c, context=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_zero(c)
        x = x + gate_msa * self.attn(shift_msa + self.ln_1(x) * scale_msa)
        if self.use_cross_attention and context is not None:
            x = x + self.cross_att(self.ln3(x), context)
        return x + gate_mlp * self.mlp(shift_mlp + self.ln_2(x) * scale_mlp)


class TransformerEncoder(nn.Module):
    def __init__(self, embed_dim, n_heads, attn_pdrop, resid_pdrop, n_layers, mlp_pdrop, bias=False):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(embed_dim, n_heads, attn_pdrop, resid_pdrop, mlp_pdrop, causal=False,
                                            bias=bias) for _ in range(n_layers)])
        self.ln = LayerNorm(embed_dim, bias)

    def forward(self, x):
        for layer in self.blocks:
            x = layer(x)
        return self.ln(x)


class TransformerFiLMDecoder(nn.Module):
    def __init__(self, embed_dim, n_heads, attn_pdrop, resid_pdrop, n_layers, mlp_pdrop, bias=False,
                 cross_causal=True):
        super().__init__()
        self.blocks = nn.Sequential(*[ConditionedBlock(embed_dim, n_heads, attn_pdrop, resid_pdrop, mlp_pdrop,
                                                       causal=True, use_cross_attention=True, bias=bias)
                                      for _ in range(n_layers)])
        if not cross_causal:   # not in the reference: its ``"full"`` cross-attention counterpart
            for blk in self.blocks:
                blk.cross_att.causal = False
        self.ln = LayerNorm(embed_dim, bias)

    def forward(self, x, c, context):
        for layer in self.blocks:
            x = layer(x, c, context)
        return self.ln(x)


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        arg = x[:, None] * freqs[None, :]
        return torch.cat((arg.sin(), arg.cos()), dim=-1).to(x.dtype)


class DiffusionTransformer(nn.Module):
    """``use_original_diffusion_policy=False``, ``goal_conditioned=True``, ``use_mlp_goal=True``."""

    def __init__(self, obs_dim=384, goal_dim=512, action_dim=7, proprio_dim=8, embed_dim=384, n_dec_layers=4,
                 n_enc_layers=4, n_heads=8, n_obs_token=224, goal_seq_len=1, obs_seq_len=1, action_seq_len=10,
                 attn_pdrop=0.3, resid_pdrop=0.1, mlp_pdrop=0.05, latent_action_dim=768, cross_causal=True):
        super().__init__()
        seq_size = goal_seq_len + obs_seq_len * n_obs_token + action_seq_len
        self.tok_emb = nn.Linear(obs_dim, embed_dim)
        self.tok_emb_token = nn.Linear(latent_action_dim, embed_dim)
        self.goal_emb = nn.Sequential(nn.Linear(goal_dim, embed_dim * 2), nn.GELU(),
                                      nn.Linear(embed_dim * 2, embed_dim))   # unused by the reference
        self.lang_emb = nn.Sequential(nn.Linear(goal_dim, embed_dim * 2), nn.GELU(),
                                      nn.Linear(embed_dim * 2, embed_dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_size, embed_dim))   # unused by the reference
        self.encoder = TransformerEncoder(embed_dim, n_heads, attn_pdrop, resid_pdrop, n_enc_layers, mlp_pdrop)
        self.decoder = TransformerFiLMDecoder(embed_dim, n_heads, attn_pdrop, resid_pdrop, n_dec_layers, mlp_pdrop,
                                              cross_causal=cross_causal)
        self.proprio_emb = nn.Sequential(nn.Linear(proprio_dim, embed_dim * 2), nn.Mish(),
                                         nn.Linear(embed_dim * 2, embed_dim))   # unused by the reference
        self.sigma_emb = nn.Sequential(SinusoidalPosEmb(embed_dim), nn.Linear(embed_dim, embed_dim * 2), nn.Mish(),
                                       nn.Linear(embed_dim * 2, embed_dim))
        self.action_emb = nn.Linear(action_dim, embed_dim)
        self.action_pred = nn.Linear(embed_dim, action_dim)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, DiffusionTransformer):
            torch.nn.init.normal_(module.pos_emb, mean=0.0, std=0.02)

    def forward_enc_only(self, video_tokens, latent_tokens, goals):
        x = torch.cat([self.lang_emb(goals), self.tok_emb(video_tokens), self.tok_emb_token(latent_tokens)], dim=1)
        return self.encoder(x)

    def forward_dec_only(self, context, actions, sigma):
        emb_t = self.sigma_emb((sigma.log() / 4)[:, None])
        return self.action_pred(self.decoder(self.action_emb(actions), emb_t, context))

    def forward(self, video_tokens, latent_tokens, actions, goals, sigma):
        return self.forward_dec_only(self.forward_enc_only(video_tokens, latent_tokens, goals), actions, sigma)


class GCDenoiser(nn.Module):
    def __init__(self, sigma_data=0.5, **inner):
        super().__init__()
        self.inner_model = DiffusionTransformer(**inner)
        self.sigma_data = sigma_data

    def get_scalings(self, sigma):
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out, c_in

    def loss(self, video_tokens, latent_tokens, action, goal, noise, sigma):
        c_skip, c_out, c_in = (c[:, None, None] for c in self.get_scalings(sigma))
        noised = action + noise * sigma[:, None, None]
        out = self.inner_model(video_tokens, latent_tokens, noised * c_in, goal, sigma)
        target = (action - c_skip * noised) / c_out
        return (out - target).pow(2).flatten(1).mean()

    def forward(self, video_tokens, latent_tokens, action, goal, sigma):
        c_skip, c_out, c_in = (c[:, None, None] for c in self.get_scalings(sigma))
        return self.inner_model(video_tokens, latent_tokens, action * c_in, goal, sigma) * c_out + action * c_skip


def get_sigmas_exponential(n, sigma_min, sigma_max):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def rand_log_logistic(shape, loc=0.0, scale=1.0, min_value=0.0, max_value=float("inf"), generator=None):
    min_cdf = torch.as_tensor(min_value, dtype=torch.float64).log().sub(loc).div(scale).sigmoid()
    max_cdf = torch.as_tensor(max_value, dtype=torch.float64).log().sub(loc).div(scale).sigmoid()
    u = torch.rand(shape, dtype=torch.float64, generator=generator) * (max_cdf - min_cdf) + min_cdf
    return u.logit().mul(scale).add(loc).exp().to(torch.float32)


@torch.no_grad()
def sample_ddim(model: GCDenoiser, video_tokens, latent_tokens, action, goal, sigmas):
    """The reference's DPM-Solver-1 loop: the whole denoiser (encoder included) runs at every step."""
    s_in = action.new_ones([action.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(video_tokens, latent_tokens, action, goal, sigmas[i] * s_in)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        action = ((-t_next).exp() / (-t).exp()) * action - (-h).expm1() * denoised
    return action


# ---------------------------------------------------------------------------------------------------
# GIDM at fine-tuning
# ---------------------------------------------------------------------------------------------------


class EncoderOnlyLAM(nn.Module):
    """The stage-3 ``UncontrolledDINOLatentActionModel`` without T5 (text features come in precomputed)."""

    num_codes = 4

    def __init__(self, dino_dim=768, model_dim=768, latent_dim=128, num_latents=16, enc_blocks=12, num_heads=12,
                 text_dim=768):
        super().__init__()
        self.latent_dim = latent_dim
        self.action_latent = nn.Parameter(torch.empty(1, 1, self.num_codes, dino_dim).uniform_(-1, 1))
        self.encoder = SpatioTemporalTransformer(dino_dim, model_dim, latent_dim, enc_blocks, num_heads,
                                                 causal_temporal=True, to_out=False)
        self.to_codebook = nn.Linear(model_dim, latent_dim)
        self.vq = VectorQuantizer(num_latents, latent_dim)
        self.action_up = nn.Linear(latent_dim, model_dim)
        self.lang_proj = nn.Linear(text_dim, model_dim)

    def forward(self, feats, text_hidden, text_mask):
        B, T, N, _ = feats.shape
        lang = self.lang_proj(text_hidden)
        mask = torch.cat([torch.ones(B, self.num_codes + N, dtype=text_mask.dtype, device=text_mask.device),
                          text_mask], dim=-1)
        tokens = torch.cat([self.action_latent.expand(B, T, -1, -1), feats], dim=2)
        z = self.encoder(tokens, lang[:, None].expand(B, T, -1, -1), mask.repeat(T, 1))   # the row-order quirk
        z = self.to_codebook(z[:, 1:, :self.num_codes]).reshape(B * (T - 1), self.num_codes, self.latent_dim)
        z_q, emb_z, z_e, indices = self.vq(z)
        return {"tokens": self.action_up(z_q), "z_q": z_q, "z": emb_z, "emb": z_e, "indices": indices}


class PolicyLatentActions(nn.Module):
    def __init__(self, condition_dim=2560, width=768, frames=(0, 5), **lam):
        super().__init__()
        self.frames = frames
        self.goal_emb = nn.Sequential(nn.Linear(condition_dim, width), nn.GELU(), nn.Linear(width, width))
        self.time_pos_emb = nn.Parameter(torch.randn(2, 1, width))
        self.lam = EncoderOnlyLAM(dino_dim=width, **lam)

    def forward(self, feats, text_hidden, text_mask):
        pair = torch.stack([feats[:, self.frames[0]], feats[:, self.frames[1]]], dim=1)
        out = self.lam(self.goal_emb(pair) + self.time_pos_emb.unsqueeze(0), text_hidden, text_mask)
        out["codebook_loss"] = ((out["emb"].detach() - out["z"]) ** 2).mean()
        out["commitment_loss"] = ((out["emb"] - out["z"].detach()) ** 2).mean()
        return out
