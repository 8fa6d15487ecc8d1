"""AdamW, the learning-rate schedule and the batch-size rule for the learning rate.

Schedule over `total` optimizer steps, as a factor of the peak lr:
    warmup   step < W:  (step + 1) / W                          linear from peak/W up to peak
    decay    p = (step - W) / max(1, total - W) in [0, 1):
             linear: floor + (1 - floor) * (1 - p)
             cosine: floor + (1 - floor) * (1 + cos(pi * p)) / 2
with floor = min_lr / lr. The paper: SFT 5.5e-6 -> 1.1e-6, DPO 1e-6 -> 1e-7, batch 16.

Batch rule: an lr given for a global batch B0 is used at global batch B as
    none: lr,   linear: lr * B / B0,   sqrt: lr * sqrt(B / B0)       (min_lr scaled alike)
"""
from __future__ import annotations

import math

import torch
from torch import nn

PAPER_LR = {"sft": (5.5e-6, 1.1e-6), "dpo": (1e-6, 1e-7)}


def resolve_lr(kind: str, lr: float | None, min_lr: float | None, global_batch: int,
               lr_batch_size: int, rule: str) -> tuple[float, float]:
    """-> (peak lr, floor lr) after defaults (the paper's) and the batch-size rule."""
    peak, floor = PAPER_LR[kind]
    peak = peak if lr is None else lr
    floor = (floor if lr is None else 0.1 * peak) if min_lr is None else min_lr
    floor = min(floor, peak)
    ratio = global_batch / lr_batch_size
    scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return peak * scale, floor * scale


def lr_factor(step: int, total: int, warmup: int, floor: float, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return floor + (1 - floor) * (1 - p)


def build_optimizer(root: nn.Module, lr: float, min_lr: float, total: int, warmup: int, schedule: str,
                    weight_decay: float, betas: tuple[float, float], eps: float):
    """AdamW (weight decay on matrices only, not on norms or biases) and its LambdaLR.
    Call after sharding: the optimizer must hold the sharded parameters."""
    decay = [p for p in root.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in root.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
    floor = min_lr / lr if lr > 0 else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, floor, schedule))
    return opt, sched
