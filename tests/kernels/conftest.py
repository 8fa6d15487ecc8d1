"""Kernel tests: the Triton kernels run in Triton's interpreter on CPU.

triton.jit reads TRITON_INTERPRET when a kernel is *decorated* (triton 3.9: knobs.runtime.interpret
in triton.jit's decorator), and triton's own tl.sum/tl.max are decorated when triton is first
imported. So the variable must be set before anything imports triton. This file sets it; when
another test module imported triton first (a whole-suite run), the Triton-marked tests here skip
and test_interpreter_process.py runs them in a fresh process instead, so they are never lost.
Where CUDA is present the kernels stay compiled for test_gpu.py (the GPU tests), and the
Triton-marked CPU tests run in that fresh, interpreted process.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from srlm_kernels import fused_logprob  # noqa: E402

INTERPRETED = isinstance(fused_logprob._fwd_kernel, InterpretedFunction)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (in the interpreter on CPU)")


@pytest.fixture(autouse=True)
def _triton_needs_interpreter(request):
    if request.node.get_closest_marker("triton") and not INTERPRETED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_interpreter_process runs this")
