"""The CPU kernels of model/fused.py (csrc/fused_elementwise.cpp) against their PyTorch references
in float64: outputs and every gradient, on awkward shapes. float32 kernels vs float64 references:
sums and exp differ from torch's by float32 rounding, so tolerances are float32's (rtol 1e-5 on
outputs; gradients of RMSNorm sum over rows and hidden, hence atol scaled by the row count)."""
import pytest
import torch

from srlm_engine.model import fused

pytestmark = pytest.mark.skipif(not fused.kernels_available(), reason="srlm_engine._C is not built")


def grads(fn, *inputs, upstream):
    """-> (output, grads of the inputs that require grad) of fn(*inputs) against `upstream`."""
    out = fn(*inputs)
    need = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, need, upstream)


def leaf(t, dtype=torch.float32, grad=True):
    return t.detach().to(dtype).requires_grad_(grad)


def close(a, b, rtol, atol):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 64), (7, 576), (33, 17)])
def test_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    up = torch.randn(shape, generator=g)
    with torch.enable_grad():
        y, (dx, dw) = grads(fused.rms_norm, leaf(x), leaf(w), 1e-5, upstream=up)
        y64, (dx64, dw64) = grads(fused.rms_norm_reference, leaf(x, torch.float64), leaf(w, torch.float64), 1e-5,
                                  upstream=up.double())
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the kernel ran, not the reference
    rows = x.numel() // shape[-1]
    close(y, y64, 1e-5, 1e-5)
    close(dx, dx64, 1e-5, 1e-5)
    close(dw, dw64, 1e-5, 1e-6 * rows)


@pytest.mark.parametrize("shape", [(1,), (15,), (17,), (3, 33), (2, 4, 1536)])
def test_swiglu(shape):
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(shape, generator=g) * 4
    gate.view(-1)[:3] = torch.tensor([-200.0, 200.0, 0.0])[:gate.numel()]  # exp's clamps, both ends
    u = torch.randn(shape, generator=g)
    up = torch.randn(shape, generator=g)
    with torch.enable_grad():
        y, (dg, du) = grads(fused.swiglu, leaf(gate), leaf(u), upstream=up)
        y64, (dg64, du64) = grads(fused.swiglu_reference, leaf(gate, torch.float64), leaf(u, torch.float64),
                                  upstream=up.double())
    assert "SwiGLU" in type(y.grad_fn).__name__
    for a, b in ((y, y64), (dg, dg64), (du, du64)):
        close(a, b, 1e-5, 1e-5)


@pytest.mark.parametrize("lead,nh,hd", [((1,), 1, 2), ((3, 5), 4, 6), ((2, 7), 9, 64), ((11,), 3, 18)])
def test_rope(lead, nh, hd):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, nh, hd, generator=g)
    # Independent values in both halves: the kernel must not assume cos[i] == cos[i + hd/2].
    angle = torch.rand(*lead, 1, hd, generator=g) * 6
    cos, sin = angle.cos(), angle.sin() * 1.5
    up = torch.randn(*lead, nh, hd, generator=g)
    with torch.enable_grad():
        y, (dx,) = grads(fused.rope, leaf(x), cos, sin, upstream=up)
        y64, (dx64,) = grads(fused.rope_reference, leaf(x, torch.float64), cos.double(), sin.double(),
                             upstream=up.double())
    assert "Rope" in type(y.grad_fn).__name__
    close(y, y64, 1e-5, 1e-6)
    close(dx, dx64, 1e-5, 1e-6)


def test_inference_and_other_dtypes_use_the_reference():
    x, w = torch.randn(4, 8), torch.randn(8)
    with torch.no_grad():
        assert torch.equal(fused.rms_norm(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6))
    xb = leaf(x, torch.bfloat16)
    with torch.enable_grad():
        assert fused.rms_norm(xb, w.bfloat16(), 1e-6).grad_fn.name() != "_RMSNormBackward"
        assert not fused.use_kernels(xb)


def test_bad_input_names_the_op():
    with pytest.raises(RuntimeError, match=r"srlm_C::rms_norm: x \[..., H\] needs w \[H\]"):
        torch.ops.srlm_C.rms_norm(torch.randn(3, 4), torch.randn(5), 1e-6)
    with pytest.raises(RuntimeError, match="srlm_C::swiglu: tensors must be float32"):
        torch.ops.srlm_C.swiglu(torch.randn(3).double(), torch.randn(3).double())
    with pytest.raises(RuntimeError, match="srlm_C::rope: x must be .* even hd"):
        torch.ops.srlm_C.rope(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="srlm_C::rope_backward: cos and sin must hold one"):
        torch.ops.srlm_C.rope_backward(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(3, 4))
