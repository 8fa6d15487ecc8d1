"""`auto` dtypes follow the device: bf16 on CUDA and on CPUs with native bf16 (avx512_bf16, AMX),
fp32 elsewhere, for generation and for training's compute; a run says which it chose."""
import pytest
import torch

from srlm_engine import device
from srlm_engine.config import ConfigError, LoopConfig, TrainConfig
from srlm_engine.train.parallel import bf16_compute


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has the given bf16 flags, with no SRLM_CPU_BF16 override."""
    monkeypatch.delenv("SRLM_CPU_BF16", raising=False)

    def set_flags(*flags):
        monkeypatch.setattr(device, "cpu_bf16_flags", lambda: list(flags))
    return set_flags


def test_auto_is_bf16_on_cuda_and_native_bf16_cpus_else_fp32(cpu_flags):
    cpu_flags()  # AVX2 only, as on the 2-core EPYC where bf16 generation ran 3.4x slower than fp32
    assert device.auto_dtype("cpu") == (torch.float32, "a CPU without native bf16 (no avx512_bf16 or AMX)")
    assert device.resolve_dtype("auto", "cpu") == torch.float32
    assert device.auto_dtype("cuda")[0] == torch.bfloat16
    cpu_flags("avx512_bf16")
    assert device.auto_dtype("cpu") == (torch.bfloat16, "a CPU with avx512_bf16")
    cpu_flags("avx512_bf16", "amx_bf16")
    assert device.describe("auto", "cpu") == "bfloat16 (auto: a CPU with avx512_bf16/amx_bf16)"
    # an explicit dtype is taken as it is
    assert device.resolve_dtype("float32", "cpu") == torch.float32
    assert device.describe("float16", "cpu") == "float16"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        device.resolve_dtype("fp8", "cpu")


def test_the_cpu_check_reads_cpuinfo_and_the_variable_overrides_it(monkeypatch, cpu_flags):
    flags = device.cpu_bf16_flags()  # this machine's own answer: a subset of the flags we look for
    assert set(flags) <= set(device.NATIVE_BF16_FLAGS)
    cpu_flags()
    monkeypatch.setenv("SRLM_CPU_BF16", "1")
    assert device.auto_dtype("cpu") == (torch.bfloat16, "SRLM_CPU_BF16=1")
    monkeypatch.setenv("SRLM_CPU_BF16", "0")
    cpu_flags("amx_bf16")
    assert device.auto_dtype("cpu") == (torch.float32, "SRLM_CPU_BF16=0")
    monkeypatch.setenv("SRLM_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="SRLM_CPU_BF16 must be 0 or 1, got 'yes'"):
        device.cpu_native_bf16()


def test_defaults_are_auto_and_settings_are_checked(cpu_flags):
    assert LoopConfig().dtype == "auto" and TrainConfig().mixed_precision == "auto"
    assert TrainConfig(mixed_precision=True).mixed_precision == "bf16"  # a TOML boolean
    assert TrainConfig(mixed_precision=False).mixed_precision == "none"
    with pytest.raises(ConfigError, match="mixed_precision must be 'auto', 'bf16' or 'none', got 'fp16'"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ConfigError, match="dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got 'half'"):
        LoopConfig(dtype="half")
    cpu = torch.device("cpu")
    cpu_flags()
    assert not bf16_compute(TrainConfig(), cpu) and bf16_compute(TrainConfig(mixed_precision="bf16"), cpu)
    cpu_flags("avx512_bf16")
    assert bf16_compute(TrainConfig(), cpu) and not bf16_compute(TrainConfig(mixed_precision="none"), cpu)
    assert not bf16_compute(TrainConfig(dtype="bfloat16"), cpu)  # bf16 weights: nothing to mix
    assert bf16_compute(TrainConfig(), torch.device("cuda"))
