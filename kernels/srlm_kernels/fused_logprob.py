"""Fused linear log-prob: the log-prob of each target token without the [N, V] logits.

    z = hidden @ weight.T / temperature            hidden [N, H], weight [V, H], z [N, V] (never stored)
    lse[n] = logsumexp_v z[n, v]
    logprobs[n] = z[n, targets[n]] - lse[n]        0 where targets[n] == ignore_index
Backward, for an upstream gradient g [N] per token:
    dz[n, v] = g[n] / temperature * (1[v == targets[n]] - softmax(z)[n, v])
    d hidden = dz @ weight,   d weight = dz.T @ hidden

Both paths walk z in tiles: a tile of rows times a chunk of the vocabulary, with an online
log-sum-exp in forward (the Triton forward also splits the vocabulary across programs, so a
small N still fills the GPU, and merges the splits' partial log-sum-exps after). Backward
RECOMPUTES each tile from the saved lse [N] rather than computing gradients in forward (Liger's
trick): that trick needs the upstream gradient at forward time, which holds for a mean
cross-entropy but not here, where g is per token (a DPO gradient is known only after every
token of the sequence is summed). The price is one extra matmul over the vocabulary (4 instead
of 3).

Triton backward, in chunks of Vc vocabulary columns, as the CPU path walks them: one kernel
recomputes the logits of all rows over the chunk (fp32 accumulation, as forward) and writes dz
[N, Vc] in the inputs' dtype; then two cuBLAS GEMMs give d weight = dz.T @ hidden for the chunk's
rows of weight (written once, whole) and d hidden += dz @ weight[chunk]. d hidden and d weight
are reductions over V and N of size H each: kept in registers they would need the logits
recomputed per H-tile, written back per tile they cost far more memory traffic than the GEMMs
(a backward that writes them back per tile takes 5x Liger's time on an H100). Chunking the
vocabulary, not the rows (Liger's way), matters at a large V: a chunk of C rows streams all of
weight three times (recompute, d hidden, and the read and write of d weight += ...), 2 GB per
256-row chunk at V=128256, H=2048 in bf16, memory-bound since C is small; a vocabulary chunk
streams only its own rows of weight, and the accumulated [N, H] d hidden is 1 / 20 of weight
there. Vc makes dz hold about CHUNK_VALUES * N * H values. d weight comes from one GEMM per
chunk (fp32 accumulation inside it). d hidden sums V / Vc chunk products: with 16-bit inputs
each product is rounded once to the inputs' dtype and added into an fp32 [N, H] sum, cast at the
end. Adding into a 16-bit d hidden (one addmm per chunk, as Liger's d weight adds up its row
chunks) would round the running sum after every chunk: at 32 chunks that gave 2x the median
error and 3x the worst (CPU emulation at H=2048, V=128256). The fp32 sum costs 4 N H bytes and
8 N H bytes of extra memory traffic per chunk (at N=8192, H=2048, 32 chunks: 64 MB, and 4.3 GB,
about 1.5 ms of H100 bandwidth: an estimate; the whole fwd+bwd took 33.7 ms on an H100, Liger's
46.3 ms, bench/RESULTS.md).
Ignored rows (prompt tokens) are dropped before any kernel on both paths.

Dtypes: bfloat16/float16/float32 inputs are multiplied with float32 accumulation (the CPU path
upcasts each chunk); logprobs and lse are float32 (float64 for float64 inputs, CPU path only),
because they are summed over sequences next. Gradients come back in the inputs' dtype.
"""
import torch
import triton
import triton.language as tl

from ._checks import check_backend, check_float, check_index, check_index_values, check_number
from .fused_logprob_torch import torch_fused_linear_logprob, torch_fused_linear_logprob_backward

# ------------------------------------------------------------------------------------ Triton

