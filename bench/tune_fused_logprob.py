"""Launch configs of the Triton fused log-prob on this GPU: forward and backward swept apart.

    python bench/tune_fused_logprob.py [--shapes 4096x576x49152,8192x2048x128256] [--dtype bf16]

Forward: each tile config (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) with the vocabulary
split across programs as FWD_SPLITS=None picks (auto) and unsplit (1), the default tiles also at
2 to 32 splits. Backward: each tile config at the default chunk size, then the default tiles
with the vocabulary chunks' dz holding 1, 2 or 4 x N*H values (CHUNK_VALUES; Liger's row chunks
hold 1 x), with the peak memory above the inputs. The first config of each list is the current
default (fused_logprob.gpu_blocks). Every variant's log-probs and
gradients are checked against the defaults' before it is timed (triton.testing.do_bench medians,
ms). Prints tables; records nothing (the defaults' end-to-end figures are bench_fused_logprob.py's).
"""
import argparse

import torch
from triton.testing import do_bench

from srlm_kernels import fused_logprob as fl

TILES = [(64, 256, 64, 4, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3),
         (128, 128, 64, 4, 4), (128, 64, 64, 4, 3), (128, 128, 32, 8, 4)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def ordered(default):
    return [default] + [t for t in TILES if t != default]


def run(label, fn, check, flops, mem=False):
    """Times fn after check(fn()) passes; one printed line, or why it could not run."""
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        check(out)
        ms = do_bench(fn, return_mode="median")
        extra = f"  peak {peak:7.0f} MB" if mem else ""
        print(f"  {label:<44} {ms:8.2f} ms  {flops / (ms * 1e-3) / 1e12:5.0f} TFLOP/s{extra}", flush=True)
    except Exception as e:  # a config the card cannot run (shared memory): say so, go on
        print(f"  {label:<44} failed: {str(e).splitlines()[0][:120]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x576x49152,8192x2048x128256")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, {a.dtype}; do_bench medians")
    for shape in a.shapes.split(","):
        n, h, v = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(n, h, device="cuda", generator=g).to(DTYPES[a.dtype])
        weight = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).to(DTYPES[a.dtype])
        targets = torch.randint(0, v, (n,), device="cuda", generator=g)
        targets[: n // 4] = -100  # a quarter prompt tokens, as in DPO batches
        grad = torch.randn(n, device="cuda", generator=g)
        flops = 2 * (n - n // 4) * h * v  # one matmul over the kept rows
        logp, lse = fl._triton_fused_linear_logprob(hidden, weight, targets, -100, 1.0)
        dh, dw = fl._triton_fused_linear_logprob_backward(grad, hidden, weight, targets, lse, -100, 1.0)

        def check_fwd(out):
            torch.testing.assert_close(out[0], logp, atol=1e-3, rtol=1e-3)

        def check_bwd(out):
            torch.testing.assert_close(out[0].float(), dh.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(out[1].float(), dw.float(), atol=2e-2, rtol=2e-2)

        print(f"{shape} forward (1 matmul):")
        default_splits = fl.FWD_SPLITS
        for i, tiles in enumerate(ordered(fl.gpu_blocks("fwd", hidden.dtype))):
            # every tile config auto-split and unsplit; the default's also at fixed split counts
            for splits in (default_splits, 1) + ((2, 4, 8, 16, 32) if i == 0 else ()):
                fl.FWD_SPLITS = splits
                rb = -(-(n - n // 4) // tiles[0])
                got = fl.fwd_splits(rb, v, tiles[1], hidden.device)[0]
                run(f"{tiles} splits {got}{' (auto)' if splits is None else ''}",
                    lambda: fl._triton_fused_linear_logprob(hidden, weight, targets, -100, 1.0, blocks=tiles),
                    check_fwd, flops)
            fl.FWD_SPLITS = default_splits
        print(f"{shape} backward (3 matmuls):")
        bwd = lambda tiles=None: fl._triton_fused_linear_logprob_backward(  # noqa: E731
            grad, hidden, weight, targets, lse, -100, 1.0, blocks=tiles)
        for tiles in ordered(fl.gpu_blocks("bwd", hidden.dtype)):
            run(f"{tiles} dz {fl.CHUNK_VALUES} x N*H", lambda: bwd(tiles), check_bwd, 3 * flops, mem=True)
        default_values = fl.CHUNK_VALUES
        for values in (1, 2, 4):
            fl.CHUNK_VALUES = values
            tiles = fl.gpu_blocks("bwd", hidden.dtype)
            c = min(fl.chunk_cols(n - n // 4, v, h, tiles[1]), v)
            run(f"{tiles} dz {values} x N*H ({c} columns)", bwd, check_bwd, 3 * flops, mem=True)
        fl.CHUNK_VALUES = default_values


if __name__ == "__main__":
    main()
