"""Paged KV cache, plain PyTorch: the obviously right versions the C++ op and Triton kernels are checked against.

Cache layout (flash-attn's paged layout), per layer:
    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block * block_size + offset                 one token's place in the cache

    reshape_and_cache:       k_cache.view(-1, nkv, hd)[slot_mapping[i]] = k[i]  (same for v); slot -1 skipped
    paged_decode_attention:  out[b, h] = softmax(scale * q[b, h] . K_b[:, h // G]) @ V_b[:, h // G]
        K_b = the first context_lens[b] tokens of k_cache[block_tables[b]] (blocks in table order),
        G = num_heads // num_kv_heads (GQA); out[b] = 0 when context_lens[b] == 0.

Arithmetic is float64 for float64 inputs and float32 otherwise; the output has q's dtype.
"""
import torch


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    """Writes k, v [N, nkv, hd] into the caches in place at slot_mapping [N] (int64; -1 = skip)."""
    keep = slot_mapping != -1
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def gather_kv(cache, block_table, context_len):
    """The first context_len tokens of one sequence, [context_len, nkv, hd], read through its block table."""
    block_size = cache.shape[1]
    n_blocks = -(-context_len // block_size)
    blocks = block_table[:n_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:context_len]


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """q [B, nh, hd], caches [num_blocks, block_size, nkv, hd], block_tables [B, max_blocks],
    context_lens [B] -> out [B, nh, hd] in q's dtype. One sequence at a time, on purpose."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, nh, hd = q.shape
    group = nh // k_cache.shape[2]
    out = torch.zeros(B, nh, hd, dtype=acc, device=q.device)
    for b in range(B):
        L = int(context_lens[b])
        if L == 0:
            continue
        keys = gather_kv(k_cache, block_tables[b], L).to(acc).repeat_interleave(group, dim=1)  # (L, nh, hd)
        values = gather_kv(v_cache, block_tables[b], L).to(acc).repeat_interleave(group, dim=1)  # (L, nh, hd)
        logits = torch.einsum("hd,lhd->hl", q[b].to(acc), keys) * scale  # (nh, L)
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(logits, dim=-1), values)
    return out.to(q.dtype)
