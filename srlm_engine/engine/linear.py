"""Small-batch linear layers for CPU decode: torch.ops.srlm_C.small_batch_linear (csrc/linear.cpp).

A decode step at batch 1..8 spends its time streaming the weights once per token; torch's CPU
matmul reaches ~10 GB/s there on the project's 2-core machine, the C++ op ~25 GB/s (measured in
bench/bench_generate.py's batch-1 row). The engine swaps each nn.Linear of its inference copy of
the model for a SmallBatchLinear holding the very same parameters (tied embeddings stay tied):
rows up to MAX_ROWS[dtype] go to the op, everything else (prefill, big batches) to F.linear.
Past MAX_ROWS the op's per-row arithmetic outweighs the bandwidth it saves (bf16 at 8 rows: 0.87x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4}


class SmallBatchLinear(nn.Linear):
    @classmethod
    def wrap(cls, linear: nn.Linear) -> "SmallBatchLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= MAX_ROWS.get(x.dtype, 0) and x.device.type == "cpu":
            return torch.ops.srlm_C.small_batch_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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
