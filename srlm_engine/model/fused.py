"""RMSNorm, SwiGLU and rotary embedding: one-pass CPU kernels for training, PyTorch references.

The Llama block calls rms_norm / swiglu / rope. While autograd records (training) on float32 CPU
tensors, they run torch.ops.srlm_C's kernels (csrc/fused_elementwise.cpp): one pass over the
activations forward and one backward, where torch's composites make 4-10 passes and as many
temporary tensors each (fewer temporaries also leave the allocator's heap less fragmented).
Everywhere else (inference, bf16, CUDA, or srlm_engine._C not built) they run the references
below, so inference keeps float32 results that transformers reproduces bit for bit; the kernels
agree with the references to float32 rounding (tests/model/test_fused.py).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., nh, hd]; cos, sin [..., 1, hd] (broadcast over the heads)."""
    return x * cos + rotate_half(x) * sin


_available: bool | None = None
_disabled = 0


@contextlib.contextmanager
def reference_ops():
    """Within this block the references run even where the kernels apply (a plain-PyTorch
    baseline in bench/bench_train.py, comparisons in tests)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def kernels_available() -> bool:
    """Whether torch.ops.srlm_C holds the kernels (srlm_engine._C built); says so once if not."""
    global _available
    if _available is None:
        try:
            import srlm_engine._C  # noqa: F401  registers torch.ops.srlm_C
            _available = hasattr(torch.ops.srlm_C, "rms_norm")
        except ImportError as e:
            _available = False
            warnings.warn(f"srlm_engine._C is not available ({e}); training uses torch's composite "
                          "RMSNorm / SwiGLU / rotary ops (slower, more temporaries)", RuntimeWarning, stacklevel=2)
    return _available


def use_kernels(*ts: torch.Tensor) -> bool:
    return (not _disabled and torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and kernels_available())


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x, weight = x.contiguous(), weight.contiguous()  # saved as the kernel reads them
        y, rstd = torch.ops.srlm_C.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.srlm_C.rms_norm_backward(dy.contiguous(), x, weight, rstd)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()  # saved as the kernel reads them
        ctx.save_for_backward(g, u)
        return torch.ops.srlm_C.swiglu(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return torch.ops.srlm_C.swiglu_backward(dy.contiguous(), g, u)


class _Rope(torch.autograd.Function):
    """cos / sin carry no gradient (they are functions of the positions only)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return torch.ops.srlm_C.rope(x.contiguous(), cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return torch.ops.srlm_C.rope_backward(dy.contiguous(), cos, sin), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_kernels(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if use_kernels(g, u):
        return _SwiGLU.apply(g, u)
    return swiglu_reference(g, u)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., nh, hd]; cos, sin [..., 1, hd] with the same leading dims as x."""
    if use_kernels(x, cos, sin) and cos.shape[:-2] == x.shape[:-2] and not cos.requires_grad:
        return _Rope.apply(x, cos, sin)
    return rope_reference(x, cos, sin)
