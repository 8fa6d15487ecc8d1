"""SFT and DPO losses over the fused kernels; the [B, T, V] logits are never materialized.

    logp[b, t] = log p(targets[b, t] | input_ids[b, :t+1])   via srlm_kernels.fused_linear_logprob
    SFT:  loss = -sum(logp) / N                  N: number of trained tokens
    DPO:  seq[s] = sum_t logp[s, t]              [2B]: B chosen rows, then B rejected
          losses, cr, rr = dpo_loss(seq[:B], seq[B:], ref_chosen, ref_rejected, beta, loss_type)
          loss = sum(losses) / N                 N: number of pairs
N defaults to this batch's own count (its mean); the trainer passes the count of the whole
accumulated step on all ranks, so each token (pair) of the step weighs the same whichever
micro-batch holds it (HF's num_items_in_batch).
DPO variants are the kernel's loss_type: sigmoid (DPO), ipo, hinge (SLiC), robust. For ipo, as
TRL does, seq and the reference log-probs are per-token means (sums / trained tokens of the row):
IPO regresses the log-ratio margin onto 1 / (2 beta), a target that a length-summed margin would
overshoot by the length of the reply.
Our Llama has no dropout (the paper used 0.1): policy and reference passes are deterministic, and
so is training; nothing here switches train/eval behaviour.
"""
from __future__ import annotations

import torch
from torch import nn

from srlm_kernels import dpo_loss, fused_linear_logprob
from srlm_engine.model.llama import segment_attend
from srlm_engine.train.batches import IGNORE, Packed


class TokenLogprobs(nn.Module):
    """Llama -> per-token log-probs in ONE forward, so that FSDP2's root hooks (which gather the
    embedding, final norm and lm_head) cover the lm_head matmul inside the fused kernel too.
    Tied embeddings stay tied: lm_head.weight IS embed_tokens.weight, one parameter in the root
    group. `llama` keeps its own names; train/checkpoint.py strips the "llama." prefix."""

    def __init__(self, llama: nn.Module):
        super().__init__()
        self.llama = llama

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, mean_logits: bool = False,
                packed: Packed | None = None, start: int = 0, x: torch.Tensor | None = None):
        """input_ids, targets [B, T] -> logp [B, T] float32, 0 where targets == IGNORE.
        (Cloned out of the kernel's flat [B*T]: FSDP2 warns on a root returning a view.)
        packed: the same batch as one packed row (train/batches.pack), which is what runs; its
        log-probs come back in the [B, T] layout of input_ids.
        start, x: begin at block `start` with its input x, in the layout that runs (train/trunk_cache.py).
        mean_logits: -> (logp, m) with m [B, T] float32, no grad, the mean over the vocabulary of
        each position's logits (0 where targets == IGNORE), for TRL's logits/* metrics. The mean
        of h . W_v over v is h . mean_v(W_v): no [B, T, V] logits are made for it."""
        if packed is None:
            h, tgt = self.llama.hidden_states(input_ids, start=start, x=x), targets  # (B, T, H)
        else:
            h = self.llama.hidden_states(packed.ids, packed.positions, segment_attend(packed.segments),
                                         start=start, x=x)  # (1, N, H)
            tgt = packed.targets
        w = self.llama.lm_head.weight
        m = None
        if mean_logits:
            with torch.no_grad():  # elementwise in float32: autocast leaves it alone
                w_mean = w.detach().sum(0, dtype=torch.float32) / w.shape[0]  # (H,); no float copy of a bf16 W on CUDA
                m = (h.detach().float() * w_mean).sum(-1).masked_fill(tgt == IGNORE, 0.0)
        if torch.is_autocast_enabled(h.device.type):
            # autocast casts torch's matmuls, not our op: give it the autocast dtype as it would a
            # linear (the cast of w is in the graph, so its gradient still reaches the fp32 weight)
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        logp = fused_linear_logprob(h.flatten(0, 1), w, tgt.flatten(), ignore_index=IGNORE)
        if packed is None:
            logp = logp.view(targets.shape).clone()
        else:
            logp, m = _unpack(logp, packed.rows), None if m is None else _unpack(m.flatten(), packed.rows)
        return logp if m is None else (logp, m)


def _unpack(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Values of a packed row [N] -> the padded layout [B, T] of `rows` (0 at padding)."""
    return torch.where(rows >= 0, flat[rows.clamp(min=0)], flat.new_zeros(()))


def sft_loss(logp: torch.Tensor, targets: torch.Tensor, num_items: int | None = None) -> tuple[torch.Tensor, int]:
    """-> (negative log-likelihood summed over trained tokens / num_items, number of trained
    tokens); num_items defaults to that number (the mean over this batch's tokens)."""
    n = int((targets != IGNORE).sum())
    return -logp.sum() / max(n if num_items is None else num_items, 1), n


def dpo_batch_loss(logp: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                   num_items: int | None = None, targets: torch.Tensor | None = None):
    """logp [2B, T] (chosen rows, then rejected), refs [B] (summed) -> (sum of the pair losses /
    num_items (default B: their mean), chosen_rewards [B], rejected_rewards [B]); the rewards are
    detached. targets [2B, T]: needed for ipo, whose log-probs are per-token means."""
    seq = compared_logps(logp, loss_type, targets)  # (2B,)
    b = seq.shape[0] // 2
    if loss_type == "ipo":
        count = _trained(targets).to(seq)
        ref_chosen, ref_rejected = ref_chosen / count[:b], ref_rejected / count[b:]
    losses, cr, rr = dpo_loss(seq[:b], seq[b:], ref_chosen.to(seq.dtype), ref_rejected.to(seq.dtype),
                              beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    return losses.sum() / (b if num_items is None else num_items), cr, rr


def compared_logps(logp: torch.Tensor, loss_type: str = "sigmoid", targets: torch.Tensor | None = None) -> torch.Tensor:
    """logp [2B, T] -> the sequence log-probs [2B] the DPO loss compares (TRL's logps/*): sums
    over the trained tokens, or for ipo their per-token means (needs targets [2B, T])."""
    seq = logp.sum(-1)
    if loss_type != "ipo":
        return seq
    if targets is None:
        raise ValueError("loss_type 'ipo' averages the log-probs over each row's trained tokens: pass targets")
    return seq / _trained(targets).to(seq)


def _trained(targets: torch.Tensor) -> torch.Tensor:
    """Trained tokens per row [2B], at least 1."""
    return (targets != IGNORE).sum(-1).clamp(min=1)
