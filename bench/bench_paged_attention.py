"""Paged decode attention: the C++ op (torch.ops.srlm_C) on CPU, or the Triton kernel on a CUDA
GPU (--device cuda), against torch gather + SDPA on the same device.

The baseline is what the engine would do without the op: gather every sequence's blocks into a
padded [B, nkv, T, hd] copy, then one masked scaled_dot_product_attention with GQA. Both run in
this process on the same inputs (SmolLM2 attention: nh=9, nkv=3, hd=64, block 16, float32).
Bandwidth counts the K and V bytes that must be read (sum of context lengths x nkv x hd x 2);
the limit it is compared with is this machine's streaming read rate (a torch sum over 512 MB).
Bandwidth uses CPU time per thread (process CPU time / threads), not wall time: on a loaded
machine the wall time includes time the threads sat descheduled.

On CUDA, times are triton.testing.do_bench medians and bandwidth is bytes / GPU time, compared
with the card's device-to-device copy rate measured here (bytes read + written per second).

    python bench/bench_paged_attention.py [--device cpu|cuda] [--threads N] [--dtype float32|bfloat16] [--no-append]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from _common import append_rows, device_name

NH, NKV, HD, BS = 9, 3, 64, 16
CASES = [(1, 1024), (16, 512), (64, 1024), (256, 256), (256, 1024)]  # (sequences, context length)


def make_inputs(B, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g, dtype=torch.int32)  # ragged, mean ~3L/4
    lens[0] = L
    n_blocks = -(-L // BS)
    pool = B * n_blocks + 1
    k_cache = torch.randn(pool, BS, NKV, HD, generator=g).to(dtype)
    v_cache = torch.randn(pool, BS, NKV, HD, generator=g).to(dtype)
    tables = torch.randperm(pool, generator=g)[:B * n_blocks].view(B, n_blocks).int()  # scattered blocks
    q = torch.randn(B, NH, HD, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def gather_sdpa(q, k_cache, v_cache, tables, lens, scale):
    B, nh, hd = q.shape
    T = tables.shape[1] * k_cache.shape[1]
    k = k_cache[tables.long()].view(B, T, NKV, hd).transpose(1, 2)  # (B, nkv, T, hd), a copy
    v = v_cache[tables.long()].view(B, T, NKV, hd).transpose(1, 2)
    mask = torch.arange(T, device=q.device)[None, :] < lens[:, None].long()  # (B, T)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)  # (B, nh, 1, hd)
    return out[:, :, 0]


def ours(q, k_cache, v_cache, tables, lens, scale):
    if q.is_cuda:
        from srlm_kernels.paged_attention import paged_decode_attention
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, validate=False)
    import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C
    return torch.ops.srlm_C.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)


def check_same(q, k_cache, v_cache, tables, lens, scale, fp32_tol):
    """Ours and the baseline give the same answer before either is timed (bf16: one bf16 step)."""
    bf16 = q.dtype == torch.bfloat16
    torch.testing.assert_close(ours(q, k_cache, v_cache, tables, lens, scale),
                               gather_sdpa(q, k_cache, v_cache, tables, lens, scale),
                               atol=2e-2 if bf16 else fp32_tol, rtol=1e-2 if bf16 else fp32_tol)


def main_cuda(args):
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_gbs = 2 * x.numel() / (do_bench(lambda: x.clone(), return_mode="median") * 1e-3) / 1e9  # read + write
    del x
    dev = device_name("cuda")
    print(f"paged decode attention on {dev}, nh={NH} nkv={NKV} hd={HD} block={BS} {args.dtype}; "
          f"device copy {copy_gbs:.0f} GB/s")
    rows = []
    for B, L in CASES + [(256, 4096)]:
        q, kc, vc, tables, lens = (t.cuda() for t in make_inputs(B, L, dtype))
        scale = HD ** -0.5
        check_same(q, kc, vc, tables, lens, scale, fp32_tol=1e-4)
        t_ours = do_bench(lambda: ours(q, kc, vc, tables, lens, scale), return_mode="median")
        t_base = do_bench(lambda: gather_sdpa(q, kc, vc, tables, lens, scale), return_mode="median")
        gbs = int(lens.sum()) * NKV * HD * 2 * kc.element_size() / (t_ours * 1e-3) / 1e9
        print(f"B={B:>4} L<={L:>5}: triton {t_ours * 1e3:8.1f} us, gather+SDPA {t_base * 1e3:8.1f} us, "
              f"x{t_base / t_ours:.1f}; {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of the copy rate")
        rows.append((f"paged decode B={B} L<={L} nh={NH} nkv={NKV} hd={HD} bs={BS} {args.dtype}",
                     f"gather+SDPA {t_base * 1e3:.1f} us; triton {t_ours * 1e3:.1f} us, x{t_base / t_ours:.1f}; "
                     f"{gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of a {copy_gbs:.0f} GB/s device copy"))
    if not args.no_append:
        append_rows("paged_attention", dev, rows)


def timeit(fn, budget_s=1.0, min_reps=5):
    """Per call: wall seconds (median, p20, p80) and the median process CPU seconds, after 2 warmups.
    On a shared machine the CPU time is the steadier number: it excludes time spent descheduled."""
    fn()
    fn()
    wall, cpu, start = [], [], time.perf_counter()
    while len(wall) < min_reps or time.perf_counter() - start < budget_s:
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(wall) >= 200:
            break
    wall.sort()
    cpu.sort()
    pick = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return pick(wall, 0.5), pick(wall, 0.2), pick(wall, 0.8), pick(cpu, 0.5)


def stream_read_gbs():
    x = torch.ones(128 * 2**20)  # 512 MB
    cpu = timeit(lambda: x.sum(), budget_s=0.5)[3] / torch.get_num_threads()
    return x.numel() * 4 / cpu / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    if args.device == "cuda":
        return main_cuda(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    limit = stream_read_gbs()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"paged decode attention, nh={NH} nkv={NKV} hd={HD} block={BS} {args.dtype}, {args.threads} threads, "
          f"stream read {limit:.1f} GB/s per thread, load average {load:.1f}")
    head = f"{'B':>4} {'L':>5} | {'ours ms (p20-p80)':>24} | {'gather+SDPA ms (p20-p80)':>26} | {'speedup':>7} | " \
           f"{'ours CPU ms':>11} {'base CPU ms':>11} | {'GB/s':>6} {'of limit':>8}"
    print(head)
    print("-" * len(head))
    rows = []
    for B, L in CASES:
        q, kc, vc, tables, lens = make_inputs(B, L, dtype)
        scale = HD ** -0.5
        check_same(q, kc, vc, tables, lens, scale, fp32_tol=1e-5)
        t_ours = timeit(lambda: ours(q, kc, vc, tables, lens, scale))
        t_base = timeit(lambda: gather_sdpa(q, kc, vc, tables, lens, scale))
        gbs = int(lens.sum()) * NKV * HD * 2 * kc.element_size() / (t_ours[3] / args.threads) / 1e9
        print(f"{B:>4} {L:>5} | {t_ours[0]*1e3:>8.3f} ({t_ours[1]*1e3:.3f}-{t_ours[2]*1e3:.3f}) | "
              f"{t_base[0]*1e3:>9.3f} ({t_base[1]*1e3:.3f}-{t_base[2]*1e3:.3f}) | {t_base[0]/t_ours[0]:>6.1f}x | "
              f"{t_ours[3]*1e3:>11.3f} {t_base[3]*1e3:>11.3f} | {gbs:>6.1f} {gbs/limit:>7.0%}")
        rows.append((f"paged decode B={B} L<={L} nh={NH} nkv={NKV} hd={HD} bs={BS} {args.dtype}",
                     f"gather+SDPA {t_base[0]*1e3:.3f} ms ({t_base[1]*1e3:.3f}-{t_base[2]*1e3:.3f}); "
                     f"ours {t_ours[0]*1e3:.3f} ms ({t_ours[1]*1e3:.3f}-{t_ours[2]*1e3:.3f}), x{t_base[0]/t_ours[0]:.1f}; "
                     f"CPU time gather+SDPA {t_base[3]*1e3:.3f} ms, ours {t_ours[3]*1e3:.3f} ms; {gbs:.1f} GB/s per thread = "
                     f"{gbs/limit:.0%} of a {limit:.1f} GB/s stream read"))
    if not args.no_append:
        append_rows("paged_attention", device_name("cpu"), rows)
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
