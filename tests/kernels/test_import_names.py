"""The repository's kernels/ folder must never import as a top-level `kernels`. Hugging Face ships a
package of that name (a dependency of transformers), and transformers imports it from
is_kernels_available(); with the repository root first on sys.path (`python -m pytest`, `python -m
srlm_engine.cli`, `python -c`), a kernels/__init__.py there would shadow it and break `from
transformers import ...`. Running our modules a second time under another name would also define
the srlm:: custom ops again, which torch.library answers by destroying the first definitions.

Checked in fresh processes, from the repository root and from another folder, so a failure cannot
break the ops of this one."""
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = '''
import sys
from pathlib import Path
import torch
import srlm_kernels

root = Path(sys.argv[1]).resolve()
ops = {name: sys.modules[f"srlm_kernels.{module}"]._op
       for name, module in [("dpo_loss", "dpo_loss"), ("fused_linear_logprob", "fused_logprob")]}

from transformers import LlamaConfig, LlamaForCausalLM          # imported `kernels` through the probe
from transformers.utils.import_utils import is_kernels_available
assert is_kernels_available(), "transformers does not see Hugging Face's kernels package"
import kernels
assert hasattr(kernels, "get_kernel"), f"`kernels` is not Hugging Face's package: {kernels!r}"
origin = Path(kernels.__file__).resolve()
assert root / "kernels" not in origin.parents, f"`kernels` imported from the repository's folder: {origin}"

# srlm_kernels comes from kernels/srlm_kernels, once, and nothing of it under another name
assert Path(srlm_kernels.__file__).resolve() == root / "kernels" / "srlm_kernels" / "__init__.py", srlm_kernels.__file__
twice = sorted(n for n, m in list(sys.modules.items())
               if not n.startswith("srlm_kernels") and root / "kernels" in
               Path(getattr(m, "__file__", None) or "/").resolve().parents)
assert not twice, f"modules of kernels/ imported under other names: {twice}"
for name, op in ops.items():
    assert getattr(torch.ops.srlm, name).default is op._opoverload, f"srlm::{name} was defined again"

xs = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
srlm_kernels.dpo_loss(*xs)[0].sum().item()
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2))
print("ok")
'''


@pytest.mark.parametrize("where", ["repo_root", "other_folder"])
def test_kernels_name_is_hugging_faces_and_ours_is_srlm_kernels(where, tmp_path):
    try:
        version("kernels")
    except PackageNotFoundError:  # a dev dependency (pyproject), so its absence is a broken install
        pytest.fail("Hugging Face's `kernels` package is not installed: pip install -e '.[dev]'")
    cwd = ROOT if where == "repo_root" else tmp_path  # `python -c` puts the cwd first on sys.path
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_kernels_folder_is_not_a_package():
    """Any kernels/__init__.py at the root would win over an installed `kernels` on the import path."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "kernels").iterdir() if p.name != "__pycache__") == ["srlm_kernels"]
