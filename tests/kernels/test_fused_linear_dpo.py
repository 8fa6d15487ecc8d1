"""fused_linear_dpo: hidden states in, DPO loss out, against the float64 composition of references."""
import pytest
import torch

from kernel_compare import assert_close
from srlm_kernels import fused_linear_dpo, fused_logprob, fused_logprob_torch
from srlm_kernels.reference.dpo_loss import fused_linear_dpo_ref

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
CPU_TILES = (fused_logprob_torch.CHUNK_N, fused_logprob_torch.CHUNK_V)  # read at import, before small_tiles


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_N", 8)
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_V", 40)
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", (16, 64, 32))
    monkeypatch.setattr(fused_logprob, "MIN_CHUNK_VALUES", 0)  # several backward vocabulary chunks
    monkeypatch.setattr(fused_logprob, "FWD_SPLITS", 3)  # the forward's vocabulary splits merged


def make_batch(b=2, seq_len=9, h=24, v=90, dtype=torch.float32, seed=0, prompt_len=3, logit_norm=None):
    """2B sequences packed into N = 2B * seq_len rows; the first prompt_len tokens of each are
    prompt. logit_norm: every row of hidden and of weight scaled to that norm, so |logits| reach
    its square."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * b * seq_len
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    if logit_norm is not None:
        hidden = hidden / hidden.norm(dim=1, keepdim=True) * logit_norm
        weight = weight / weight.norm(dim=1, keepdim=True) * logit_norm
    targets = torch.randint(0, v, (n,), generator=g)
    seq_ids = torch.arange(n) // seq_len
    targets[(torch.arange(n) % seq_len) < prompt_len] = -100
    seq_ids[targets == -100] = -1  # prompt tokens may carry any id: they are not read
    ref_c = -30 + torch.randn(b, generator=g, dtype=torch.float64)
    ref_r = -30 + torch.randn(b, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), targets, seq_ids, 2 * b, ref_c, ref_r


def check(backend, batch, loss_type="sigmoid", ls=0.0, beta=0.1):
    """Loss, rewards, policy log-probs and both gradients against the float64 composition of the
    references on the very same input values."""
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = batch
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_dpo(h, w, targets, seq_ids, num_seqs, ref_c.float(), ref_r.float(), beta=beta,
                           loss_type=loss_type, label_smoothing=ls, backend=backend)
    out[0].backward()
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    safe = torch.where(targets == -100, 0, seq_ids)
    ref = fused_linear_dpo_ref(h64, w64, targets, safe, num_seqs, ref_c.float().double(), ref_r.float().double(),
                               beta=beta, loss_type=loss_type, label_smoothing=ls)
    ref[0].backward()
    assert [o.dtype for o in out] == [torch.float32] * 5
    tokens = int(torch.bincount(safe[targets != -100], minlength=num_seqs).max()) if (targets != -100).any() else 0
    # each sequence's sum cancels terms of the largest logit's size, once per token, next to refs of ~30
    seq_scale = (h64 @ w64.T).abs().max().item() * max(tokens, 1) + 30
    for i, name in enumerate(("loss", "chosen rewards", "rejected rewards", "chosen logps", "rejected logps")):
        assert_close(out[i], ref[i], scale=seq_scale * (2 * seq_scale if loss_type == "ipo" and i == 0 else 1),
                     what=name)
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    assert_close(h.grad, h64.grad, what="d hidden")
    assert_close(w.grad, w64.grad, what="d weight")
    return out, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type, ls", [("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_matches_reference(backend, dtype, loss_type, ls):
    check(backend, make_batch(dtype=dtype), loss_type, ls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_sizes(backend, dtype):
    """3 pairs of 7 tokens (N = 42, no tile divides it), H = 37, V = 101 (not a multiple of any block)."""
    check(backend, make_batch(b=3, seq_len=7, h=37, v=101, dtype=dtype, prompt_len=2), "sigmoid", 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row(backend):
    """N = 1: the chosen sequence is one scored token, the rejected one has none. A sequence
    with no scored token sums to 0, as in the reference (the trainer never builds one: every
    reply keeps its end-of-turn token)."""
    batch = make_batch(b=1, seq_len=1, prompt_len=0)
    hidden, weight, targets, seq_ids, num_seqs, ref_c, ref_r = batch
    batch = (hidden[:1], weight, targets[:1], seq_ids[:1], num_seqs, ref_c, ref_r)
    out, _, _ = check(backend, batch)
    assert out[4].item() == 0.0 and out[3].item() < 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    """No scored token anywhere: both policy log-probs are 0, the loss is the reference margin's
    alone and no gradient reaches hidden or weight."""
    batch = make_batch(prompt_len=9)
    out, dh, dw = check(backend, batch)
    assert (out[3] == 0).all() and (out[4] == 0).all() and (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_extreme_logits(backend, loss_type):
    """Logits of order +-1e4: per-token log-probs of -1e4 summed, DPO logits far past where the
    sigmoid saturates; nothing overflows and the saturated gradients stay exact."""
    batch = make_batch(h=32, v=300, logit_norm=1e2)
    z = batch[0] @ batch[1].T
    assert z.abs().max() > 5e3
    check(backend, batch, loss_type)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_shape(backend, monkeypatch):
    """H = 576, V = 49152 as in SmolLM2-135M, with the production CPU tiles; 1 pair of 4 tokens
    (3 scored each), fp32, because the interpreter pays per weight element per pass."""
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_N", CPU_TILES[0])
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_V", CPU_TILES[1])
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", (16, 1024, 64))
    check(backend, make_batch(b=1, seq_len=4, h=576, v=49152, prompt_len=1), "sigmoid", 0.1)


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
