"""Tensor-parallel generation (Megatron-LM's layout), applied to the single-device Llama from outside.

The k ranks of a process group each hold a slice of every layer:
- q_proj / k_proj / v_proj: the rank's nh/k query heads and nkv/k kv heads (rows of the weights,
  column-parallel). Query head h reads kv head h // n_rep, so a rank's query heads read only its
  own kv heads: attention runs locally, over a KV cache of nkv/k heads. No communication.
- o_proj: the matching input columns (row-parallel): each rank's partial sum, one all-reduce, then
  the bias, added once after it.
- gate_proj / up_proj and down_proj: the same over a slice of the intermediate size (uneven where
  k does not divide it: the slices differ by one row at most).
- embed_tokens: a slice of the vocabulary; tokens outside it look up zeros and one all-reduce adds
  the one non-zero row to zeros (exact).
- lm_head: the same vocabulary slice (a tied head is the embedding's slice itself); each rank's
  logits, then one all-gather. Every rank holds the same full logits bit for bit, whatever rounding
  its own hidden states carry, so every rank's sampler draws the same tokens.
- norms, rotary frequencies and the row-parallel layers' biases: whole copies.
The vocabulary is cut in k slices of ceil(V/k) rows, the last one padded with zero rows: the
all-gather needs equal sizes. The padding's logits are cut off after it.

Per step: two all-reduces per layer, one for the embedding, one all-gather for the logits. The
row-parallel sums add the ranks' partials in another order than one device does, so the logits
agree with the single-device model's to float rounding, not bit for bit.

The parallel layers keep their matmuls in plain bias-free nn.Linear modules, so the CPU engine's
use_small_batch_linear (engine/linear.py) swaps them like any other.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from srlm_engine.config import ModelConfig
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import load_state_dict_slices, model_from_state_dict


def check_divides(cfg: ModelConfig, k: int) -> None:
    """Each rank must hold whole kv heads (and so whole query heads, nh being a multiple of nkv)."""
    for name in ("num_key_value_heads", "num_attention_heads"):
        n = getattr(cfg, name)
        if n % k:
            raise ValueError(f"tensor_parallel_size {k} does not divide {name} {n}: each rank must hold "
                             f"a whole number of heads")


def process_group(k: int, group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """`group` (default: the whole default group), checked to have k ranks, this one among them."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"tensor_parallel_size {k} needs an initialized torch.distributed process group "
                           f"(dist.init_process_group, e.g. under torchrun) with {k} ranks")
    group = group if group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of tp_group")
    size = dist.get_world_size(group)
    if size != k:
        which = "tp_group" if group is not dist.group.WORLD else "the default process group"
        raise ValueError(f"tensor_parallel_size is {k} but {which} has {size} ranks")
    return group


def split(n: int, k: int, r: int) -> tuple[int, int]:
    """Rank r's [start, end) of n rows cut in k near-equal parts (the first n % k one row longer)."""
    q, extra = divmod(n, k)
    start = r * q + min(r, extra)
    return start, start + q + (r < extra)


def vocab_split(v: int, k: int, r: int) -> tuple[int, int, int]:
    """Rank r's [start, end) of the vocabulary, and the rows every rank holds (ceil(v / k))."""
    rows = -(-v // k)
    start = min(r * rows, v)
    return start, min(start + rows, v), rows


def local_config(cfg: ModelConfig, k: int, r: int) -> ModelConfig:
    """The single-device config of rank r's slice: nh/k, nkv/k heads, its intermediate and vocab rows."""
    i0, i1 = split(cfg.intermediate_size, k, r)
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // k,
                   num_key_value_heads=cfg.num_key_value_heads // k, intermediate_size=i1 - i0,
                   vocab_size=vocab_split(cfg.vocab_size, k, r)[2])


def shard_slices(cfg: ModelConfig, k: int, r: int) -> dict[str, tuple[slice, ...]]:
    """Our tensor name -> the index of rank r's slice of it; tensors not named are held whole."""
    hd = cfg.head_dim
    q = slice(*(hd * i for i in split(cfg.num_attention_heads, k, r)))
    kv = slice(*(hd * i for i in split(cfg.num_key_value_heads, k, r)))
    inter = slice(*split(cfg.intermediate_size, k, r))
    v0, v1, _ = vocab_split(cfg.vocab_size, k, r)
    out = {"embed_tokens.weight": (slice(v0, v1),)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (slice(v0, v1),)
    for i in range(cfg.num_hidden_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        rows = {a + "q_proj": q, a + "k_proj": kv, a + "v_proj": kv, m + "gate_proj": inter, m + "up_proj": inter}
        for name, s in rows.items():  # column-parallel: output rows, and the bias with them
            out[name + ".weight"] = (s,)
            if (cfg.attention_bias if name.startswith(a) else cfg.mlp_bias):
                out[name + ".bias"] = (s,)
        out[a + "o_proj.weight"] = (slice(None), q)  # row-parallel: input columns; bias whole
        out[m + "down_proj.weight"] = (slice(None), inter)
    return out


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b: x's last dimension and W's columns split over the ranks."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        self.linear.weight = linear.weight
        self.bias = linear.bias  # whole on every rank: added once, after the sum
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + weight rows) of the embedding; the sum over ranks is the lookup."""

    def __init__(self, embedding: nn.Embedding, start: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.start, self.group = embedding.weight, start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.masked_fill(~mine, 0), self.weight).masked_fill(~mine[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """Logits [..., V]: each rank's vocabulary slice, all-gathered in rank order, padding cut off."""

    def __init__(self, linear: nn.Linear, vocab_size: int, group: dist.ProcessGroup):
        super().__init__()
        self.linear, self.vocab_size, self.group = linear, vocab_size, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.linear(h).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def load_tensor_parallel(path: str | Path, cfg: ModelConfig, group: dist.ProcessGroup,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """This rank's slice of the checkpoint at `path` (config `cfg`) as a Llama of local_config,
    its layers swapped for the parallel ones. Only the slice is read from the files."""
    k, r = dist.get_world_size(group), dist.get_rank(group)
    check_divides(cfg, k)
    local = local_config(cfg, k, r)
    sd = load_state_dict_slices(path, cfg, shard_slices(cfg, k, r), dtype, device)
    v0, v1, rows = vocab_split(cfg.vocab_size, k, r)
    for name in ("embed_tokens.weight", "lm_head.weight"):  # the last slice padded to `rows`
        if name in sd and v1 - v0 < rows:
            sd[name] = torch.cat([sd[name], sd[name].new_zeros(rows - (v1 - v0), cfg.hidden_size)])
    model = model_from_state_dict(local, sd, device)
    for block in model.layers:
        block.self_attn.o_proj = RowParallelLinear(block.self_attn.o_proj, group)
        block.mlp.down_proj = RowParallelLinear(block.mlp.down_proj, group)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, v0, group)
    model.lm_head = VocabParallelHead(model.lm_head, cfg.vocab_size, group)  # tied: the embedding's slice
    return model


def broadcast_int(value: int, group: dist.ProcessGroup) -> int:
    """The value group rank 0 holds, on every rank of the group."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item())


def check_same_everywhere(description: str, group: dist.ProcessGroup) -> None:
    """Raise on every rank if the ranks' descriptions differ: ranks given different requests would
    schedule different steps and wait on each other's collectives forever, or mix their outputs."""
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    if any(int(t.item()) != digest for t in every):
        raise ValueError("the ranks of the tensor-parallel group were given different requests or "
                         "sampling parameters; every rank must call generate with the same ones")
