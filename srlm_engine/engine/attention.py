"""Paged attention for the engine: the per-layer KV cache, one step's batch metadata, and the
`attend` callable the model calls per layer.

Backends (picked once per engine by `select_backend`):
- "triton":     CUDA, srlm_kernels.paged_attention for decode and cache writes;
- "cpp":        CPU, torch.ops.srlm_C (csrc/) for decode and cache writes;
- "torch":      anywhere; srlm_kernels.reference.paged_attention, the plain-PyTorch ops the
                others are tested against. Correct but re-gathers each sequence's whole cache
                every decode step.
Prefill (a chunk of prompt, even of one token) runs SDPA per sequence on the CPU backends: over
the new tokens alone when nothing is cached, else over the gathered prefix + new tokens with the
causal diagonal offset by the cached length. A batch-invariant step (LLM.next_token_logprobs, whose
logits become artifacts: the judge's expected scores) runs `invariant_attention` instead, over the
context read back from the blocks, and its linear layers on at least model_runner.MIN_ROWS rows:
a prompt's logits are then the same bits whatever part of it was cached, however it was chunked
and whatever else ran in its step. Those blocks form their own prefix tree (blocks.INVARIANT), so
KV computed the other way is never mixed in. It takes 1.1-1.3x SDPA's time (bench_prefill).
On the Triton backend (GPU) all prefill sequences of a step go through one SDPA call instead:
contexts gathered from the cache into a padded [S, C] batch, queries padded to [S, Q], and a mask
that is causal with each sequence's offset and hides the padding; the indices and mask are built
once per step and serve every layer. Per-sequence calls would cost ~5 kernel launches per sequence
per layer, which on a GPU took longer than the model's arithmetic at judge-prompt lengths.

Cache layout, per layer: k, v [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
Within a layer, every new token's K/V is written before any attention reads: a sequence may read
blocks that another sequence of the same step writes (prefix-cache hits within a step).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class KVCache:
    """Per-layer K and V block tensors."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size


@dataclass
class StepMetadata:
    """One step's packed batch: decode rows first (one token each), then prefill sequences.

    slot_mapping [N] int64: cache slot of each new token, -1 where the slot already holds it.
    block_tables [S, max_blocks] int32 and context_lens [S] int32 for every sequence of the step
    (context = cached + new tokens). num_decode: the first num_decode sequences have one query
    token each. query_starts / query_lens: each prefill sequence's rows in the packed tokens."""
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    num_decode: int
    query_starts: list[int]
    query_lens: list[int]
    ctx_lens: list[int]  # context_lens as Python ints, for the prefill loop
    invariant: bool = False  # CPU prefills through invariant_attention


class Backend:
    """The op set of one backend: cache writes, paged decode, and how prefill attends."""

    def __init__(self, name: str, reshape_and_cache, decode, batched_prefill=False):
        self.name, self.reshape_and_cache, self.decode = name, reshape_and_cache, decode
        self.batched_prefill = batched_prefill


def select_backend(device: torch.device, prefer: str | None = None) -> Backend:
    """The fastest available backend for `device` (or `prefer`, if given and available); each
    takes any block size."""
    device = torch.device(device)
    if device.type == "cuda" and prefer in (None, "triton"):
        from srlm_kernels import paged_attention as tri
        # The engine builds slots and tables itself: skip the ops' checks, which sync with the
        # host every layer and would keep decode steps out of CUDA graphs.
        return Backend("triton", partial(tri.reshape_and_cache, validate=False),
                       partial(tri.paged_decode_attention, validate=False), batched_prefill=True)
    if device.type == "cpu" and prefer in (None, "cpp"):
        try:
            import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C
            ops = torch.ops.srlm_C
            return Backend("cpp", ops.reshape_and_cache, ops.paged_decode_attention)
        except (ImportError, AttributeError, RuntimeError) as e:
            _warn_once(f"srlm_engine._C is not available ({e}); CPU paged attention falls back "
                       "to torch, which re-gathers the KV cache every decode step (slower). "
                       "Build it with `pip install -e . --no-build-isolation`.")
    # imported here, not at the top: srlm_kernels imports triton, which must not load before a
    # caller has set TRITON_INTERPRET (tests/engine/test_paged_attention_ops.py)
    from srlm_kernels.reference import paged_attention as ref
    return Backend("torch", ref.reshape_and_cache, ref.paged_decode_attention)


