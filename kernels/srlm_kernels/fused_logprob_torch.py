"""The CPU production path of fused_logprob: the same tiled algorithm in plain torch.

A chunk of the vocabulary (CHUNK_V rows of weight) times a block of CHUNK_N rows of hidden is one
fp32 tile [CHUNK_N, CHUNK_V]; one tile buffer is reused for every step, each matmul writes into it
(out=) and the softmax runs in place, so the memory beyond inputs and gradients is one tile.
Vocabulary chunks are the outer loop: a bf16 weight chunk is upcast once, and d weight for that
chunk is finished (and cast) before the next one, so no fp32 copy of the [V, H] gradient exists.
Ignored rows are dropped before any matmul (prompt tokens cost nothing).

The tile is CHUNK_N x CHUNK_V = 2048 x 4096 (32 MB in fp32), halved both ways below NARROW_H.
A narrow hidden size gives each tile element little matmul work, so the element-wise passes and
the trips of the tile through memory weigh more: there a 1024 x 2048 tile (8 MB) stays in a
server's shared L3 from the matmul that writes it to the backward matmuls that read it. On the
2-core EPYC of bench/RESULTS.md (32 MB L3), interleaved in one process: at H=576 (N=4096,
V=49152) fwd+bwd took 6.33 s with the small tile against 6.86 s; at H=2048 (N=8192, V=128256)
the big tile took 100-102 s against 108-112 s (larger matmuls run faster there).
"""
import torch

CHUNK_N = 2048
CHUNK_V = 4096
NARROW_H = 1024


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tiles(h_dim):
    """(rows, vocabulary columns) of a tile for hidden size h_dim; read at call time, so tests can
    shrink them."""
    if h_dim < NARROW_H:
        return max(CHUNK_N // 2, 1), max(CHUNK_V // 2, 1)
    return CHUNK_N, CHUNK_V


def _tile(buf, n, v):
    return buf[: n * v].view(n, v)


def _hits(t, v0, v1):
    """Rows of a block whose target lies in vocabulary chunk [v0, v1), and its column there."""
    local = t - v0
    idx = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
    return idx, local[idx]


def torch_fused_linear_logprob(hidden, weight, targets, ignore_index, temperature):
    """-> (logprobs [N], lse [N]) in fp32 (fp64 for fp64 inputs); both 0 at ignored rows."""
    n_all, h_dim = hidden.shape
    chunk_n, chunk_v = _tiles(h_dim)
    v_all = weight.shape[0]
    cdt = _compute_dtype(hidden)
    logp = torch.zeros(n_all, dtype=cdt, device=hidden.device)
    lse = torch.zeros(n_all, dtype=cdt, device=hidden.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        return logp, lse
    dense = n == n_all
    h = (hidden if dense else hidden.index_select(0, rows)).to(cdt)
    if temperature != 1.0:
        h = h * (1.0 / temperature)
    t = targets if dense else targets.index_select(0, rows)
    m = torch.full((n,), float("-inf"), dtype=cdt, device=hidden.device)
    s = torch.zeros(n, dtype=cdt, device=hidden.device)
    zt = torch.zeros(n, dtype=cdt, device=hidden.device)
    buf = torch.empty(min(n, chunk_n) * min(v_all, chunk_v), dtype=cdt, device=hidden.device)
    for v0 in range(0, v_all, chunk_v):
        w = weight[v0:v0 + chunk_v].to(cdt)
        for n0 in range(0, n, chunk_n):
            hc = h[n0:n0 + chunk_n]
            z = torch.mm(hc, w.T, out=_tile(buf, hc.shape[0], w.shape[0]))  # (cn, cv)
            idx, col = _hits(t[n0:n0 + chunk_n], v0, v0 + w.shape[0])
            zt[n0 + idx] = z[idx, col]
            mc = m[n0:n0 + chunk_n]  # online log-sum-exp; in place, since torch.logsumexp
            m_new = torch.maximum(mc, z.amax(1))  # allocates a tile-sized temporary per call
            sc = s[n0:n0 + chunk_n]
            sc.mul_(torch.exp(mc - m_new)).add_(z.sub_(m_new[:, None]).exp_().sum(1))
            mc.copy_(m_new)
    lse_rows = m.add_(s.log_())
    logp[rows] = zt - lse_rows
    lse[rows] = lse_rows
    return logp, lse


def torch_fused_linear_logprob_backward(grad, hidden, weight, targets, lse, ignore_index, temperature,
                                        need_dh=True, need_dw=True):
    """-> (d hidden or None, d weight or None) in the inputs' dtype; tiles recomputed from lse."""
    n_all, h_dim = hidden.shape
    chunk_n, chunk_v = _tiles(h_dim)
    v_all = weight.shape[0]
    cdt = _compute_dtype(hidden)
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    rows = (targets != ignore_index).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0 or not (need_dh or need_dw):
        return dh, dw
    dense = n == n_all
    inv_t = 1.0 / temperature
    h = (hidden if dense else hidden.index_select(0, rows)).to(cdt)
    hs = h * inv_t if temperature != 1.0 else h
    t = targets if dense else targets.index_select(0, rows)
    lse = (lse if dense else lse.index_select(0, rows)).to(cdt)
    g = (grad if dense else grad.index_select(0, rows)).to(cdt) * inv_t  # dz carries the 1/T of dh, dw
    dh_acc = torch.zeros(n, h_dim, dtype=cdt, device=hidden.device) if need_dh else None
    # fp32 weights: accumulate straight into dw; otherwise into one fp32 chunk, cast when done.
    dw_acc = None
    if need_dw and dw.dtype != cdt:
        dw_acc = torch.empty(min(v_all, chunk_v), h_dim, dtype=cdt, device=hidden.device)
    buf = torch.empty(min(n, chunk_n) * min(v_all, chunk_v), dtype=cdt, device=hidden.device)
    for v0 in range(0, v_all, chunk_v):
        w = weight[v0:v0 + chunk_v].to(cdt)
        cv = w.shape[0]
        dwc = None
        if need_dw:
            dwc = dw[v0:v0 + cv] if dw_acc is None else dw_acc[:cv]
        for n0 in range(0, n, chunk_n):
            hc = hs[n0:n0 + chunk_n]
            gc = g[n0:n0 + chunk_n]
            z = torch.mm(hc, w.T, out=_tile(buf, hc.shape[0], cv))  # (cn, cv)
            dz = z.sub_(lse[n0:n0 + chunk_n, None]).exp_().mul_(-gc[:, None])  # -g * softmax
            idx, col = _hits(t[n0:n0 + chunk_n], v0, v0 + cv)
            dz[idx, col] += gc[idx]
            if need_dh:
                dh_acc[n0:n0 + chunk_n].addmm_(dz, w)
            if need_dw:
                if n0 == 0:
                    torch.mm(dz.T, h[n0:n0 + chunk_n], out=dwc)
                else:
                    dwc.addmm_(dz.T, h[n0:n0 + chunk_n])
        if dw_acc is not None:
            dw[v0:v0 + cv].copy_(dwc)
    if need_dh:
        if dense:
            dh.copy_(dh_acc)
        else:
            dh.index_copy_(0, rows, dh_acc.to(dh.dtype))
    return dh, dw
