"""The caching CPU allocator (csrc/cpu_allocator.cpp) in a fresh process, since installing it is
process-wide: blocks of 4 MiB and more are reused by size, the cache stays within its bound, the
statistics add up, the profiler still sees allocations, and tensors made before it still free."""
import subprocess
import sys
import textwrap

import pytest

from srlm_engine.model import fused

pytestmark = pytest.mark.skipif(not fused.kernels_available(), reason="srlm_engine._C is not built")

SCRIPT = textwrap.dedent('''
    import torch
    from srlm_engine.train.cpu_allocator import stats, use_caching_cpu_allocator
    MiB = 1 << 20
    before = torch.ones(3 * MiB)                     # glibc's, 12 MiB
    assert use_caching_cpu_allocator(64)
    a = torch.full((3 * MiB + 5,), 2.0)              # 12 MiB + 20 B -> one 12 MiB + 64 KiB block
    s = stats()
    assert s["allocated"] == 12 * MiB + 64 * 1024 and s["mapped"] == 1, s
    ptr = a.data_ptr()
    del a, before                                    # before goes back to glibc, a to the cache
    s = stats()
    assert (s["allocated"], s["cached"]) == (0, 12 * MiB + 64 * 1024), s
    b = torch.arange(3 * MiB + 5, dtype=torch.float32)  # same size: the cached block, no new mapping
    assert b.data_ptr() == ptr and stats()["mapped"] == 1
    assert float(b[-1]) == 3 * MiB + 4 and float(b[:10].sum()) == 45.0
    small = torch.ones(1000)                         # below 4 MiB: glibc's
    assert stats()["allocated"] == 12 * MiB + 64 * 1024
    c = [torch.empty(MiB * k) for k in (5, 6, 7)]    # 20, 24, 28 MiB live
    del c, b                                         # 84 MiB freed, bound 64: largest cached unmapped first
    s = stats()
    assert s["cached"] <= 64 * MiB and s["unmapped"] >= 1 and s["allocated"] == 0, s
    assert s["peak"] == 84 * MiB + 64 * 1024, s
    assert stats(reset_peak=True)["peak"] == s["peak"] and stats()["peak"] == 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.randn(4096, 576) * 2               # 9 MiB temporary + 9 MiB result
    assert sum(e.self_cpu_memory_usage for e in prof.events()) == 9 * MiB
    # oneDNN's bf16 GEMM raw-allocates its scratch, for 8 rows and for 1000, and frees it through the
    # raw deleter. The shapes stay small for CPUs without native bf16, where this GEMM is slow.
    w = torch.randn(1024, 2200, dtype=torch.bfloat16)
    for rows in (8, 1000):
        xb = torch.randn(rows, 1024, dtype=torch.bfloat16)
        y = (xb @ w).float()
        assert torch.allclose(y, xb.float() @ w.float(), rtol=2e-2, atol=0.5)
    use_caching_cpu_allocator(0)                     # a new bound applies at once
    del x
    assert stats()["cached"] == 0
    print("ok")
''')


def test_caching_cpu_allocator():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_bad_bound():
    r = subprocess.run([sys.executable, "-c", "import torch, srlm_engine._C; "
                        "torch.ops.srlm_C.use_caching_cpu_allocator(-1)"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "max_cached_mb must be >= 0, got -1" in r.stderr
