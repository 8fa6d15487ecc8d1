"""The kernels/ directory imported under its folder name (`kernels`) must not define the srlm:: custom
ops a second time: torch.library would destroy the first definitions, which srlm_kernels' op objects
still point at, and their next call would read freed memory (a segfault in a whole-suite run, where
transformers' is_kernels_available() imports `kernels` from the repo root on sys.path). Checked in a
fresh process, so that a failure cannot break the ops of this one."""
import subprocess
import sys
from pathlib import Path

SCRIPT = '''
import importlib, sys
import torch
import srlm_kernels

ops = {name: sys.modules[f"srlm_kernels.{module}"]._op
       for name, module in [("dpo_loss", "dpo_loss"), ("fused_linear_logprob", "fused_logprob")]}
kernels = importlib.import_module("kernels")  # what transformers' is_kernels_available() does
from transformers.utils import import_utils
getattr(import_utils, "is_kernels_available", lambda: None)()  # the probe itself, where it exists
assert kernels is srlm_kernels, kernels.__name__
assert sys.modules["kernels.dpo_loss"] is sys.modules["srlm_kernels.dpo_loss"]
for name, op in ops.items():
    assert getattr(torch.ops.srlm, name).default is op._opoverload, f"srlm::{name} was defined again"
xs = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
torch.testing.assert_close(srlm_kernels.dpo_loss(*xs)[0], kernels.dpo_loss(*xs)[0])
print("ok")
'''


def test_kernels_folder_name_is_srlm_kernels():
    root = Path(__file__).resolve().parents[2]  # `python -c` puts the cwd, the repo root, on sys.path
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
