"""dpo_loss: the Triton kernels (interpreter) and the torch path against the float64 reference."""
import pytest
import torch

from kernel_compare import assert_close
from srlm_kernels import dpo_loss
from srlm_kernels.reference.dpo_loss import dpo_loss_ref

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
# (loss_type, label_smoothing): each published form, with and without smoothing where it applies.
LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]


def make_logps(b, dtype=torch.float32, seed=0, spread=5.0):
    """Summed log-probs of 2B sequences (~ -100) with policy/reference gaps of order `spread`."""
    g = torch.Generator().manual_seed(seed)
    ref_c = -100 + 20 * torch.rand(b, generator=g, dtype=torch.float64)
    ref_r = -100 + 20 * torch.rand(b, generator=g, dtype=torch.float64)
    pol_c = ref_c + spread * torch.randn(b, generator=g, dtype=torch.float64)
    pol_r = ref_r + spread * torch.randn(b, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (pol_c, pol_r, ref_c, ref_r)]


def check(backend, inputs, beta, loss_type, ls):
    upstream = torch.randn(inputs[0].shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs = [x.clone().requires_grad_() for x in inputs]
    out = dpo_loss(*xs, beta=beta, loss_type=loss_type, label_smoothing=ls, backend=backend)
    (out[0] * upstream.to(out[0].dtype)).sum().backward()
    x64 = [x.to(torch.float64).requires_grad_() for x in inputs]
    ref = dpo_loss_ref(*x64, beta=beta, loss_type=loss_type, label_smoothing=ls)
    (ref[0] * upstream).sum().backward()
    # logits = (pc - rc) - (pr - rr) cancels terms of size max|logp|; beta and ipo's square scale it.
    big = max(x.abs().max().item() for x in x64) if inputs[0].numel() else 1.0
    logits = ((x64[0] - x64[2]) - (x64[1] - x64[3])).abs().max().item() if inputs[0].numel() else 1.0
    loss_scale = big * (beta if loss_type != "ipo" else 2 * (logits + 0.5 / beta))
    assert_close(out[0], ref[0], scale=loss_scale, what=f"{loss_type} losses")
    assert_close(out[1], ref[1], scale=beta * big, what="chosen rewards")
    assert_close(out[2], ref[2], scale=beta * big, what="rejected rewards")
    assert not out[1].requires_grad and not out[2].requires_grad
    grad_scale = big * (beta if loss_type != "ipo" else 2)
    for name, x, r in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), xs, x64):
        assert_close(x.grad, r.grad, scale=grad_scale, what=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, ls", LOSSES)
@pytest.mark.parametrize("b", [1, 7, 1500])  # 1500: more than one 1024-wide block
def test_matches_reference(backend, loss_type, ls, b):
    check(backend, make_logps(b), 0.1, loss_type, ls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, ls", LOSSES)
def test_extreme_margins(backend, loss_type, ls):
    """Policy/reference gaps of 1e3 (beta * logits ~ +-500): logsigmoid must not overflow."""
    check(backend, make_logps(33, spread=1e3), 0.5, loss_type, ls)


def test_cpu_path_float64():
    check("torch", make_logps(17, torch.float64), 0.3, "robust", 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hinge_gradient_float64(backend):
    """d hinge / d policy_chosen is exactly -beta inside the margin, 0 outside, in float64: a
    float32 -beta (0.1 -> 0.10000000149) put a 1.5e-8 relative error into every float64 gradient."""
    pc, pr, rc, rr = make_logps(6, torch.float64, spread=1.0)
    pc = (pc + 30.0 * torch.tensor([1, -1, 1, -1, 1, -1], dtype=torch.float64)).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge", backend=backend)
    losses.sum().backward()
    inside = (0.1 * ((pc - rc) - (pr - rr)) < 1).detach()
    assert inside.any() and not inside.all()
    assert torch.equal(pc.grad, torch.zeros_like(pc).masked_fill(inside, -0.1))


@pytest.mark.parametrize("loss_type, ls", LOSSES)
def test_gradcheck_cpu_path(loss_type, ls):
    xs = [x.requires_grad_() for x in make_logps(6, torch.float64, spread=1.0)]
    if loss_type == "hinge":  # keep away from the kink at beta * logits = 1
        xs[0] = (xs[0].detach() + 30.0 * torch.tensor([1, -1, 1, -1, 1, -1])).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: dpo_loss(*a, beta=0.2, loss_type=loss_type, label_smoothing=ls, backend="torch")[0], xs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, ls", LOSSES)
def test_bfloat16_inputs(backend, loss_type, ls):
    """bf16 log-probs are upcast, computed in fp32 (losses and rewards come back fp32) and their
    gradients rounded once to bf16: losses and rewards against the float64 reference on the same
    bf16 values, gradients to the bf16 entry of the table against their own largest value."""
    inputs = make_logps(9, torch.bfloat16)
    upstream = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs = [x.clone().requires_grad_() for x in inputs]
    out = dpo_loss(*xs, beta=0.1, loss_type=loss_type, label_smoothing=ls, backend=backend)
    assert [o.dtype for o in out] == [torch.float32] * 3
    (out[0] * upstream.float()).sum().backward()
    x64 = [x.double().requires_grad_() for x in inputs]
    ref = dpo_loss_ref(*x64, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    (ref[0] * upstream).sum().backward()
    big = max(x.abs().max().item() for x in x64)  # ~100: the terms the logits cancel
    logits = ((x64[0] - x64[2]) - (x64[1] - x64[3])).abs().max().item()
    assert_close(out[0], ref[0], scale=big * (0.1 if loss_type != "ipo" else 2 * (logits + 5)), what="losses")
    assert_close(out[1], ref[1], scale=0.1 * big, what="chosen rewards")
    assert_close(out[2], ref[2], scale=0.1 * big, what="rejected rewards")
    for name, x, r in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), xs, x64):
        assert x.grad.dtype == torch.bfloat16
        assert_close(x.grad, r.grad, what=f"d {name}")


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="kto"), "loss_type must be one of"),
    (dict(beta=0.0), "beta must be a finite number > 0, got 0.0"),
    (dict(beta=float("inf")), "beta must be a finite number > 0, got inf"),  # gave NaN and infinite losses
    (dict(beta="0.1"), "beta must be a finite number > 0, got '0.1'"),
    (dict(label_smoothing="0.1"), r"label_smoothing must be in \[0, 0.5\) for 'sigmoid', got '0.1'"),
    (dict(loss_type=[]), r"loss_type must be one of .*, got \[\]"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1, loss_type="robust"), "label_smoothing must be in"),
    (dict(label_smoothing=0.1, loss_type="ipo"), "no meaning for 'ipo'"),
    (dict(backend="cuda"), "backend must be"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*make_logps(4), **kw)


