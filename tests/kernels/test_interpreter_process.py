"""Runs the Triton-marked kernel tests in a fresh process when this one cannot (see conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton.runtime.interpreter import InterpretedFunction

from srlm_kernels import fused_logprob


def test_triton_tests_in_fresh_process():
    if isinstance(fused_logprob._fwd_kernel, InterpretedFunction):
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "triton", "-p", "no:cacheprovider",
                           str(here)], env=env, cwd=here.parent.parent, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
