"""srlm_kernels: Triton kernels for the training hot paths, each beside its PyTorch reference.

Depends on torch and triton only. CUDA tensors run the Triton kernels; CPU tensors run the same
tiled algorithm in torch (backend='auto'); backend='triton' on CPU needs TRITON_INTERPRET=1.

The package lives in kernels/srlm_kernels/, one level below the repository's kernels/ folder, and
kernels/ itself has no __init__.py. With the repository root on sys.path (`python -m pytest`,
`python -m srlm_engine.cli`), a top-level `import kernels` then finds no regular package there and
goes on to an installed one of that name (Hugging Face's, which transformers probes); and these
modules can only ever import as srlm_kernels, so their srlm:: custom ops are defined once.
"""
from .dpo_loss import dpo_loss
from .fused_linear_dpo import fused_linear_dpo
from .fused_logprob import fused_linear_logprob, sequence_logprobs

__all__ = ["dpo_loss", "fused_linear_dpo", "fused_linear_logprob", "sequence_logprobs"]
