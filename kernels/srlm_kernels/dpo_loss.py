"""DPO losses on per-sequence summed log-probs: one Triton kernel forward, one backward.

    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)    all [B]
    u = beta * logits,  ls = label_smoothing
    sigmoid: L = -(1-ls) logsigmoid(u) - ls logsigmoid(-u)          dL/dlogits = beta (-(1-ls) sig(-u) + ls sig(u))
    robust:  L = (-(1-ls) logsigmoid(u) + ls logsigmoid(-u))/(1-2ls) dL/dlogits = beta (-(1-ls) sig(-u) - ls sig(u))/(1-2ls)
    hinge:   L = relu(1 - u)                                         dL/dlogits = -beta [u < 1]
    ipo:     L = (logits - 1/(2 beta))^2                             dL/dlogits = 2 (logits - 1/(2 beta))
    chosen_rewards = beta (policy_chosen - ref_chosen), rejected_rewards likewise; both detached.
d/d policy_chosen = dL/dlogits = -d/d ref_chosen; d/d policy_rejected = -dL/dlogits = -d/d ref_rejected.
The reference inputs get their (natural) gradients too; usually they do not require any.
Computed in float32 (float64 for float64 inputs); bf16/fp16 inputs are upcast first.
"""
import torch
import triton
import triton.language as tl

from ._checks import check_backend, check_float, check_number

LOSS_TYPES = {"sigmoid": 0, "robust": 1, "hinge": 2, "ipo": 3}
# One program per BLOCK pairs, element-wise; read at launch and by tests/kernels/aot_compile.py.
LAUNCH = dict(BLOCK=1024, num_warps=4, num_stages=3)


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))  # no overflow for |x| large


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load_logits(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, mask):
    """The four summed log-probs of a block of pairs and the DPO logits (pc - rc) - (pr - rr)."""
    pc = tl.load(pc_ptr + offs, mask=mask, other=0.0)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0.0)
    rc = tl.load(rc_ptr + offs, mask=mask, other=0.0)
    rr = tl.load(rr_ptr + offs, mask=mask, other=0.0)
    return pc, pr, rc, rr, (pc - rc) - (pr - rr)


@triton.jit
def _dpo_fwd_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, crew_ptr, rrew_ptr, B, beta, ls,
                    LOSS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    pc, pr, rc, rr, logits = _load_logits(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, mask)
    u = beta * logits
    if LOSS == 0:
        loss = -(1.0 - ls) * _logsigmoid(u) - ls * _logsigmoid(-u)
    elif LOSS == 1:
        loss = (-(1.0 - ls) * _logsigmoid(u) + ls * _logsigmoid(-u)) / (1.0 - 2.0 * ls)
    elif LOSS == 2:
        loss = tl.maximum(1.0 - u, 0.0)
    else:
        d = logits - 0.5 / beta
        loss = d * d
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(crew_ptr + offs, beta * (pc - rc), mask=mask)
    tl.store(rrew_ptr + offs, beta * (pr - rr), mask=mask)


