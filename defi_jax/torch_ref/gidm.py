"""PyTorch stand-in for the reference GIDM (DeFi ``Step2_GIDM/genie/modules``), for parity and benchmarks.

Same module tree and parameter names as the reference ``UncontrolledDINOLatentActionModel`` (so its
``state_dict()`` has the released checkpoint's key layout after the ``lam.`` prefix), same computation,
written from scratch. The frozen DINOv2 / T5 towers are not built here: ``forward_features`` takes their
outputs (DINO ``x_norm_patchtokens`` and T5 ``last_hidden_state``), which is the part the reference
trains. Includes the reference's quirks on purpose: the encoder's language mask is built with
``mask.repeat(T, 1)`` over ``(b T)``-ordered frames, and positional encodings cover frame tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class PositionalEncoding(nn.Module):
    def __init__(self, model_dim: int, max_len: int = 5000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, model_dim, 2, dtype=torch.float32) * -(math.log(10000.0) / model_dim))
        pe = torch.zeros(max_len, model_dim)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.pos_enc = pe   # a plain attribute in the reference: not in the state dict

    def forward(self, x):
        return x + self.pos_enc[:x.shape[2]].to(x)


class SelfAttention(nn.Module):
    def __init__(self, model_dim: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.scale = (model_dim // num_heads) ** -0.5
        self.to_q = nn.Linear(model_dim, model_dim, bias=False)
        self.to_k = nn.Linear(model_dim, model_dim, bias=False)
        self.to_v = nn.Linear(model_dim, model_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(model_dim, model_dim), nn.Dropout(0.0))

    def forward(self, x, is_causal: bool = False, attn_mask=None):
        b, n, c = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))
        bias = torch.zeros(n, n, dtype=q.dtype, device=q.device)
        if is_causal:
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            bias = bias.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            bias = bias[None].repeat(b, 1, 1).masked_fill(~(attn_mask > 0)[:, None, :], float("-inf"))[:, None]
        w = torch.softmax(q @ k.transpose(-2, -1) * self.scale + bias, dim=-1)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, c))


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim))


class SpatioTemporalBlock(nn.Module):
    def __init__(self, model_dim: int, num_heads: int):
        super().__init__()
        self.spatial_attn = SelfAttention(model_dim, num_heads)
        self.temporal_attn = SelfAttention(model_dim, num_heads)
        self.ffn = _ffn(model_dim)
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)
        self.norm3 = nn.LayerNorm(model_dim)

    def forward(self, x, causal_temporal: bool = False, attn_mask=None):
        b, t, s, e = x.shape
        x = x.reshape(b * t, s, e)
        x = x + self.spatial_attn(self.norm1(x), attn_mask=attn_mask)
        x = x.reshape(b, t, s, e).transpose(1, 2).reshape(b * s, t, e)
        x = x + self.temporal_attn(self.norm2(x), is_causal=causal_temporal)
        x = x.reshape(b, s, t, e).transpose(1, 2)
        return x + self.ffn(self.norm3(x))


class SpatioBlock(nn.Module):
    def __init__(self, model_dim: int, num_heads: int):
        super().__init__()
        self.spatial_attn = SelfAttention(model_dim, num_heads)
        self.ffn = _ffn(model_dim)
        self.norm1 = nn.LayerNorm(model_dim)
        self.norm2 = nn.LayerNorm(model_dim)

    def forward(self, x, attn_mask=None):
        b, t, s, e = x.shape
        x = x.reshape(b * t, s, e)
        x = x + self.spatial_attn(self.norm1(x), attn_mask=attn_mask)
        x = x.reshape(b, t, s, e)
        return x + self.ffn(self.norm2(x))


class SpatioTemporalTransformer(nn.Module):
    def __init__(self, in_dim, model_dim, out_dim, num_blocks, num_heads, causal_temporal=False, to_out=True):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, model_dim), nn.LayerNorm(model_dim))
        self.pos_enc = PositionalEncoding(model_dim)
        self.transformer_blocks = nn.ModuleList([SpatioTemporalBlock(model_dim, num_heads)
                                                 for _ in range(num_blocks)])
        self.out = nn.Linear(model_dim, out_dim) if to_out else nn.Identity()
        self.causal_temporal = causal_temporal

    def forward(self, x, lang_embed=None, attn_mask=None):
        x = self.pos_enc(self.ffn(x))
        if lang_embed is not None:
            x = torch.cat([x, lang_embed], dim=2)
        for block in self.transformer_blocks:
            x = block(x, self.causal_temporal, attn_mask)
        return self.out(x)


class SpatioTransformer(nn.Module):
    def __init__(self, in_dim, model_dim, out_dim, num_blocks, num_heads):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, model_dim), nn.LayerNorm(model_dim))
        self.pos_enc = PositionalEncoding(model_dim)
        self.transformer_blocks = nn.ModuleList([SpatioBlock(model_dim, num_heads) for _ in range(num_blocks)])
        self.out = nn.Linear(model_dim, out_dim)

    def forward(self, x, lang_embed=None, attn_mask=None):
        x = self.pos_enc(self.ffn(x))
        if lang_embed is not None:
            x = torch.cat([x, lang_embed], dim=2)
        for block in self.transformer_blocks:
            x = block(x, attn_mask=attn_mask)
        return self.out(x)


class VectorQuantizer(nn.Module):
    def __init__(self, num_latents: int, latent_dim: int):
        super().__init__()
        self.codebook = nn.Embedding(num_latents, latent_dim)
        self.codebook.weight.data.uniform_(-1.0 / num_latents, 1.0 / num_latents)

    def forward(self, x):
        indices = torch.argmin(torch.cdist(x, self.codebook.weight), dim=-1)
        z = self.codebook(indices)
        return x + (z - x).detach(), z, x, indices


class LatentActionModel(nn.Module):
    """The reference's ``UncontrolledDINOLatentActionModel`` minus its frozen DINOv2 / T5 towers."""

    num_codes = 4

    def __init__(self, dino_dim=768, model_dim=768, latent_dim=128, num_latents=16, enc_blocks=12,
                 dec_blocks=12, num_heads=12, text_dim=768, target_dim=None):
        super().__init__()
        self.latent_dim = latent_dim
        self.action_latent = nn.Parameter(torch.empty(1, 1, self.num_codes, dino_dim))
        nn.init.uniform_(self.action_latent, a=-1, b=1)
        self.encoder = SpatioTemporalTransformer(dino_dim, model_dim, latent_dim, enc_blocks, num_heads,
                                                 causal_temporal=True, to_out=False)
        self.to_codebook = nn.Linear(model_dim, latent_dim)
        self.vq = VectorQuantizer(num_latents, latent_dim)
        self.patch_up = nn.Linear(dino_dim, model_dim)
        self.action_up = nn.Linear(latent_dim, model_dim)
        self.decoder = SpatioTransformer(model_dim, model_dim, target_dim or dino_dim, dec_blocks, num_heads)
        self.lang_proj = nn.Linear(text_dim, model_dim)

    def forward_features(self, patches, text_hidden, text_mask):
        """patches [B,T,N,Dv] (DINO x_norm_patchtokens), text_hidden [B,L,768], text_mask [B,L]."""
        B, T, N, _ = patches.shape
        lang = self.lang_proj(text_hidden)
        mask = torch.cat([torch.ones(B, self.num_codes + N, dtype=text_mask.dtype, device=text_mask.device),
                          text_mask], dim=-1)
        tokens = torch.cat([self.action_latent.expand(B, T, -1, -1), patches], dim=2)
        z = self.encoder(tokens, lang[:, None].expand(B, T, -1, -1), mask.repeat(T, 1))
        z = self.to_codebook(z[:, 1:, :self.num_codes]).reshape(B * (T - 1), self.num_codes, self.latent_dim)
        z_q, emb_z, z_e, indices = self.vq(z)
        z_q = z_q.reshape(B, T - 1, self.num_codes, self.latent_dim)
        dec_in = torch.cat([self.action_up(z_q), self.patch_up(patches[:, :-1])], dim=2)
        recon = self.decoder(dec_in, lang[:, None], mask)[:, :, self.num_codes:self.num_codes + N]
        return {"recon": recon[:, 0], "z_q": z_q[:, 0], "z": emb_z, "emb": z_e, "indices": indices}

    def loss(self, outputs, target, beta: float = 0.25):
        """The reference's ``DINO_LAM.shared_step`` loss (``emb`` = encoder output, ``z`` = codebook rows)."""
        mse = ((target - outputs["recon"]) ** 2).mean()
        q_loss = ((outputs["emb"].detach() - outputs["z"]) ** 2).mean()
        commit = ((outputs["emb"] - outputs["z"].detach()) ** 2).mean()
        return mse + q_loss + beta * commit
