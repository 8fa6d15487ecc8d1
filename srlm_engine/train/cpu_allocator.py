"""The caching CPU allocator for training (csrc/cpu_allocator.cpp), installed once per process.

glibc keeps freed memory in a heap that one training step leaves in pieces the next step's
activations do not fit: on SmolLM2 DPO the resident memory settles ~1.5 GB above the live tensors.
The C++ allocator gives tensors of 4 MiB and more their own mappings and keeps freed ones for the
next tensor of the same size, up to MAX_CACHED_MB, so the resident memory stays within that
bound of the live tensors at glibc's speed (bench/RESULTS.md, train rows). Process-wide: tensors
allocated after installing come from it, earlier ones go back where they came from.
"""
from __future__ import annotations

import warnings

import torch

MAX_CACHED_MB = 1024


def use_caching_cpu_allocator(max_cached_mb: int = MAX_CACHED_MB) -> bool:
    """Install it (or change its bound); -> False, with a warning, where srlm_engine._C is not built."""
    try:
        import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C
    except ImportError as e:
        warnings.warn(f"srlm_engine._C is not available ({e}); CPU tensors stay on glibc's allocator",
                      RuntimeWarning, stacklevel=2)
        return False
    torch.ops.srlm_C.use_caching_cpu_allocator(max_cached_mb)
    return True


def stats(reset_peak: bool = False) -> dict:
    """Bytes in live blocks (4 MiB and more), their peak since the last reset, bytes cached, blocks
    mapped (cache misses) and unmapped (evictions) since installing."""
    keys = ("allocated", "peak", "cached", "mapped", "unmapped")
    return dict(zip(keys, torch.ops.srlm_C.caching_cpu_allocator_stats(reset_peak)))