@triton.jit
def _dpo_bwd_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, g_ptr, dlogits_ptr, B, beta, ls,
                    LOSS: tl.constexpr, BLOCK: tl.constexpr):
    """dlogits = g * dL/dlogits; the four input gradients are +-dlogits."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    _, _, _, _, logits = _load_logits(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, mask)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    u = beta * logits
    if LOSS == 0:
        d = beta * (-(1.0 - ls) * _sigmoid(-u) + ls * _sigmoid(u))
    elif LOSS == 1:
        d = beta * (-(1.0 - ls) * _sigmoid(-u) - ls * _sigmoid(u)) / (1.0 - 2.0 * ls)
    elif LOSS == 2:
        d = -beta * (u < 1.0).to(u.dtype)  # a where() of two scalars would be float32 for float64 inputs
    else:
        d = 2.0 * (logits - 0.5 / beta)
    tl.store(dlogits_ptr + offs, g * d, mask=mask)


def _check_interpreter(x):
    if x.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(_dpo_fwd_kernel, InterpretedFunction):
            raise RuntimeError("the Triton path on CPU tensors runs only in Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before triton is first imported (use backend='torch' on CPU)")


def _triton_dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """-> (losses, chosen_rewards, rejected_rewards), all [B]; inputs checked, same compute dtype."""
    _check_interpreter(pc)
    b = pc.shape[0]
    out = [torch.empty_like(pc) for _ in range(3)]
    if b:
        _dpo_fwd_kernel[(triton.cdiv(b, LAUNCH["BLOCK"]),)](pc, pr, rc, rr, *out, b, beta, label_smoothing,
                                                            LOSS=LOSS_TYPES[loss_type], **LAUNCH)
    return tuple(out)


def _triton_dpo_loss_backward(grad, pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """-> dL/dlogits [B] times the upstream gradient of the losses."""
    _check_interpreter(pc)
    b = pc.shape[0]
    dlogits = torch.empty_like(pc)
    if b:
        _dpo_bwd_kernel[(triton.cdiv(b, LAUNCH["BLOCK"]),)](pc, pr, rc, rr, grad.contiguous(), dlogits, b, beta,
                                                            label_smoothing, LOSS=LOSS_TYPES[loss_type], **LAUNCH)
    return dlogits


def _torch_dpo_loss(pc, pr, rc, rr, beta, loss_type, ls):
    """The CPU path: the same closed forms as the kernel, in torch (float64-capable)."""
    logits = (pc - rc) - (pr - rr)
    u = beta * logits
    lsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        loss = -(1 - ls) * lsig(u) - ls * lsig(-u)
    elif loss_type == "robust":
        loss = (-(1 - ls) * lsig(u) + ls * lsig(-u)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        loss = torch.relu(1 - u)
    else:
        loss = (logits - 0.5 / beta) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


def _torch_dpo_loss_backward(grad, pc, pr, rc, rr, beta, loss_type, ls):
    logits = (pc - rc) - (pr - rr)
    u = beta * logits
    if loss_type == "sigmoid":
        d = beta * (-(1 - ls) * torch.sigmoid(-u) + ls * torch.sigmoid(u))
    elif loss_type == "robust":
        d = beta * (-(1 - ls) * torch.sigmoid(-u) - ls * torch.sigmoid(u)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        d = -beta * (u < 1).to(u.dtype)  # a where() of two Python scalars is float32: -0.1 -> -0.10000000149
    else:
        d = 2 * (logits - 0.5 / beta)
    return grad * d


@torch.library.custom_op("srlm::dpo_loss", mutates_args=())
def _op(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
        loss_type: str, label_smoothing: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _triton_dpo_loss if backend == "triton" else _torch_dpo_loss
    return fn(pc, pr, rc, rr, beta, loss_type, label_smoothing)


@_op.register_fake
def _op_fake(pc, pr, rc, rr, beta, loss_type, label_smoothing, backend):
    return torch.empty_like(pc), torch.empty_like(pc), torch.empty_like(pc)


@torch.library.custom_op("srlm::dpo_loss_backward", mutates_args=())
def _bwd_op(grad: torch.Tensor, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
            beta: float, loss_type: str, label_smoothing: float, backend: str) -> torch.Tensor:
    fn = _triton_dpo_loss_backward if backend == "triton" else _torch_dpo_loss_backward
    return fn(grad, pc, pr, rc, rr, beta, loss_type, label_smoothing)


@_bwd_op.register_fake
def _bwd_op_fake(grad, pc, pr, rc, rr, beta, loss_type, label_smoothing, backend):
    return torch.empty_like(pc)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.args = inputs[4:]
    ctx.mark_non_differentiable(output[1], output[2])  # rewards are detached by definition


def _backward(ctx, grad_losses, grad_crew, grad_rrew):
    if grad_losses is None:
        return (None,) * 8
    d = _bwd_op(grad_losses.contiguous(), *ctx.saved_tensors, *ctx.args)
    return d, -d, -d, d, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, backend="auto"):
    """DPO loss per pair (see the module docstring for the formulas).

    All four inputs [B], same device; float32 out (float64 if the policy log-probs are float64).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards carry no gradient.
    label_smoothing: in [0, 0.5) for 'sigmoid' and 'robust', 0 for 'hinge' and 'ipo'.
    """
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    check_number("beta", beta)  # finite and > 0: beta = inf gave NaN and infinite losses
    if loss_type in ("sigmoid", "robust"):
        check_number("label_smoothing", label_smoothing, f"in [0, 0.5) for {loss_type!r}", lambda v: 0 <= v < 0.5)
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing has no meaning for {loss_type!r}; pass 0.0")
    pc = check_float("policy_chosen", policy_chosen, 1)
    names = ("policy_rejected", "ref_chosen", "ref_rejected")
    rest = [check_float(n, x, 1, device=pc.device) for n, x in zip(names, (policy_rejected, ref_chosen, ref_rejected))]
    for n, x in zip(names, rest):
        if x.shape != pc.shape:
            raise ValueError(f"{n} has shape {tuple(x.shape)}, expected {tuple(pc.shape)} like policy_chosen")
    cdt = torch.float64 if pc.dtype == torch.float64 else torch.float32
    pc, pr, rc, rr = (x.to(cdt) for x in (pc, *rest))
    backend = check_backend(backend, pc.device)
    return _op(pc, pr, rc, rr, float(beta), loss_type, float(label_smoothing), backend)
