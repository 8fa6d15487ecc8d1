"""ModelRunner: the model, its KV cache and attention backend, and the tensors of one step.

From a scheduled step the runner builds one StepInput (packed token ids, positions, cache slots,
context lengths, block tables, which rows sample), runs the forward, eagerly or by replaying a CUDA
graph for a pure decode step, and returns the logits of the rows that sample. Requests are the
LLM's: it validates them, advances their sequences, samples and stops them.

Devices: on CPU with srlm_engine._C built, the C++ paged attention and small-batch linear
(engine/linear.py); on CUDA, the Triton paged attention, one SDPA call for a step's prefills, and
CUDA graphs for decode steps (engine/cuda_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from srlm_engine.engine.attention import KVCache, PagedAttention, StepMetadata, select_backend
from srlm_engine.engine.blocks import BlockPool
from srlm_engine.engine.scheduler import Scheduled
from srlm_engine.engine.sequence import Sequence

# A batch-invariant step (next_token_logprobs' prefills) runs every linear layer on at least
# MIN_ROWS rows: below about 12 rows the CPU matmul takes another path whose sums round
# differently, and a prompt's logits would depend on how many other tokens shared its step (see
# attention.invariant_attention).
MIN_ROWS = 16


@dataclass
class StepInput:
    """One step's batch: the new tokens of every scheduled sequence packed in one row each,
    decodes (one new token) first, then each prefill's chunk."""
    token_ids: list[int]           # [N]
    positions: list[int]           # [N]
    slots: list[int]               # [N] cache slot of each new token, -1 where a prefix hit holds it
    context_lens: list[int]        # [S] cached + new tokens of each sequence
    block_tables: list[list[int]]  # [S]
    num_decode: int                # the first num_decode sequences decode: one generated token each
    query_starts: list[int]        # first row of each prefill (a chunk of prompt, even of one token)
    query_lens: list[int]          # and its number of new tokens
    sample_rows: list[int]         # rows whose logits are sampled: a sequence's last token
    samplers: list[Sequence]       # the sequence of each sample row
    invariant: bool = False        # the step's prefills take the batch-invariant path

    @property
    def pure_decode(self) -> bool:
        """Every row is a decode (one generated token; each samples)."""
        return self.num_decode == len(self.token_ids)


class ModelRunner:
    def __init__(self, model, pool: BlockPool, dtype: torch.dtype, device: torch.device,
                 attention_backend: str | None, max_num_seqs: int, max_model_len: int, cuda_graphs: bool):
        cfg = model.config  # this rank's under tensor parallelism: its kv heads size the cache
        self.model, self.pool, self.device = model, pool, torch.device(device)
        self.cache = KVCache(cfg.num_hidden_layers, pool.num_blocks, pool.block_size, cfg.num_key_value_heads,
                             cfg.head_dim, dtype, self.device)
        self.scale = cfg.head_dim ** -0.5
        self.backend = select_backend(self.device, attention_backend)
        if self.backend.name == "cpp":  # the extension is there: small-batch decode streams weights
            from srlm_engine.engine.linear import use_small_batch_linear
            use_small_batch_linear(model)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton":
            from srlm_engine.engine.cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.backend, self.cache, self.scale, max_num_seqs,
                                       pool.blocks_for(max_model_len))

    def prepare(self, sched: Scheduled) -> StepInput:
        """The step's inputs; reads each sequence's num_computed (the LLM advances it after)."""
        ids, pos, slots, ctx, tables = [], [], [], [], []
        q_starts, q_lens, sample_rows, samplers = [], [], [], []
        for i, (s, n) in enumerate(zip(sched.seqs, sched.num_new)):
            start, end = s.num_computed, s.num_computed + n
            if i >= sched.num_decode:
                q_starts.append(len(ids))
                q_lens.append(n)
            ids += s.token_ids[start:end]
            pos += range(start, end)
            slots += self.pool.slots(s.block_table, start, end, s.num_shared)
            ctx.append(end)
            tables.append(s.block_table)
            if end == s.num_tokens:  # the chunk reaches the last token: sample from it
                sample_rows.append(len(ids) - 1)
                samplers.append(s)
        return StepInput(ids, pos, slots, ctx, tables, sched.num_decode, q_starts, q_lens, sample_rows, samplers,
                         invariant=any(s.invariant for s in sched.seqs))

    def forward(self, step: StepInput) -> torch.Tensor | None:
        """Logits [len(step.samplers), V] of the step's sampling rows (None if none samples)."""
        if self.graphs is not None and step.pure_decode and self.graphs.fits(len(step.token_ids)):
            return self.graphs.run(step.token_ids, step.positions, step.slots, step.block_tables,
                                   step.context_lens)
        tables = step.block_tables
        width = max(len(t) for t in tables)
        dev = self.device
        meta = StepMetadata(
            slot_mapping=torch.tensor(step.slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=dev),
            context_lens=torch.tensor(step.context_lens, dtype=torch.int32, device=dev),
            num_decode=step.num_decode, query_starts=step.query_starts, query_lens=step.query_lens,
            ctx_lens=step.context_lens, invariant=step.invariant)
        attend = PagedAttention(self.backend, self.cache, meta, self.scale)
        ids, pos, rows = step.token_ids, step.positions, step.sample_rows
        if step.invariant and len(ids) < MIN_ROWS:  # padding rows: never cached, dropped after
            ids, pos = ids + [0] * (MIN_ROWS - len(ids)), pos + [0] * (MIN_ROWS - len(pos))
        h = self.model.hidden_states(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), attend=attend)
        if not step.samplers:
            return None
        if step.invariant and len(rows) < MIN_ROWS:
            rows = rows + [rows[-1]] * (MIN_ROWS - len(rows))
        return self.model.logits(h[torch.tensor(rows, device=dev)])[:len(step.samplers)]
