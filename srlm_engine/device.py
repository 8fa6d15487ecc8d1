"""The device a process computes on, and the dtype `auto` means there.

bf16 halves the bytes every matmul reads, but it is only faster where the hardware computes in it:
CUDA GPUs, and x86 CPUs with avx512_bf16 or AMX (bf16 matmuls ran 1.8x fp32 on a CPU with
avx512_bf16). Elsewhere torch converts bf16 in software: on a 2-core AVX2 EPYC, bf16 generation ran
at 53 tok/s against 179 in fp32. So `auto` is bf16 on CUDA and on CPUs with native bf16, fp32 on the
rest, for generation (LoopConfig.dtype) and for training's compute (TrainConfig.mixed_precision;
the weights themselves stay fp32 for AdamW).

SRLM_CPU_BF16=1 or 0 overrides the CPU check: the test suite sets 0, so its numbers do not depend
on the CPU it runs on.
"""
from __future__ import annotations

import os

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def default_device() -> torch.device:
    """The GPU where there is one (this process's, under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cpu_bf16_flags() -> list[str]:
    """The CPU's native-bf16 feature flags from /proc/cpuinfo (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in NATIVE_BF16_FLAGS if x in flags]
    except OSError:
        pass
    return []


def cpu_native_bf16() -> bool:
    forced = os.environ.get("SRLM_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise ValueError(f"SRLM_CPU_BF16 must be 0 or 1, got {forced!r}")
    return bool(cpu_bf16_flags())


def auto_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """-> (the dtype `auto` means on `device`, the reason in words)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "CUDA"
    forced = os.environ.get("SRLM_CPU_BF16")
    if cpu_native_bf16():
        why = "SRLM_CPU_BF16=1" if forced == "1" else f"a CPU with {'/'.join(cpu_bf16_flags())}"
        return torch.bfloat16, why
    why = "SRLM_CPU_BF16=0" if forced == "0" else "a CPU without native bf16 (no avx512_bf16 or AMX)"
    return torch.float32, why


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype setting ('auto', 'float32', 'bfloat16', 'float16') -> the torch dtype on `device`."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return auto_dtype(device)[0] if name == "auto" else getattr(torch, name)


def describe(name: str, device: torch.device | str) -> str:
    """'bfloat16 (auto: a CPU with avx512_bf16)' or 'float32': what a run prints at its start."""
    dtype = str(resolve_dtype(name, device)).removeprefix("torch.")
    return f"{dtype} (auto: {auto_dtype(device)[1]})" if name == "auto" else dtype
