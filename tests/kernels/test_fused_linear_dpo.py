"""fused_linear_dpo: hidden states in, DPO loss out, against the float64 composition of references."""
import pytest
import torch

from kernel_compare import assert_close
from srlm_kernels import fused_linear_dpo, fused_logprob, fused_logprob_torch
from srlm_kernels.reference.dpo_loss import fused_linear_dpo_ref

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_N", 8)
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_V", 40)
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", (16, 64, 32))
    monkeypatch.setattr(fused_logprob, "MIN_CHUNK_VALUES", 0)  # several backward vocabulary chunks
    monkeypatch.setattr(fused_logprob, "FWD_SPLITS", 3)  # the forward's vocabulary splits merged


def make_batch(b=2, seq_len=9, h=24, v=90, dtype=torch.float32, seed=0):
    """2B sequences packed into N = 2B * seq_len rows; the first 3 tokens of each are prompt."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * b * seq_len
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    seq_ids = torch.arange(n) // seq_len
    targets[(torch.arange(n) % seq_len) < 3] = -100
    seq_ids[targets == -100] = -1  # prompt tokens may carry any id: they are not read
    ref_c = -30 + torch.randn(b, generator=g, dtype=torch.float64)
    ref_r = -30 + torch.randn(b, generator=g, dtype=torch.float64)
    return hidden, weight, targets, seq_ids, 2 * b, ref_c, ref_r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, ls", [("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_matches_reference(backend, loss_type, ls):
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = make_batch()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_dpo(h, w, targets, seq_ids, num_seqs, ref_c.float(), ref_r.float(), beta=0.1,
                           loss_type=loss_type, label_smoothing=ls, backend=backend)
    out[0].backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    safe = torch.where(targets == -100, 0, seq_ids)
    ref = fused_linear_dpo_ref(h64, w64, targets, safe, num_seqs, ref_c.float().double(), ref_r.float().double(),
                               beta=0.1, loss_type=loss_type, label_smoothing=ls)
    ref[0].backward()
    seq_scale = (h64 @ w64.T).abs().max().item() * 6 + 30  # 6 summed tokens of logits that size
    for i, name in enumerate(("loss", "chosen rewards", "rejected rewards", "chosen logps", "rejected logps")):
        assert_close(out[i], ref[i], scale=seq_scale * (2 * seq_scale if loss_type == "ipo" and i == 0 else 1),
                     what=name)
    assert_close(h.grad, h64.grad, what="d hidden")
    assert_close(w.grad, w64.grad, what="d weight")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gradcheck_cpu_path(loss_type):
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = make_batch(b=1, seq_len=5, h=6, v=11,
                                                                          dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_dpo(a, b, targets, seq_ids, num_seqs, ref_c, ref_r, beta=0.5,
                                      loss_type=loss_type, backend="torch")[0],
        (hidden.requires_grad_(), weight.requires_grad_()))


def test_bad_inputs():
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = make_batch()
    with pytest.raises(ValueError, match="num_seqs must be 2B"):
        fused_linear_dpo(hidden, weight, targets, seq_ids, 3, ref_c, ref_r)
    with pytest.raises(ValueError, match=r"num_seqs must be 2B > 0 .*got 4\.0"):  # a TypeError deep in torch before
        fused_linear_dpo(hidden, weight, targets, seq_ids, float(num_seqs), ref_c, ref_r)
    with pytest.raises(ValueError, match=r"ref_rejected must have shape \(2,\)"):
        fused_linear_dpo(hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r[:1])
    bad_ids = seq_ids.clone()
    bad_ids[5] = num_seqs  # a scored token outside every sequence
    with pytest.raises(ValueError, match="seq_ids must be in"):
        fused_linear_dpo(hidden, weight, targets, bad_ids, num_seqs, ref_c, ref_r)


def test_traces_under_torch_compile():
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = make_batch()

    def loss(h, w):
        return fused_linear_dpo(h, w, targets, seq_ids, num_seqs, ref_c, ref_r, backend="torch")[0]

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(h, w)
    compiled.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = loss(h2, w2)
    eager.backward()
    assert torch.equal(compiled, eager) and torch.equal(h.grad, h2.grad) and torch.equal(w.grad, w2.grad)
