"""Launch configs of the Triton fused log-prob on this GPU: forward and backward time per config.

    python bench/tune_fused_logprob.py [--shapes 4096x576x49152,8192x2048x128256] [--dtype bf16]

Each config is (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); the first is the current
default (srlm_kernels.fused_logprob.GPU_BLOCKS). Every config's log-probs and gradients are
checked against the default's before it is timed (triton.testing.do_bench medians, ms). Prints
a table; records nothing (the chosen default is what bench_fused_logprob.py records).
"""
import argparse

import torch
from triton.testing import do_bench

from srlm_kernels import fused_logprob as fl

CONFIGS = [fl.GPU_BLOCKS, (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
           (64, 256, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 4)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x576x49152,8192x2048x128256")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, {a.dtype}; times in ms (median of do_bench)")
    for shape in a.shapes.split(","):
        n, h, v = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(n, h, device="cuda", generator=g).to(DTYPES[a.dtype])
        weight = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).to(DTYPES[a.dtype])
        targets = torch.randint(0, v, (n,), device="cuda", generator=g)
        targets[: n // 4] = -100  # a quarter prompt tokens, as in DPO batches
        grad = torch.randn(n, device="cuda", generator=g)
        base = None
        for cfg in CONFIGS:
            try:
                fwd = lambda: fl._triton_fused_linear_logprob(hidden, weight, targets, -100, 1.0, blocks=cfg)  # noqa: E731
                logp, lse = fwd()
                bwd = lambda: fl._triton_fused_linear_logprob_backward(grad, hidden, weight, targets, lse, -100, 1.0,  # noqa: E731
                                                                       blocks=cfg)
                dh, dw = bwd()
                if base is None:
                    base = (logp, dh, dw)
                else:
                    torch.testing.assert_close(logp, base[0], atol=1e-3, rtol=1e-3)
                    torch.testing.assert_close(dh.float(), base[1].float(), atol=2e-2, rtol=2e-2)
                    torch.testing.assert_close(dw.float(), base[2].float(), atol=2e-2, rtol=2e-2)
                tf, tb = do_bench(fwd), do_bench(bwd)
                flops = 2 * (n - n // 4) * h * v  # the kept rows
                print(f"{shape:>18} {str(cfg):>24}: fwd {tf:8.2f}  bwd {tb:8.2f}  total {tf + tb:8.2f}  "
                      f"({4 * flops / ((tf + tb) * 1e-3) / 1e12:.0f} TFLOP/s over 4 matmuls){'  <- default' if cfg == fl.GPU_BLOCKS else ''}",
                      flush=True)
            except Exception as e:  # a config the card cannot run (shared memory): say so, go on
                print(f"{shape:>18} {str(cfg):>24}: failed: {str(e).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
    main()
