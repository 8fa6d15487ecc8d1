"""The processes of a run (ranks, devices, the generation groups) and the engines they open.

One process, or one SPMD job under torchrun: every rank runs the same loop over the same inputs.
Generation is data-parallel over `dp` groups of `tp` ranks each (world = dp x tp): the ranks of
a tensor-parallel group hold one engine's slices between them, and each data-parallel replica
computes its shard of every generation call (engine/data_parallel.py). Training shards the model
over the whole world (FSDP2, train/parallel.py). Rank 0 writes the run's files.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from srlm_engine.device import default_device, resolve_dtype
from srlm_engine.engine import LLM
from srlm_engine.engine.data_parallel import DataParallelLLM, ShardStore
from srlm_engine.train.parallel import setup


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    tp: int = 1
    device: torch.device = torch.device("cpu")
    dp_group: object = None  # this rank's data-parallel group (one rank of each tensor-parallel group)
    tp_group: object = None  # this rank's tensor-parallel group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def threads(self) -> int:
        """The cores this process may use, shared among the ranks on this node."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return max(1, len(os.sched_getaffinity(0)) // local)

    @classmethod
    def single(cls) -> "Runtime":
        """One process on this machine's default device (`srlm judge-eval`, the tests)."""
        return cls(device=default_device())

    @classmethod
    def start(cls, tp: int = 1) -> "Runtime":
        """Join torchrun's process group (none in one process) and make the generation groups:
        tensor-parallel groups of `tp` consecutive ranks, data-parallel groups across them."""
        d = setup()
        if tp < 1 or d.world % tp:
            raise ValueError(f"--tp {tp} must divide the number of processes ({d.world})")
        rt = cls(d.rank, d.world, tp, d.device)
        if d.distributed:
            for j in range(tp):  # every rank creates every group, in the same order
                g = dist.new_group(list(range(j, d.world, tp)))
                if d.rank % tp == j:
                    rt.dp_group = g
            for k in range(d.world // tp):
                g = dist.new_group(list(range(k * tp, (k + 1) * tp)))
                if d.rank // tp == k:
                    rt.tp_group = g
        return rt

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def decide(self, value):
        """Rank 0's `value` on every rank (a collective): a file rank 0 may be writing while
        another rank looks for it must not send the ranks down different paths."""
        box = [value]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, ok: bool, message: str = "") -> None:
        """Rank 0's verdict for all: each rank raises if rank 0 says no (a collective)."""
        ok, message = self.decide((ok, message))
        if not ok:
            raise RuntimeError(message)

    def log_line(self, msg: str) -> str:
        return f"[rank {self.rank}/{self.world}] {msg}" if self.distributed else msg


def open_engine(model_dir: Path, cfg, rt: Runtime | None = None, shards: Path | None = None,
                log: Callable[[str], None] = print):
    """The generation engine of the loop's phases and `srlm judge-eval`, for LoopConfig `cfg`:
    its dtype ('auto': bf16 where the device computes it natively) on this rank's device (the GPU
    where there is one, the trainer's choice too). In a job of several processes, one engine per
    data-parallel rank (tensor-parallel over rt.tp ranks), its calls collectives over the ranks,
    its finished shards kept in `shards`."""
    rt = rt or Runtime.single()
    kw = dict(kv_cache_tokens=cfg.kv_cache_tokens, max_num_seqs=cfg.max_num_seqs)
    if rt.distributed:
        kw["num_threads"] = rt.threads
    if rt.tp > 1:
        kw.update(tensor_parallel_size=rt.tp, tp_group=rt.tp_group)
    llm = LLM(str(model_dir), dtype=resolve_dtype(cfg.dtype, rt.device), device=str(rt.device), **kw)
    if rt.dp == 1:
        return llm
    return DataParallelLLM(llm, rt.dp_group, ShardStore(shards) if shards else None,
                           log=lambda m: log(rt.log_line(m)), phase=shards.name if shards else "generate",
                           writer=rt.rank % rt.tp == 0)
