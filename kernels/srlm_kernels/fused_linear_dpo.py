"""The DPO loss straight from hidden states: fused log-probs, per-sequence sums, DPO loss.

    logprobs[n]  = fused_linear_logprob(hidden, weight, targets)[n]          [N], no [N, V] logits
    seq[s]       = sum of logprobs[n] over seq_ids[n] == s                   [2B]: B chosen, then B rejected
    losses, cr, rr = dpo_loss(seq[:B], seq[B:], ref_chosen, ref_rejected)   [B]
    loss = mean(losses)
Gradients reach hidden and weight through the fused op's tiled backward.
"""
from .dpo_loss import dpo_loss
from .fused_logprob import sequence_logprobs


def fused_linear_dpo(hidden, weight, targets, seq_ids, num_seqs, ref_chosen, ref_rejected, beta=0.1,
                     loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100, temperature=1.0,
                     backend="auto"):
    """-> (loss scalar, chosen_rewards [B], rejected_rewards [B], policy_chosen_logps [B], policy_rejected_logps [B]).

    hidden [N, H], weight [V, H]; targets [N] (ignore_index at prompt and padding tokens);
    seq_ids [N] in [0, num_seqs) with num_seqs = 2B; ref_chosen, ref_rejected [B] (precomputed with
    sequence_logprobs under no_grad). The policy log-probs keep their graph: detach them to log.
    A sequence with no scored token sums to 0 (the empty sum, as in the reference and TRL); the
    trainer never builds one, since every reply keeps its end-of-turn token.
    """
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs % 2 or num_seqs <= 0:
        raise ValueError(f"num_seqs must be 2B > 0 (B chosen then B rejected), got {num_seqs}")
    b = num_seqs // 2
    for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if getattr(ref, "shape", None) != (b,):
            raise ValueError(f"{name} must have shape ({b},) for num_seqs={num_seqs}, got "
                             f"{tuple(getattr(ref, 'shape', ()))}")
    seq = sequence_logprobs(hidden, weight, targets, seq_ids, num_seqs, ignore_index, temperature, backend)
    pc, pr = seq[:b], seq[b:]
    ref_c, ref_r = ref_chosen.to(seq.dtype), ref_rejected.to(seq.dtype)
    losses, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, beta, loss_type, label_smoothing, backend)
    return losses.mean(), cr, rr, pc, pr
