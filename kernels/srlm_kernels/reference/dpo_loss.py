"""Plain PyTorch references for the DPO losses: the published formulas, float64-capable.

logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), u = beta * logits.
  sigmoid (DPO, Rafailov et al. 2023; label-smoothed as in TRL):
      -logsigmoid(u) * (1 - ls) - logsigmoid(-u) * ls
  robust (Chowdhury et al. 2024, TRL "robust"):
      (-logsigmoid(u) * (1 - ls) + logsigmoid(-u) * ls) / (1 - 2 ls)
  hinge (SLiC, Zhao et al. 2023):  relu(1 - u)
  ipo (Azar et al. 2023):          (logits - 1 / (2 beta)) ** 2
rewards = beta * (policy - ref), detached.
"""
import torch
import torch.nn.functional as F

from .fused_logprob import sequence_logprobs_ref


def dpo_loss_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
                 loss_type="sigmoid", label_smoothing=0.0):
    """All inputs [B] per-sequence summed log-probs -> (losses [B], chosen_rewards [B], rejected_rewards [B])."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def fused_linear_dpo_ref(hidden, weight, targets, seq_ids, num_seqs, ref_chosen, ref_rejected, beta=0.1,
                         loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100, temperature=1.0):
    """-> (mean loss, chosen_rewards [B], rejected_rewards [B], policy_chosen_logps [B], policy_rejected_logps [B])"""
    seq = sequence_logprobs_ref(hidden, weight, targets, seq_ids, num_seqs, ignore_index, temperature)
    b = num_seqs // 2
    pc, pr = seq[:b], seq[b:]
    losses, cr, rr = dpo_loss_ref(pc, pr, ref_chosen, ref_rejected, beta, loss_type, label_smoothing)
    return losses.mean(), cr, rr, pc, pr