def test_bad_tensors():
    pc, pr, rc, rr = make_logps(4)
    with pytest.raises(ValueError, match="ref_rejected has shape"):
        dpo_loss(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match="policy_chosen must have 1 dims"):
        dpo_loss(pc[None], pr, rc, rr)
    with pytest.raises(ValueError, match="policy_rejected must be float32"):
        dpo_loss(pc, pr.long(), rc, rr)


def test_opcheck_registrations_and_torch_compile():
    """The custom op's fake kernel, autograd registration and schema agree with the real op, and it
    traces whole under torch.compile with the same losses and gradients as eager."""
    import importlib
    mod = importlib.import_module("srlm_kernels.dpo_loss")  # the package's `dpo_loss` is the function
    pc, pr, rc, rr = make_logps(5)
    for loss_type, ls in (("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        torch.library.opcheck(mod._op, (pc.clone().requires_grad_(), pr.clone().requires_grad_(), rc, rr, 0.1,
                                        loss_type, ls, "torch"))
    fn = torch.compile(lambda a, b: dpo_loss(a, b, rc, rr, loss_type="robust", label_smoothing=0.1, backend="torch"),
                       backend="aot_eager", fullgraph=True)
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = fn(a, b)
    out[0].sum().backward()
    a2, b2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    eager = dpo_loss(a2, b2, rc, rr, loss_type="robust", label_smoothing=0.1, backend="torch")
    eager[0].sum().backward()
    assert all(torch.equal(x, y) for x, y in zip(out, eager))
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
