"""Plain PyTorch references for the fused log-prob kernels: obviously right, float64-capable.

They hold the full [N, V] logits; use them only to check the fused paths on small shapes.
"""
import torch


def fused_linear_logprob_ref(hidden, weight, targets, ignore_index=-100, temperature=1.0):
    """log_softmax(hidden @ weight.T / temperature)[n, targets[n]], 0 where targets == ignore_index.

    hidden [N, H], weight [V, H], targets [N] int -> [N] in hidden's dtype.
    """
    logits = (hidden @ weight.T) / temperature  # (N, V)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def sequence_logprobs_ref(hidden, weight, targets, seq_ids, num_seqs, ignore_index=-100, temperature=1.0):
    """Sum of the token log-probs of each sequence: out[s] = sum over n with seq_ids[n] == s. -> [num_seqs]"""
    logp = fused_linear_logprob_ref(hidden, weight, targets, ignore_index, temperature)
    valid = targets != ignore_index
    out = torch.zeros(num_seqs, dtype=logp.dtype, device=logp.device)
    return out.index_add(0, seq_ids[valid], logp[valid])
