"""Paged KV cache on GPU, in Triton: cache writes and single-query (decode) attention.

Cache layout (flash-attn's paged layout), per layer:
    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot = block * block_size + offset

    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
        k_cache.view(-1, nkv, hd)[slot_mapping[i]] = k[i]  (same for v), skipping slot -1
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> out
        q [B, nh, hd], block_tables [B, max_blocks] int32, context_lens [B] int32, out [B, nh, hd]
        out[b, h] = sum_{t < L_b} softmax_t(scale * q[b, h] . K[b, t, h // G]) V[b, t, h // G]
        K[b, t] = k_cache[block_tables[b, t // block_size], t % block_size], G = nh // nkv
        out[b] = 0 when L_b = context_lens[b] = 0.

The decode grid is (sequence, kv head): one program holds the G query heads of its kv head, so
each key/value row is loaded once for all of them. It walks the sequence BLOCK_T tokens at a
time (a tile may span several cache blocks: the block id is looked up per token), with an
online softmax in float32; the output is rounded to q's dtype once at the end. Both products
are tl.dot on tensor cores: the G heads are padded to 16 rows (the smallest dot; the padding
costs nothing next to the memory reads). bf16/fp16 caches multiply in their dtype with fp32
accumulation (the probabilities are rounded to it for P @ V, as FlashAttention does); fp32
caches multiply in full fp32 ("ieee"); the interpreter upcasts everything to fp32.
Same semantics as srlm_kernels.reference.paged_attention and torch.ops.srlm_C (the CPU op).
"""
import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_s0, v_s0,
                              ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(kc_ptr + slot * ROW + offs, tl.load(k_ptr + i * k_s0 + offs, mask=mask), mask=mask)
        tl.store(vc_ptr + slot * ROW + offs, tl.load(v_ptr + i * v_s0 + offs, mask=mask), mask=mask)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, q_s0, q_s1, bt_s0, scale,
                   NKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    L = tl.load(lens_ptr + b)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    gmask = gs < GROUP
    dmask = ds < HEAD_DIM
    heads = j * GROUP + gs
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + b * q_s0 + heads[:, None] * q_s1 + ds[None, :], mask=qmask, other=0.0)  # (G, D)
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tmask = ts < L
        blk = tl.load(bt_ptr + b * bt_s0 + ts // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        rows = (blk * BLOCK_SIZE + ts % BLOCK_SIZE) * NKV + j  # (T,) row of [slots * nkv, hd]
        kvmask = tmask[:, None] & dmask[None, :]
        offs = rows[:, None] * HEAD_DIM + ds[None, :]
        k = tl.load(k_ptr + offs, mask=kvmask, other=0.0)  # (T, D)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            z = tl.dot(q, tl.trans(k), input_precision="ieee")  # (G, T)
        else:
            z = tl.dot(q, tl.trans(k))
        z = tl.where(tmask[None, :], z * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile holds a real token
        p = tl.exp(z - m_new[:, None])
        alpha = tl.exp(m - m_new)
        s = s * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs, mask=kvmask, other=0.0)  # (T, D)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / tl.where(s > 0, s, 1.0)[:, None]  # s == 0 (and acc == 0) only for an empty context
    tl.store(out_ptr + (b * (NKV * GROUP) + heads[:, None]) * HEAD_DIM + ds[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask)


def _check_cache(k_cache, v_cache):
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got "
                         f"{getattr(k_cache, 'shape', type(k_cache).__name__)}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got "
                         f"{getattr(v_cache, 'shape', type(v_cache).__name__)}")
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must both be float32, bfloat16 or float16, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"k_cache is on {k_cache.device} but v_cache on {v_cache.device}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def _check_like(name, x, shape, dtype, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} like the caches")


def reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, validate=True):
    """Writes k, v [N, nkv, hd] into the caches in place at slot_mapping [N] (int64; -1 = skip).

    validate=True checks that every slot is -1 or in range (a device sync); pass False on a hot
    path whose slots were checked already. Duplicate slots: one of the writes wins.
    """
    _check_cache(k_cache, v_cache)
    num_blocks, block_size, nkv, hd = k_cache.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be [N, {nkv}, {hd}], got {getattr(k, 'shape', type(k).__name__)}")
    n = k.shape[0]
    _check_like("k", k, (n, nkv, hd), k_cache.dtype, k_cache.device)
    _check_like("v", v, (n, nkv, hd), k_cache.dtype, k_cache.device)
    _check_like("slot_mapping", slot_mapping, (n,), torch.int64, k_cache.device)
    if validate and n:
        bad = (slot_mapping < -1) | (slot_mapping >= num_blocks * block_size)
        if bool(bad.any()):
            raise ValueError(f"slot_mapping must be -1 or in [0, num_blocks * block_size = {num_blocks * block_size}); "
                             f"found {slot_mapping[bad][0].item()}")
    if n == 0:
        return
    # Each token is one row of nkv * hd values: dense heads needed, any row stride allowed.
    k = k if k.stride(2) == 1 and k.stride(1) == hd else k.contiguous()
    v = v if v.stride(2) == 1 and v.stride(1) == hd else v.contiguous()
    _reshape_and_cache_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), v.stride(0),
                                    **cache_launch(nkv, hd))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, validate=True, block_t=None):
    """q [B, nh, hd] attends over its sequence's paged cache -> out [B, nh, hd] in q's dtype.

    validate=True checks context lengths and the block-table entries they use (a device sync);
    the engine may pass False once it has checked a step's tables (they are shared by all layers).
    Table entries past a sequence's last used block are never read and may hold anything.
    block_t: tokens per tile (a power of two >= 16); default 64 (16 in the interpreter, so tests
    cross tile edges).
    """
    _check_cache(k_cache, v_cache)
    num_blocks, block_size, nkv, hd = k_cache.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[2] != hd:
        raise ValueError(f"q must be [B, num_heads, head_dim={hd}], got {getattr(q, 'shape', type(q).__name__)}")
    B, nh, _ = q.shape
    if q.dtype != k_cache.dtype or q.device != k_cache.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) must match the caches ({k_cache.dtype}, {k_cache.device})")
    if nh % nkv:
        raise ValueError(f"num_heads {nh} must be a multiple of num_kv_heads {nkv}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_blocks], got "
                         f"{getattr(block_tables, 'shape', type(block_tables).__name__)}")
    _check_like("block_tables", block_tables, block_tables.shape, torch.int32, k_cache.device)
    _check_like("context_lens", context_lens, (B,), torch.int32, k_cache.device)
    max_blocks = block_tables.shape[1]
    if validate and B:
        lens = context_lens.long()
        if bool(((lens < 0) | (lens > max_blocks * block_size)).any()):
            raise ValueError(f"context_lens must be in [0, max_blocks * block_size = {max_blocks * block_size}], "
                             f"got {context_lens.tolist()}")
        used = torch.arange(max_blocks, device=lens.device)[None, :] * block_size < lens[:, None]
        bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_tables[{b}, {i}] = {int(block_tables[b, i])} is outside [0, num_blocks = "
                             f"{num_blocks}) and is used by context length {int(context_lens[b])}")
    q = q if q.stride(2) == 1 else q.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty(B, nh, hd, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _decode_kernel[(B, nkv)](q, k_cache, v_cache, block_tables, context_lens.contiguous(), out,
                             q.stride(0), q.stride(1), block_tables.stride(0), float(scale),
                             **decode_launch(nh, nkv, hd, block_size, q.dtype, q.device.type == "cpu", block_t))
    return out


# Launch configs, read at every launch and by tests/kernels/aot_compile.py, which compiles the
# kernels for an H100 with exactly these constants (so the two cannot drift apart).
def cache_launch(nkv, hd):
    """_reshape_and_cache_kernel's constexprs and launch options: one program per token row."""
    row = nkv * hd
    return dict(ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4, num_stages=3)


def decode_launch(nh, nkv, hd, block_size, dtype, interpreter, block_t=None):
    """_decode_kernel's constexprs and launch options; block_t=None: 64 tokens per tile on a GPU,
    16 in the interpreter (so tests cross tile edges)."""
    group = nh // nkv
    return dict(NKV=nkv, GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=block_size,
                BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(hd)),
                BLOCK_T=block_t or (16 if interpreter else 64), UPCAST=interpreter,
                IEEE=interpreter or dtype == torch.float32, num_warps=4, num_stages=3)
