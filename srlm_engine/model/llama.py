"""Llama: RMSNorm, rotary embeddings (with `llama3` scaling), grouped-query attention, SwiGLU.

Single-device, plain PyTorch; sharding is applied from outside (train/parallel.py). Parameter
names are Hugging Face's without the leading "model.", so weights.py maps names one to one;
weights.py loads and saves a Llama (load_model, save_model), and this file knows nothing of files.

One forward serves both callers. Leading dimensions are free: training passes input_ids [B, T]
and gets causal attention over each row; the engine passes packed tokens [N] with their
positions and an `attend` callable that owns the paged KV cache. The model never knows which.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from srlm_engine.config import ModelConfig
from srlm_engine.model.fused import rms_norm, rope, swiglu

# attend(layer_index, q [..., nh, hd], k [..., nkv, hd], v [..., nkv, hd]) -> [..., nh, hd]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, as transformers computes them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate the band between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, attend: Attend, layer: int) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.nh, self.hd)
        k = self.k_proj(x).view(*lead, self.nkv, self.hd)
        v = self.v_proj(x).view(*lead, self.nkv, self.hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = attend(layer, q, k, v)  # [..., nh, hd]
        return self.o_proj(o.reshape(*lead, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend: Attend, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_attend(layer: int, q, k, v) -> torch.Tensor:
    """Dense causal attention over rows: q [B, T, nh, hd], k/v [B, T, nkv, hd] -> [B, T, nh, hd]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


def segment_attend(segments: torch.Tensor) -> Attend:
    """Attention over one packed row [1, N] of sequences that share a prefix (train/batches.Packed):
    `segments` [N] is 0 for the shared prefix and r + 1 for sequence r's own tokens, which follow
    it in order. A token attends to the tokens before it that are in the prefix or in its own
    segment: what it attends to in its own unpacked sequence. A dense [N, N] mask."""
    i = torch.arange(len(segments), device=segments.device)
    mask = (i[None, :] <= i[:, None]) & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None]))

    def attend(layer: int, q, k, v) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, heads, N, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    return attend


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Llama":
        """Random weights as transformers initializes Llama (normal(0, std), norms at 1)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [..., 1, hd] for broadcasting over heads; computed in float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(-2), emb.sin().to(dtype).unsqueeze(-2)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      attend: Attend = causal_attend, start: int = 0, x: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [..., H]. Dense default: input_ids [B, T], positions 0..T-1.
        start, x: begin at block `start` with its input x [..., H] (the embedding when 0)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids) if x is None else x
        cos, sin = self.rope(positions, x.dtype)
        for i in range(start, len(self.layers)):
            x = self.layers[i](x, cos, sin, attend, i)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.logits(self.hidden_states(input_ids))
