"""The compiled Triton kernels on a CUDA GPU against the float64 references: fused log-prob,
DPO loss, fused linear DPO and the paged KV-cache ops, outputs and every gradient.

Run this module in its own pytest process on a GPU machine (`pytest -m gpu tests/kernels`):
the CPU tests' conftest turns Triton's interpreter on only where CUDA is absent, but any module
that sets TRITON_INTERPRET=1 first (tests/engine/test_paged_attention_ops.py) would make these
kernels interpreted, and then these tests skip rather than pass without having compiled anything."""
import os

import pytest
import torch

from kernel_compare import assert_close
from srlm_kernels import dpo_loss, fused_linear_dpo, fused_linear_logprob
from srlm_kernels import paged_attention as tri
from srlm_kernels.reference import paged_attention as ref_pa
from srlm_kernels.reference.dpo_loss import dpo_loss_ref, fused_linear_dpo_ref
from srlm_kernels.reference.fused_logprob import fused_linear_logprob_ref
from test_dpo_loss import LOSSES, make_logps
from test_fused_linear_dpo import make_batch
from test_fused_logprob import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="Triton's interpreter is on in this process: run `pytest -m gpu tests/kernels` alone"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 1000])  # 1000: 750 kept rows, several backward chunks
def test_fused_logprob_compiled(dtype, n):
    """The compiled kernels (the default launch configs, fused_logprob.gpu_blocks, with the forward split;
    tensor-core dots in bf16) on the SmolLM2 vocabulary
    (49152 = 384 tiles of 128) and on a vocabulary no tile divides."""
    for v in (49152, 1000):
        hidden, weight, targets, upstream = make_inputs(n, 576, v, dtype, ignore_every=4 if n > 1 else 0)
        h = hidden.cuda().requires_grad_()
        w = weight.cuda().requires_grad_()
        out = fused_linear_logprob(h, w, targets.cuda())
        (out * upstream.cuda().float()).sum().backward()
        h64 = hidden.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        ref = fused_linear_logprob_ref(h64, w64, targets)
        (ref * upstream).sum().backward()
        assert out.is_cuda and h.grad.is_cuda
        assert_close(out.cpu(), ref, scale=(h64 @ w64.T).abs().max().item(), what=f"logprobs V={v}")
        assert_close(h.grad.cpu(), h64.grad, what=f"d hidden V={v}")
        assert_close(w.grad.cpu(), w64.grad, what=f"d weight V={v}")


@pytest.mark.parametrize("loss_type, ls", LOSSES)
@pytest.mark.parametrize("b", [1, 1500])  # 1500: more than one 1024-wide block
def test_dpo_loss_compiled(loss_type, ls, b):
    inputs = make_logps(b)
    upstream = torch.randn(b, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs = [x.cuda().requires_grad_() for x in inputs]
    out = dpo_loss(*xs, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    (out[0] * upstream.cuda().float()).sum().backward()
    x64 = [x.detach().double().requires_grad_() for x in inputs]
    ref = dpo_loss_ref(*x64, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    (ref[0] * upstream).sum().backward()
    big = max(x.abs().max().item() for x in x64)
    logits = ((x64[0] - x64[2]) - (x64[1] - x64[3])).abs().max().item()
    loss_scale = big * (0.1 if loss_type != "ipo" else 2 * (logits + 5))
    assert_close(out[0].cpu(), ref[0], scale=loss_scale, what=f"{loss_type} losses")
    assert_close(out[1].cpu(), ref[1], scale=0.1 * big, what="chosen rewards")
    assert_close(out[2].cpu(), ref[2], scale=0.1 * big, what="rejected rewards")
    for name, x, r in zip(("pc", "pr", "rc", "rr"), xs, x64):
        assert_close(x.grad.cpu(), r.grad, scale=big * (0.1 if loss_type != "ipo" else 2), what=f"d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_dpo_compiled(dtype):
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = make_batch(b=3, seq_len=37, h=96, v=1000, dtype=dtype)
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    out = fused_linear_dpo(h, w, targets.cuda(), seq_ids.cuda(), num_seqs, ref_c.float().cuda(),
                           ref_r.float().cuda(), beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    out[0].backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    safe = torch.where(targets == -100, 0, seq_ids)
    ref = fused_linear_dpo_ref(h64, w64, targets, safe, num_seqs, ref_c.float().double(), ref_r.float().double(),
                               beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    ref[0].backward()
    seq_scale = (h64 @ w64.T).abs().max().item() * 34 + 30  # 34 summed tokens of logits that size
    for i, name in enumerate(("loss", "chosen rewards", "rejected rewards", "chosen logps", "rejected logps")):
        assert_close(out[i].detach().cpu().float(), ref[i], scale=seq_scale * (0.1 if i < 3 else 1), what=name)
    assert_close(h.grad.cpu(), h64.grad, what="d hidden")
    assert_close(w.grad.cpu(), w64.grad, what="d weight")


# (B, nh, nkv, hd, block_size, lens): GQA, an odd head dim and group, ragged lengths incl. 1 and 0
PAGED = [(5, 12, 4, 64, 16, (1, 17, 100, 33, 250)), (4, 9, 3, 48, 32, (0, 31, 32, 700))]
PAGED_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # fp32 sums; bf16 rounded once (see the CPU op tests)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", PAGED, ids=["gqa4", "odd"])
def test_paged_ops_compiled(dtype, case):
    B, nh, nkv, hd, bs, lens = case
    g = torch.Generator().manual_seed(0)
    need = [max(1, -(-L // bs)) for L in lens]
    num_blocks = sum(need) + 3
    kc = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)  # scattered, unsorted blocks
    tables = torch.full((B, max(need) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    q = torch.randn(B, nh, hd, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    # cache writes: one new token per sequence at its last position (slot -1: skipped)
    k_new = torch.randn(B, nkv, hd, generator=g).to(dtype)
    v_new = torch.randn(B, nkv, hd, generator=g).to(dtype)
    slots = torch.tensor([-1 if L == 0 else int(tables[b, (L - 1) // bs]) * bs + (L - 1) % bs
                          for b, L in enumerate(lens)], dtype=torch.int64)
    slots[1] = -1
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref_pa.reshape_and_cache(k_new, v_new, kc_ref, vc_ref, slots)
    kc_gpu, vc_gpu = kc.cuda(), vc.cuda()
    tri.reshape_and_cache(k_new.cuda(), v_new.cuda(), kc_gpu, vc_gpu, slots.cuda())
    assert torch.equal(kc_gpu.cpu(), kc_ref) and torch.equal(vc_gpu.cpu(), vc_ref)
    scale = hd ** -0.5
    want = ref_pa.paged_decode_attention(q.double(), kc_ref.double(), vc_ref.double(), tables, ctx, scale)
    got = tri.paged_decode_attention(q.cuda(), kc_gpu, vc_gpu, tables.cuda(), ctx.cuda(), scale)
    assert got.dtype == dtype and got.is_cuda
    tol = PAGED_TOL[dtype]
    err = (got.cpu().double() - want).abs()
    assert bool((err <= tol * (1 + want.abs())).all()), f"max error {err.max().item():.3e}"
    assert (got[torch.tensor(lens) == 0] == 0).all()  # an empty context attends to nothing
