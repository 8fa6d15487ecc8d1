"""srlm_kernels: Triton kernels for the training hot paths, each beside its PyTorch reference.

Depends on torch and triton only. CUDA tensors run the Triton kernels; CPU tensors run the same
tiled algorithm in torch (backend='auto'); backend='triton' on CPU needs TRITON_INTERPRET=1.
"""
from .dpo_loss import dpo_loss
from .fused_linear_dpo import fused_linear_dpo
from .fused_logprob import fused_linear_logprob, sequence_logprobs

__all__ = ["dpo_loss", "fused_linear_dpo", "fused_linear_logprob", "sequence_logprobs"]
