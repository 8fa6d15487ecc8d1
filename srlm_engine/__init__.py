"""srlm-engine: Self-Rewarding Language Models, from the sampler to the loop.

    from srlm_engine import LLM, SamplingParams      # vLLM's offline API (srlm_engine/engine)

The engine's names load on first use, so that `import srlm_engine` (and `srlm --help`) does not
load torch.
"""
import importlib
import os

# OpenMP threads that spin while waiting made small decode steps 3-4x slower whenever another
# process shared the cores (measured on the 2-core CI machine). Passive waiting costs little on
# an idle machine. It must be set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("srlm_engine.engine"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'srlm_engine' has no attribute {name!r}")