# (BLOCK_N, BLOCK_V, BLOCK_H[, num_warps, num_stages]) per pass, read at launch. The interpreter
# pays per operation, not per element, so big tiles make it fast; tl.dot needs every block >= 16.
# GPU, 16-bit inputs, from bench/tune_fused_logprob.py's sweeps on an H100 with Triton 3.6 (the
# figures below are in bench/RESULTS.md) and the register use of the compiled kernels
# (tests/kernels/aot_compile.py, sm_90; Triton 3.9 and 3.6, the GPU image's compiler, give the
# same verdicts with other byte counts).
# Backward 128 x 256 fp32 accumulator tiles over 8 warps, 3-stage pipelined loads, though they
# spill (2.3 KB per thread with Triton 3.9, 1.6 KB with 3.6): the vocabulary-chunked backward
# takes 17.9 ms with them at N=8192 H=2048 V=128256 against 20.1 ms with 128 x 128 tiles, and
# bench_fused_logprob's fwd+bwd 33.7 ms against 36.6 (5.1 against 6.1 ms at N=4096 H=576
# V=49152). With row chunks instead of vocabulary chunks the two tiles tie (25.6 ms for 128 x 256,
# 25.2 for 128 x 128).
# Forward 128 x 256 over 8 warps (no spill in bf16): with one program per row block, unsplit
# (48 programs at the big shape's 6144 kept rows, on 132 SMs), 128 x 256 does the most work per
# busy SM (4.8 TFLOP/s against 2.9 for 64 x 256, which is faster only by filling twice as many
# SMs, and 14.1 ms against 17.9 for 128 x 128 on as many); with the vocabulary split (FWD_SPLITS)
# it is also the fastest auto-split config (6.99 ms).
# fp32 inputs multiply on CUDA cores (IEEE, no TF32), where those tiles would spill 13-14 KB per
# thread: 64 x 128 over 8 warps is the largest swept tile that compiles without spilling in
# either pass; no sweep has timed fp32 inputs. Other cards need their own sweep.
GPU_FWD_BLOCKS = (128, 256, 64, 8, 3)
GPU_BWD_BLOCKS = (128, 256, 64, 8, 3)
GPU_FP32_BLOCKS = (64, 128, 64, 8, 3)
INTERPRETER_BLOCKS = (16, 512, 64)
# Forward programs per row block, each over a slice of the vocabulary, their partial log-sum-exps
# merged after (as flash-decoding splits keys). None: about FWD_WAVES programs per SM, so the
# last, partial wave idles a small share of the GPU; 1 in the interpreter. An int forces it (the
# tests force 3, so the merge runs on CPU too).
FWD_SPLITS = None
FWD_WAVES = 4
# Backward vocabulary chunks: dz [N, Vc] holds about CHUNK_VALUES * N * H values (Liger's chunk
# of logits is 1 x, by rows), and at least MIN_CHUNK_VALUES (16 MB in bf16), so that a chunk's
# three launches carry enough work to hide their host overhead when N * H is small (the SmolLM2
# shape: 18 chunks, not 35). Each chunk also adds its [N, H] part of d hidden into the fp32 sum.
CHUNK_VALUES = 2
MIN_CHUNK_VALUES = 1 << 23


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, inv_temp,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """z[rows, cols] = hidden[rows] @ weight[cols].T * inv_temp, a [BLOCK_N, BLOCK_V] fp32 tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter gets bf16 arithmetic wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: no silent TF32 rounding
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc * inv_temp


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, zt_ptr, N, V, H, inv_temp, ignore_index, V_PER_SPLIT,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One row block over one split of the vocabulary, columns [split * V_PER_SPLIT, +V_PER_SPLIT):
    the split's running max m, sum of exp(z - m) and target logit (0 where the target lies
    elsewhere), stored at [split, rows] for _combine_splits. Program ids run along rows first, so
    the programs in flight share weight tiles."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    out = tl.program_id(1).to(tl.int64) * N + rows
    rows = rows.to(tl.int64)  # rows * H overflows int32 for large N * H
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = tl.program_id(1) * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols.to(tl.int64), rmask, cmask, H, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every block has a real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)


@triton.jit
def _dz_tile(h_ptr, w_ptr, t_ptr, g_ptr, lse_ptr, rows, cols, rmask, cmask, N, H, inv_temp, ignore_index,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
             UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dz = g / T * (onehot(targets) - softmax(z)) on one tile, recomputed from the saved lse."""
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    g = tl.where(tgt != ignore_index, g * inv_temp, 0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, inv_temp,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * tl.exp(z - lse[:, None])
    return tl.where(cmask[None, :], dz, 0.0)


@triton.jit
def _bwd_dz_kernel(h_ptr, w_ptr, t_ptr, g_ptr, lse_ptr, dz_ptr, v0, N, V_END, H, inv_temp, ignore_index,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """dz [all rows, columns v0..V_END) of one vocabulary chunk, rows V_END - v0 apart, in dz's
    dtype. Program ids run along rows first, so the programs in flight share a weight tile (read
    once from memory, then from L2)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    local = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cols = v0 + local
    cmask = cols < V_END
    dz = _dz_tile(h_ptr, w_ptr, t_ptr, g_ptr, lse_ptr, rows, cols, rmask, cmask, N, H, inv_temp,
                  ignore_index, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
    tl.store(dz_ptr + rows[:, None] * (V_END - v0) + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def chunk_cols(n, v, h, block_v):
    """Vocabulary columns per backward chunk: dz [N, Vc] holds about CHUNK_VALUES * N * H values,
    at least MIN_CHUNK_VALUES; a multiple of block_v, at most V rounded up to one."""
    c = triton.cdiv(max(CHUNK_VALUES * n * h, MIN_CHUNK_VALUES), max(n, 1))
    return min(triton.cdiv(v, block_v), triton.cdiv(c, block_v)) * block_v


def fwd_splits(row_blocks, v, block_v, device):
    """Forward launch over row_blocks row blocks -> (number of vocabulary splits, columns per
    split: a multiple of block_v, so only the last split may be short)."""
    v_blocks = triton.cdiv(v, block_v)
    want = FWD_SPLITS
    if want is None:
        want = 1 if device.type != "cuda" else triton.cdiv(
            FWD_WAVES * torch.cuda.get_device_properties(device).multi_processor_count, row_blocks)
    per_split = triton.cdiv(v_blocks, max(1, min(want, v_blocks))) * block_v
    return triton.cdiv(v, per_split), per_split


def _combine_splits(m, s, zt, targets, ignore_index):
    """Partial (max, sum of exp, target logit) per split [S, N] -> (logprobs [N], lse [N])."""
    m_all = m.amax(0)
    lse = m_all + (s * torch.exp(m - m_all)).sum(0).log()
    return torch.where(targets != ignore_index, zt.sum(0) - lse, 0.0), lse


def gpu_blocks(pass_, dtype):
    """The default launch config of pass_ ('fwd' or 'bwd') for inputs of dtype on a GPU."""
    if dtype == torch.float32:
        return GPU_FP32_BLOCKS
    return GPU_FWD_BLOCKS if pass_ == "fwd" else GPU_BWD_BLOCKS


def _triton_config(hidden, blocks, pass_):
    """(BLOCK_N, BLOCK_V, BLOCK_H) and the dtype flags for one launch of pass_ ('fwd' or 'bwd'):
    `blocks`, else the interpreter's or gpu_blocks'."""
    interp = hidden.device.type == "cpu"
    if interp:
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(_fwd_kernel, InterpretedFunction):
            raise RuntimeError("the Triton path on CPU tensors runs only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before triton is first imported (use backend='torch' on CPU)")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton path takes float32, bfloat16 or float16, got {hidden.dtype}")
    bn, bv, bh, *launch = blocks or (INTERPRETER_BLOCKS if interp else gpu_blocks(pass_, hidden.dtype))
    cfg = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=interp, IEEE=hidden.dtype == torch.float32)
    if launch and not interp:
        cfg.update(num_warps=launch[0], num_stages=launch[1])
    return cfg


def _kept_rows(targets, ignore_index):
    """Indices of the rows that count, or None when all do (no copy needed)."""
    keep = targets != ignore_index
    return None if bool(keep.all()) else keep.nonzero().squeeze(1)


def _triton_fused_linear_logprob(hidden, weight, targets, ignore_index, temperature, blocks=None):
    """Triton forward -> (logprobs [N] fp32, lse [N] fp32; both 0 at ignored rows). Inputs
    already checked and contiguous."""
    cfg = _triton_config(hidden, blocks, "fwd")
    rows = _kept_rows(targets, ignore_index)
    if rows is not None:  # compute the kept rows only, then scatter
        logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.zeros_like(logp)
        if rows.numel():
            lp, ls = _triton_fused_linear_logprob(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                                  ignore_index, temperature, blocks)
            logp[rows], lse[rows] = lp, ls
        return logp, lse
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    splits, per_split = fwd_splits(row_blocks, v, cfg["BLOCK_V"], hidden.device)
    m, s, zt = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    _fwd_kernel[(row_blocks, splits)](hidden, weight, targets, m, s, zt, n, v, h, 1.0 / temperature,
                                     ignore_index, per_split, **cfg)
    return _combine_splits(m, s, zt, targets, ignore_index)


def _triton_fused_linear_logprob_backward(grad, hidden, weight, targets, lse, ignore_index, temperature,
                                          need_dh=True, need_dw=True, blocks=None):
    """Triton dz chunks + cuBLAS GEMMs -> (d hidden or None, d weight or None), inputs' dtype."""
    cfg = _triton_config(hidden, blocks, "bwd")
    rows = _kept_rows(targets, ignore_index)
    if rows is not None:  # the kept rows only; their d hidden scattered into zeros
        if rows.numel() == 0:
            return (torch.zeros_like(hidden) if need_dh else None), (torch.zeros_like(weight) if need_dw else None)
        sub_dh, dw = _triton_fused_linear_logprob_backward(
            grad.index_select(0, rows), hidden.index_select(0, rows), weight, targets.index_select(0, rows),
            lse.index_select(0, rows), ignore_index, temperature, need_dh, need_dw, blocks)
        dh = torch.zeros_like(hidden).index_copy_(0, rows, sub_dh) if need_dh else None
        return dh, dw
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return (torch.zeros_like(hidden) if need_dh else None), (torch.zeros_like(weight) if need_dw else None)
    dw = torch.empty_like(weight) if need_dw else None  # each chunk's rows written once, whole
    # d hidden adds up one product per vocabulary chunk, in fp32: into dh itself for fp32 inputs;
    # for 16-bit ones into acc, from part (the chunk's product, rounded once), and cast at the end
    wide = hidden.dtype == torch.float32
    dh = acc = part = None
    if need_dh:
        dh = torch.zeros_like(hidden) if wide else None
        acc = None if wide else torch.zeros(n, h, dtype=torch.float32, device=hidden.device)
        part = None if wide else torch.empty_like(hidden)
    grad = grad.contiguous()
    vc = min(chunk_cols(n, v, h, cfg["BLOCK_V"]), v)
    buf = torch.empty(n * vc, dtype=hidden.dtype, device=hidden.device)
    for v0 in range(0, v, vc):
        m = min(vc, v - v0)
        dz = buf[:n * m].view(n, m)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_V"]))
        _bwd_dz_kernel[grid](hidden, weight, targets, grad, lse, dz, v0, n, v0 + m, h, 1.0 / temperature,
                             ignore_index, **cfg)
        if need_dw:
            torch.mm(dz.T, hidden, out=dw[v0:v0 + m])
        if acc is not None:
            acc.add_(torch.mm(dz, weight[v0:v0 + m], out=part))
        elif need_dh:
            dh.addmm_(dz, weight[v0:v0 + m])
    if acc is not None:
        buf = dz = None  # free dz's chunk before the cast
        dh = part.copy_(acc)
    return dh, dw


# ------------------------------------------------------------------------- op and autograd

def _forward(hidden, weight, targets, ignore_index, temperature, backend):
    # here, inside the op, the check runs under torch.compile too: an out-of-range target would
    # match no vocabulary column and give a wrong number, not an error
    check_index_values("targets", targets, 0, weight.shape[0], ignore_index)
    if backend == "triton":
        return _triton_fused_linear_logprob(hidden, weight, targets, ignore_index, temperature)
    return torch_fused_linear_logprob(hidden, weight, targets, ignore_index, temperature)


@torch.library.custom_op("srlm::fused_linear_logprob", mutates_args=())
def _op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
        temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, targets, ignore_index, temperature, backend)


@_op.register_fake
def _op_fake(hidden, weight, targets, ignore_index, temperature, backend):
    out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=out), hidden.new_empty(n, dtype=out)


