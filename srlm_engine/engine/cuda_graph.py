"""CUDA graphs for decode steps: one graph per padded batch size, replayed instead of launching
the ~15 kernels per layer one by one (at batch 1 on a small model the launches, not the GPU, set
the pace).

A decode step has one token per sequence, so its shapes depend only on the batch size B: the
step is padded to the next captured size b >= B and the graph captured for b replays over static
input buffers. Padding rows write nothing (slot -1) and attend over nothing (context length 0,
which the Triton decode kernel returns as zeros); their logits are dropped. Block tables live in a
static [max_batch, max_blocks] buffer: the decode kernel reads a row's entries only up to its
context length, so stale entries past it are never read. Batches larger than the largest captured
size, and every step with a prefill, run eagerly.

All graphs share one memory pool, captured largest first so the smaller ones reuse its blocks
(vLLM's and PyTorch's recommended order). Each graph's logits live in that pool: they are valid
until the next replay, which is when the engine has already sampled from them.
Requires a backend whose ops never sync with the host (the Triton one with validate=False).
"""
from __future__ import annotations

import torch

from srlm_engine.engine.attention import Backend, KVCache, PagedAttention, StepMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, backend: Backend, cache: KVCache, scale: float, max_batch: int,
                 max_blocks: int):
        self.sizes = sorted({s for s in CAPTURE_SIZES if s < max_batch} | {max_batch})
        dev = cache.k[0].device
        M = self.sizes[-1]
        self.ids = torch.zeros(M, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(M, dtype=torch.int64, device=dev)
        self.slots = torch.full((M,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(M, max_blocks, dtype=torch.int32, device=dev)
        self.ctx = torch.zeros(M, dtype=torch.int32, device=dev)
        self.max_blocks = max_blocks
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in reversed(self.sizes):
                meta = StepMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                                    context_lens=self.ctx[:b], num_decode=b, query_starts=[],
                                    query_lens=[], ctx_lens=[])

                def step(b=b, meta=meta):
                    attend = PagedAttention(backend, cache, meta, scale)
                    return model.logits(model.hidden_states(self.ids[:b], self.pos[:b], attend=attend))

                # Warm up on a side stream first: Triton compiles and cuBLAS picks its kernels
                # outside the capture (neither may happen inside one).
                side = torch.cuda.Stream(device=dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = step()
                self.graphs[b] = (graph, out)
        torch.cuda.synchronize(dev)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, ids: list[int], pos: list[int], slots: list[int], tables: list[list[int]],
            ctx: list[int]) -> torch.Tensor:
        """Logits [B, V] of one decode step (B = len(ids) rows, in order)."""
        B = len(ids)
        b = next(s for s in self.sizes if s >= B)
        pad = b - B
        width = max(len(t) for t in tables)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the captured {self.max_blocks}")
        self.ids[:b].copy_(torch.tensor(ids + [0] * pad))
        self.pos[:b].copy_(torch.tensor(pos + [0] * pad))
        self.slots[:b].copy_(torch.tensor(slots + [-1] * pad))
        self.ctx[:b].copy_(torch.tensor(ctx + [0] * pad, dtype=torch.int32))
        self.tables[:B, :width].copy_(torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                   dtype=torch.int32))
        graph, out = self.graphs[b]
        graph.replay()
        self.replays += 1
        return out[:B]
