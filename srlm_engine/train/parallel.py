"""Process groups from torchrun's environment, and FSDP2 applied to a single-device model.

`setup()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun or torch.distributed.run) and
starts the default process group: NCCL when CUDA is present, gloo otherwise. Without those
variables (or with WORLD_SIZE=1) it starts nothing and training runs in one process, unsharded.

`parallelize()` applies, in this order (torchtitan's):
  1. activation checkpointing, each transformer block wrapped with checkpoint_wrapper
     (non-reentrant), in one of two modes:
     - "full": backward recomputes the block's whole forward; it keeps only the block's input.
     - "selective": it keeps what costs a matmul or attention to make (the q/k/v/o, gate and up
       projections' outputs, attention's output and log-sum-exp) and recomputes the cheap rest
       (norms, rotary, SiLU, products, adds), with no matmul run twice. down_proj's output is not
       kept: only the residual add reads it, so backward never needs it (recomputation stops
       early, before down_proj). About half the activation memory of none, for a few percent of
       time; see bench/RESULTS.md (train rows).
  2. fully_shard (FSDP2) on each block: one all-gather / reduce-scatter group per block;
  3. fully_shard on the root (TokenLogprobs), which takes what is left: embed_tokens, the final
     norm and lm_head. A tied lm_head.weight is the same Parameter as embed_tokens.weight, so it
     is sharded once, in one group, and stays tied.
With mixed precision, parameters are all-gathered and computed in bf16 and gradients reduced in
fp32 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)); the sharded master weights and
the optimizer state stay in the dtype the model was loaded in. One process has nothing to shard:
there the trainer runs the forward under torch.autocast(bf16) instead (`bf16_compute`), with the
same fp32 weights, gradients and optimizer state.
FSDP2 reduce-scatters each gradient as its mean over the W ranks (its default divide factor, W);
the trainer's loss carries the factor W that makes a step's gradient the global batch's mean
(train/trainer.py, `accumulate`). On the CPU the reduce-scatter adds the ranks' parts in rank
order (OrderedReduceScatter), so the weights do not depend on the world size where each rank runs
one micro-batch per step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from srlm_engine.config import CHECKPOINTING
from srlm_engine.device import auto_dtype


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Start the process group from torchrun's environment (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return Dist(rank, world, local, device)


def bf16_compute(cfg, device: torch.device) -> bool:
    """Whether TrainConfig `cfg` computes in bf16 over fp32 weights on `device`: mixed_precision
    'bf16', or 'auto' where the device computes bf16 natively (srlm_engine/device.py)."""
    if cfg.dtype != "float32" or cfg.mixed_precision == "none":
        return False
    return cfg.mixed_precision == "bf16" or auto_dtype(device)[0] == torch.bfloat16


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# The "selective" mode recomputes the matmuls of these submodules of a block (their outputs are
# not kept); all other matmul outputs are kept. down_proj's output is read only by the residual
# add, so backward never needs it and recomputation stops before it: it costs nothing.
RECOMPUTED_MATMULS = ("mlp.down_proj",)
_in_recomputed = [0]  # > 0 while one of those submodules runs (forward or recomputation)


def _enter(module, args):
    _in_recomputed[0] += 1


def _leave(module, args, output):
    _in_recomputed[0] -= 1


def _selective_policy():
    """Keep the outputs of attention and of matmuls outside RECOMPUTED_MATMULS; recompute the rest
    (norms, rotary, SiLU, products, adds). Any choice is correct: a dropped output is recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy
    aten = torch.ops.aten
    keep = {getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
        if hasattr(aten, name)}
    matmuls = {aten.mm.default, aten.addmm.default}

    def policy(ctx, op, *args, **kwargs):
        if op in keep or (op in matmuls and not _in_recomputed[0]):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def checkpoint_blocks(blocks: nn.ModuleList, mode: str) -> None:
    """Wrap each block in place for activation checkpointing `mode` (see the module docstring)."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    if mode == "none":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    for i in range(len(blocks)):
        kw = {}
        if mode == "selective":
            for name in RECOMPUTED_MATMULS:
                sub = blocks[i].get_submodule(name)
                sub.register_forward_pre_hook(_enter)
                sub.register_forward_hook(_leave, always_call=True)
            kw["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
        blocks[i] = checkpoint_wrapper(blocks[i], preserve_rng_state=False, **kw)


def parallelize(root: nn.Module, blocks: nn.ModuleList, d: Dist, mixed_precision: bool = False,
                activation_checkpointing: str = "none") -> nn.Module:
    """Shard `root` (whose submodules include `blocks`) in place as the module docstring says."""
    checkpoint_blocks(blocks, activation_checkpointing)
    if not d.distributed:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(root, mp_policy=mp)
    if d.device.type == "cpu" and hasattr(root, "set_custom_reduce_scatter"):  # FSDP2 with custom comms
        ordered = OrderedReduceScatter()
        for module in (*blocks, root):
            module.set_custom_reduce_scatter(ordered)
    return root


class OrderedReduceScatter:
    """FSDP2's gradient reduce-scatter with the ranks' parts summed in rank order,
    ((g0 + g1) + g2) + ..., the order in which one process accumulating the same micro-batches one
    after another adds them (batches.micro_batches gives rank r the step's r-th micro-batch when
    each rank runs one). gloo and NCCL sum in an order of their own, which changes the last bits of
    the weights with the world size. all_to_all_single brings each rank the W parts of its shard:
    (W - 1) / W of the buffer sent per rank, as in a ring reduce-scatter. The trainer uses it on
    CPU, where the forward and backward are batch-invariant too, so a step whose ranks run one
    micro-batch each trains the weights to the bits of one process (for W a power of two: the
    loss's factor W and FSDP2's mean over W are then exact)."""

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        w = group.size()
        parts = torch.empty((w, output_tensor.numel()), dtype=input_tensor.dtype, device=input_tensor.device)
        dist.all_to_all_single(parts, input_tensor.view(w, -1), group=group)
        output_tensor.copy_(parts[0])
        for part in parts[1:]:
            output_tensor.add_(part)
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(w)
        elif op != dist.ReduceOp.SUM:
            raise ValueError(f"OrderedReduceScatter sums or averages, not {op}")
        return None


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few floats over all ranks (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    if d.distributed:
        dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()