@torch.library.custom_op("srlm::fused_linear_logprob_backward", mutates_args=())
def _bwd_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            lse: torch.Tensor, ignore_index: int, temperature: float, backend: str,
            need_dh: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _triton_fused_linear_logprob_backward if backend == "triton" else torch_fused_linear_logprob_backward
    dh, dw = fn(grad, hidden, weight, targets, lse, ignore_index, temperature, need_dh, need_dw)
    # A custom op returns tensors: an unneeded gradient is an empty one.
    return (dh if need_dh else hidden.new_empty(0)), (dw if need_dw else weight.new_empty(0))


@_bwd_op.register_fake
def _bwd_op_fake(grad, hidden, weight, targets, lse, ignore_index, temperature, backend, need_dh, need_dw):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, temperature, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.args = (ignore_index, temperature, backend)
    ctx.mark_non_differentiable(output[1])  # lse is saved state, not a result


def _backward(ctx, grad_logp, grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None or not (need_dh or need_dw):
        return None, None, None, None, None, None
    dh, dw = _bwd_op(grad_logp.contiguous(), hidden, weight, targets, lse, *ctx.args, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API

def fused_linear_logprob(hidden, weight, targets, ignore_index=-100, temperature=1.0, backend="auto"):
    """log_softmax(hidden @ weight.T / temperature) at targets, without the [N, V] logits.

    hidden [N, H] and weight [V, H]: same float dtype and device (non-contiguous ones are copied);
    targets [N] integer in [0, V) or == ignore_index. Returns logprobs [N], float32 (float64 for
    float64 inputs), 0 where ignored; differentiable in hidden and weight.
    backend: 'auto' (Triton on CUDA, the tiled torch path elsewhere), 'triton' or 'torch'.
    """
    hidden = check_float("hidden", hidden, 2)
    weight = check_float("weight", weight, 2, hidden.dtype, hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} and hidden {tuple(hidden.shape)} differ in H")
    check_number("temperature", temperature)
    targets = check_index("targets", targets, hidden.shape[0], hidden.device, 0, weight.shape[0], ignore_index,
                          values=False)  # checked inside the op, compiled or not
    backend = check_backend(backend, hidden.device)
    logp, _ = _op(hidden, weight, targets, int(ignore_index), float(temperature), backend)
    return logp


def sequence_logprobs(hidden, weight, targets, seq_ids, num_seqs, ignore_index=-100, temperature=1.0,
                      backend="auto"):
    """Summed token log-probs per sequence: out[s] = sum of logprobs[n] over seq_ids[n] == s.

    seq_ids [N] integer in [0, num_seqs) at every non-ignored token (ignored tokens' ids are not
    read, so padding may carry any id). Returns [num_seqs], float32 (float64 for float64 inputs).
    """
    logp = fused_linear_logprob(hidden, weight, targets, ignore_index, temperature, backend)
    valid = targets != ignore_index
    seq_ids = check_index("seq_ids", seq_ids, hidden.shape[0], hidden.device, 0, num_seqs, valid=valid)
    seq_ids = torch.where(valid, seq_ids, torch.zeros_like(seq_ids))  # logp is 0 there
    return logp.new_zeros(num_seqs).index_add(0, seq_ids, logp)
