"""Linear layers for CPU decode: small batches through torch.ops.srlm_C.small_batch_linear
(csrc/linear.cpp), the wide vocabulary projection in column chunks.

A decode step at batch 1..8 spends its time streaming the weights once per token; torch's CPU
matmul reaches ~10 GB/s there on the project's 2-core machine, the C++ op ~25 GB/s (measured in
bench/bench_generate.py's batch-1 row). The engine swaps each nn.Linear of its inference copy of
the model for a SmallBatchLinear holding the very same parameters (tied embeddings stay tied):
rows up to MAX_ROWS[dtype] go to the op, everything else (prefill, big batches) to F.linear.
Past MAX_ROWS the op's per-row arithmetic outweighs the bandwidth it saves (bf16 at 8 rows: 0.87x).

The lm_head's output is wide ([rows, 49152] for SmolLM2: 25 MB at 128 rows) and one matmul
writing it all ran at ~half the rate of the model's other matmuls (47-54 vs ~90 GFLOP/s on one
core); WIDE_CHUNK output columns at a time keep each output tile in cache. Same products, same
sums: the result equals F.linear's bit for bit here (a sum over the inputs does not depend on
how the outputs are split).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4}
WIDE = 16384  # float32 layers with at least this many outputs are computed in column chunks
WIDE_CHUNK = 1024


class SmallBatchLinear(nn.Linear):
    @classmethod
    def wrap(cls, linear: nn.Linear) -> "SmallBatchLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.device.type == "cpu":
            if x.dtype in MAX_ROWS and x.shape[0] <= MAX_ROWS[x.dtype]:
                return torch.ops.srlm_C.small_batch_linear(x, self.weight, self.bias)
            if self.out_features >= WIDE and x.dtype == torch.float32:
                return chunked_linear(x, self.weight, self.bias, WIDE_CHUNK)
        return F.linear(x, self.weight, self.bias)


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """F.linear(x [M, K], weight [N, K], bias) computed `chunk` output columns at a time."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for n0 in range(0, weight.shape[0], chunk):
        o, w = out[:, n0:n0 + chunk], weight[n0:n0 + chunk]
        if bias is None:
            torch.mm(x, w.T, out=o)
        else:
            torch.addmm(bias[n0:n0 + chunk], x, w.T, out=o)
    return out


def use_small_batch_linear(model: nn.Module) -> int:
    """Replaces every nn.Linear of `model` in place; returns how many. Needs srlm_engine._C."""
    import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, SmallBatchLinear.wrap(child))
                count += 1
    return count