def invariant_attention(q, k, v, scale: float, key_block: int = 128, row_quantum: int = 16):
    """Causal attention of the last n = len(q) positions of a context of len(k) tokens: q [n, nh,
    hd], k and v [ctx, nkv, hd] -> [n, nh, hd], with each query's output a function of its own context
    alone. The CPU prefill of next_token_logprobs: a prompt's logits come out bit for bit the same
    whatever part of it was in the prefix cache, however its prompt was chunked, whatever else ran
    in its step, and on any thread count (tests/engine/test_batch_invariance.py), so an artifact of
    logits (the judge's expected scores) does not depend on how requests were spread over ranks.

    Online softmax over key blocks of a fixed size, every operation on fixed shapes: queries
    padded to a multiple of `row_quantum` rows (CPU matmuls take another path below about 12 rows
    and sum in another order), keys padded to whole blocks, the g query heads of a kv head stacked
    as rows of one matmul. Queries for which a key block lies entirely in the future skip it, in
    steps of `row_quantum`; a fully masked block adds exact zeros to a row that does compute it,
    and masking a block a row sees whole changes none of its scores. fp32 throughout; reference:
    SDPA (is_causal)."""
    n, nh, hd = q.shape
    ctx, nkv = k.shape[0], k.shape[1]
    g = nh // nkv
    Q = -(-n // row_quantum) * row_quantum
    C = -(-ctx // key_block) * key_block
    f32 = torch.float32
    # row i * g + j of kv head h: query i, query head h * g + j (the g heads that read kv head h)
    qq = q.new_zeros(nkv, Q, g, hd, dtype=f32)
    qq[:, :n] = q.view(n, nkv, g, hd).transpose(0, 1)
    qq = qq.mul_(scale).view(nkv, Q * g, hd)
    K = q.new_zeros(nkv, C, hd, dtype=f32)
    V = q.new_zeros(nkv, C, hd, dtype=f32)
    K[:, :ctx] = k.transpose(0, 1)
    V[:, :ctx] = v.transpose(0, 1)
    # query i sits at position ctx - n + i and sees keys 0 .. last[i]; padding queries see all
    last = torch.arange(Q, device=q.device).clamp_(max=n - 1) + (ctx - n)
    last_rows = last.repeat_interleave(g)
    m = q.new_full((nkv, Q * g), float("-inf"), dtype=f32)
    l = q.new_zeros(nkv, Q * g, dtype=f32)
    acc = q.new_zeros(nkv, Q * g, hd, dtype=f32)
    for j0 in range(0, C, key_block):
        r0 = max(0, j0 - (ctx - n))  # queries before r0 see none of this block
        r0 = min(r0 // row_quantum * row_quantum, Q - row_quantum)
        R = r0 * g
        s = torch.bmm(qq[:, R:], K[:, j0:j0 + key_block].transpose(1, 2))  # (nkv, rows, key_block)
        if j0 + key_block - 1 > int(last[r0]):  # a row sees part of the block (masking the others changes nothing)
            keys = torch.arange(j0, j0 + key_block, device=q.device)
            s.masked_fill_(keys[None, :] > last_rows[R:, None], float("-inf"))
        m_new = torch.maximum(m[:, R:], s.amax(-1))
        alpha = (m[:, R:] - m_new).exp_()
        p = s.sub_(m_new[..., None]).exp_()
        l[:, R:].mul_(alpha).add_(p.sum(-1))
        acc[:, R:].mul_(alpha[..., None]).add_(torch.bmm(p, V[:, j0:j0 + key_block]))
        m[:, R:] = m_new
    out = acc.div_(l[..., None]).view(nkv, Q, g, hd).transpose(0, 1).reshape(Q, nh, hd)
    return out[:n].to(q.dtype)


class PagedAttention:
    """attend(layer, q [N, nh, hd], k [N, nkv, hd], v [N, nkv, hd]) -> [N, nh, hd] for one step."""

    def __init__(self, backend: Backend, cache: KVCache, meta: StepMetadata, scale: float):
        self.backend, self.cache, self.meta, self.scale = backend, cache, meta, scale
        self._batch = None  # the batched prefill's indices and mask, built at the first layer

    def __call__(self, layer: int, q, k, v):
        m, kc, vc = self.meta, self.cache.k[layer], self.cache.v[layer]
        rows = m.slot_mapping.shape[0]
        if q.shape[0] > rows:  # the step's padding rows (model_runner.MIN_ROWS) attend to nothing
            out = q.new_zeros(q.shape)
            out[:rows] = self(layer, q[:rows], k[:rows], v[:rows])
            return out
        self.backend.reshape_and_cache(k, v, kc, vc, m.slot_mapping)
        nd = m.num_decode
        if nd == q.shape[0]:
            return self.backend.decode(q, kc, vc, m.block_tables, m.context_lens, self.scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.backend.decode(q[:nd], kc, vc, m.block_tables[:nd], m.context_lens[:nd],
                                           self.scale)
        if self.backend.batched_prefill and len(m.query_lens) > 1:
            return self._prefill_batched(q, kc, vc, out)
        for i, (s, n) in enumerate(zip(m.query_starts, m.query_lens)):
            out[s:s + n] = self._prefill(q[s:s + n], k[s:s + n], v[s:s + n], kc, vc, nd + i)
        return out

    def _prefill_batched(self, q, kc, vc, out):
        """Every prefill sequence of the step in one SDPA call over contexts read from the cache."""
        if self._batch is None:
            self._batch = self._batch_indices(q.device)
        qrows, slots, mask, src, dst = self._batch
        S, Q = mask.shape[0], mask.shape[1]
        C = mask.shape[2]
        nkv, hd = kc.shape[2], kc.shape[3]
        K = kc.view(-1, nkv, hd)[slots].view(S, C, nkv, hd).transpose(1, 2)  # (S, nkv, C, hd)
        V = vc.view(-1, nkv, hd)[slots].view(S, C, nkv, hd).transpose(1, 2)
        qq = q[qrows].view(S, Q, q.shape[1], hd).transpose(1, 2)  # (S, nh, Q, hd)
        o = F.scaled_dot_product_attention(qq, K, V, attn_mask=mask[:, None], scale=self.scale, enable_gqa=True)
        out[dst] = o.transpose(1, 2).reshape(S * Q, q.shape[1], hd)[src]
        return out

    def _batch_indices(self, device):
        """(query rows [S*Q], context slots [S*C], mask [S, Q, C], and the real queries as
        positions in the padded batch (src) and rows of the step (dst)). Padding queries repeat
        row 0 and padding keys read slot 0 (dropped and masked)."""
        m, bs = self.meta, self.cache.block_size
        nd = m.num_decode
        tables = m.block_tables[nd:].tolist()
        ctx = m.ctx_lens[nd:]
        Q, C = max(m.query_lens), max(ctx)
        qrows, slots, valid = [], [], []
        for s0, n, c, bt in zip(m.query_starts, m.query_lens, ctx, tables):
            qrows += list(range(s0, s0 + n)) + [0] * (Q - n)
            valid += [True] * n + [False] * (Q - n)
            slots += [bt[p // bs] * bs + p % bs for p in range(c)] + [0] * (C - c)
        lens = torch.tensor(m.query_lens, device=device)[:, None, None]
        ctxs = torch.tensor(ctx, device=device)[:, None, None]
        i = torch.arange(Q, device=device)[None, :, None]
        j = torch.arange(C, device=device)[None, None, :]
        # query i of a sequence sits at position ctx - n + i and sees keys 0 .. ctx - n + i; a
        # padding query (i >= n) sees real keys only, so no row of the mask is empty
        mask = (j <= ctxs - lens + i) & (j < ctxs)
        src = [i for i, ok in enumerate(valid) if ok]
        return (torch.tensor(qrows, device=device), torch.tensor(slots, device=device), mask,
                torch.tensor(src, device=device), torch.tensor([qrows[i] for i in src], device=device))

    def _prefill(self, q, k, v, kc, vc, seq: int):
        """One sequence's n new queries over its context (cached prefix + the new tokens)."""
        n, ctx = q.shape[0], self.meta.ctx_lens[seq]
        if ctx > n or self.meta.invariant:  # read the whole context back from the blocks
            bt = self.meta.block_tables[seq, :-(-ctx // kc.shape[1])].long()
            k, v = kc[bt].flatten(0, 1)[:ctx], vc[bt].flatten(0, 1)[:ctx]
        if self.meta.invariant and q.device.type == "cpu":
            return invariant_attention(q, k, v, self.scale)
        # query i sits at position ctx - n + i and sees keys 0 .. ctx - n + i
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n) if ctx > n else None
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # (n, nh, hd)

