"""Our DPO and SFT losses (fused log-probs, precomputed reference) against plain PyTorch that
materializes the [B, T, V] logits and runs a separate reference model, on the same batch.
float64 throughout, so any difference is a bug, not rounding."""
import pytest
import torch
import torch.nn.functional as F

from trainkit import tiny_config
from srlm_engine.model.llama import Llama
from srlm_engine.model.pull import pull
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.batches import IGNORE
from srlm_engine.train.losses import TokenLogprobs, compared_logps, dpo_batch_loss, sft_loss
from srlm_engine.train.refs import sequence_logps


def plain_seq_logps(model, ids, tgt):
    logits = model(ids)  # (2B, T, V), materialized
    valid = tgt != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * valid).sum(-1)


def plain_dpo(pc, pr, rc, rr, beta, loss_type):
    """The published losses, written out (DPO, IPO, SLiC hinge, robust DPO with ls = 0)."""
    logits = (pc - rc) - (pr - rr)
    if loss_type in ("sigmoid", "robust"):
        return -F.logsigmoid(beta * logits)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.fixture(scope="module")
def batch():
    tok = Tokenizer.from_pretrained(pull())
    pairs = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "It is 5, surely."},
             {"prompt": "Capital of Peru?", "chosen": "The capital of Peru is Lima.", "rejected": "Quito."},
             {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}]
    enc = batches.encode_pairs(tok, pairs, max_seq_len=64)
    ids, tgt = batches.collate(enc, [0, 1, 2], pad_id=2, dpo=True)
    return enc, ids, tgt


def test_ipo_needs_the_targets_to_average(batch):
    _, ids, tgt = batch
    with pytest.raises(ValueError, match="ipo' averages the log-probs"):
        dpo_batch_loss(torch.zeros(6, 4), torch.zeros(3), torch.zeros(3), loss_type="ipo")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_loss_and_grads_match_plain_pytorch(batch, loss_type):
    enc, ids, tgt = batch
    beta = 0.1 if loss_type != "hinge" else 2.0  # hinge: a beta that leaves some pairs inside the margin
    policy = Llama(tiny_config()).init_weights(0).double()
    reference = Llama(tiny_config()).init_weights(1).double()  # a different model: nonzero logits

    refs = sequence_logps(reference, enc, [0, 1, 2], pad_id=2, batch_size=2, device="cpu")
    rc = torch.tensor([refs[i][0] for i in range(3)], dtype=torch.float64)
    rr = torch.tensor([refs[i][1] for i in range(3)], dtype=torch.float64)
    loss, cr, rrew = dpo_batch_loss(TokenLogprobs(policy)(ids, tgt), rc, rr, beta, loss_type, targets=tgt)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    seq = plain_seq_logps(policy, ids, tgt)
    with torch.no_grad():
        ref_seq = plain_seq_logps(reference, ids, tgt)
    torch.testing.assert_close(rc, ref_seq[:3], rtol=1e-12, atol=1e-10)
    if loss_type == "ipo":  # TRL's IPO: per-token means of the log-probs, policy and reference alike
        count = (tgt != -100).sum(-1).double()
        assert len(set(count.tolist())) > 1  # rows of different lengths: a sum would differ
        seq, ref_seq = seq / count, ref_seq / count
    # TRL's logps/chosen and logps/rejected: the sequence log-probs the loss compares
    torch.testing.assert_close(compared_logps(TokenLogprobs(policy)(ids, tgt), loss_type, tgt), seq.detach(),
                               rtol=1e-12, atol=1e-12)
    pc, pr, prc, prr = seq[:3], seq[3:], ref_seq[:3], ref_seq[3:]
    plain = plain_dpo(pc, pr, prc, prr, beta, loss_type).mean()
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cr, beta * (pc - prc).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rrew, beta * (pr - prr).detach(), rtol=1e-12, atol=1e-12)
    assert any(ours[n].abs().max() > 0 for n in ours)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_sft_loss_matches_cross_entropy(batch):
    _, ids, tgt = batch
    model = Llama(tiny_config()).init_weights(0).double()
    loss, n = sft_loss(TokenLogprobs(model)(ids, tgt), tgt)
    plain = F.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
    assert n == int((tgt != IGNORE).sum())
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_mean_logits_are_the_mean_of_the_materialized_logits(batch, tied):
    """TRL's logits/* from the hidden states and the mean lm_head row, against the [B, T, V]
    logits averaged over the vocabulary; logp is the same as without them."""
    _, ids, tgt = batch
    model = Llama(tiny_config(tie_word_embeddings=tied)).init_weights(0).double()
    logp, m = TokenLogprobs(model)(ids, tgt, mean_logits=True)
    trained = tgt != IGNORE
    with torch.no_grad():
        want = model(ids).mean(-1) * trained  # (2B, T)
    torch.testing.assert_close(m.double(), want, rtol=1e-5, atol=1e-6)  # m is float32
    assert not m.requires_grad and m.abs().sum() > 0 and (m[~trained] == 0).all()
    torch.testing.assert_close(logp, TokenLogprobs(model)(ids, tgt), rtol=0, atol=0)


@pytest.mark.parametrize("dpo", [False, True])
def test_a_packed_batch_gives_the_padded_batchs_logps_and_gradients(dpo):
    """batches.pack + segment_attend against the padded batch: the same log-probs in the same
    [B, T] layout, TRL's mean logits and every parameter's gradient. Odd sizes: 3 records of
    uneven length, hidden 40, 5 heads over 1 kv head (head_dim 8), vocab 49152 (not a multiple of
    any kernel block). The shared prefix's gradient is the sum of what each row sends it, added
    in another order than the padded rows' weight gradients: equal to rounding, not bit for bit."""
    tok = Tokenizer.from_pretrained(pull())
    q = "Grade the answer from 0 to 5, adding one point per criterion met. Request: name a prime."
    if dpo:
        recs = [{"prompt": q, "chosen": c, "rejected": r} for c, r in
                (("7.", "9 is prime."), ("2, the only even prime.", "1."), ("13", "Fifteen, I think."))]
        enc = batches.encode_pairs(tok, recs, max_seq_len=96)
    else:
        recs = [{"messages": [{"role": "user", "content": q + a}, {"role": "assistant", "content": s}]}
                for a, s in ((" Answer: 4.", "Score: 0"), (" Answer: 11, since no smaller number divides it.",
                                                            "Score: 5"), (" Answer: 3", "Score: 4"))]
        enc = batches.encode_sft(tok, recs, max_seq_len=96)
    ids, tgt = batches.collate(enc, [0, 1, 2], pad_id=2, dpo=dpo)
    packed = batches.pack(ids, tgt, batches.row_lengths(enc, [0, 1, 2], dpo))
    assert packed is not None and int((packed.segments == 0).sum()) > 30
    model = Llama(tiny_config(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                              intermediate_size=72)).init_weights(0)
    root = TokenLogprobs(model)
    got = [root(ids, tgt, mean_logits=True, packed=packed), root(ids, tgt, mean_logits=True)]
    grads = []
    for logp, _ in got:
        model.zero_grad()
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    (logp_p, m_p), (logp_u, m_u) = got
    assert logp_p.shape == tgt.shape and (logp_p[tgt == IGNORE] == 0).all() and (logp_p[tgt != IGNORE] < 0).all()
    torch.testing.assert_close(logp_p, logp_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_p, m_u, rtol=1e-5, atol=1e-6)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
