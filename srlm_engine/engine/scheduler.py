"""Continuous batching: which sequences run this step, and with how many new tokens.

Each step (vLLM V1 style) first gives every running sequence its next tokens (one for decode, the
rest of its prompt, up to the token budget, for a chunked prefill), oldest first; a running
sequence that needs a block when none is free preempts the newest running sequence (its blocks are
released and it is recomputed later from its tokens; its generated tokens and RNG state are kept,
so its output does not change). Then waiting sequences are admitted, oldest first (preempted ones
are put back at the front), while the token budget, max_num_seqs and free blocks allow; they look
up their prompt in the prefix cache first. A pool of blocks for one max-length sequence is enough
for any workload to finish.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from srlm_engine.engine.blocks import INVARIANT, BlockPool
from srlm_engine.engine.sequence import Sequence


@dataclass
class Scheduled:
    """One step: sequences in packed order (decodes first) and each one's new-token count."""
    seqs: list[Sequence]
    num_new: list[int]
    num_decode: int


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table, seq.keys = [], []
        seq.num_computed = seq.num_shared = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _commit(self, seq: Sequence, upto: int) -> None:
        """Key every block of seq that is full once its first `upto` tokens are written."""
        self.pool.commit_full(seq.block_table, seq.keys, seq.token_ids, upto, _root(seq))

    def schedule(self) -> Scheduled:
        budget = self.max_num_batched_tokens
        chosen: dict[int, int] = {}  # seq_id -> new tokens
        running = sorted(self.running, key=lambda s: s.seq_id)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.pool.blocks_needed(len(seq.block_table), seq.num_computed + n)
            while not self.pool.can_allocate(need):
                victim = running.pop()  # the newest
                self._preempt(victim)
                chosen.pop(victim.seq_id, None)
                if victim is seq:
                    break
            else:
                seq.block_table += self.pool.allocate(need)
                self._commit(seq, seq.num_computed + n)
                chosen[seq.seq_id] = n
                budget -= n
                i += 1
        self.running = running
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.pool.lookup(seq.token_ids, _root(seq))
            shared = len(hits) * self.pool.block_size
            cached = min(shared, seq.num_tokens - 1)  # the last token is always run for its logits
            n = min(seq.num_tokens - cached, budget)
            need = self.pool.blocks_needed(len(hits), cached + n)
            # hits that sit in the free list are not free for this request's new blocks
            if not self.pool.can_allocate(need + self.pool.num_idle(hits)):
                break
            self.waiting.popleft()
            self.pool.take(hits)
            seq.block_table = hits + self.pool.allocate(need)
            seq.keys = [self.pool.key[b] for b in hits]
            seq.num_computed, seq.num_shared = cached, shared
            self.pool.queried_tokens += seq.num_tokens
            self.pool.hit_tokens += cached
            self.running.append(seq)
            self._commit(seq, cached + n)  # now: a later admission in this step may hit these
            chosen[seq.seq_id] = n
            budget -= n
        seqs = [s for s in self.running if s.seq_id in chosen]
        # decodes first, stable otherwise. A decode is one generated token; a chunk of prompt is a
        # prefill even when it is one token long, so that it is computed like any other prompt
        # token (attention.INVARIANT_Q)
        decode = {s.seq_id for s in seqs if chosen[s.seq_id] == 1 and s.num_computed >= s.num_prompt}
        seqs.sort(key=lambda s: s.seq_id not in decode)
        num_new = [chosen[s.seq_id] for s in seqs]
        return Scheduled(seqs, num_new, len(decode))

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_table)
        seq.block_table = []


def _root(seq: Sequence):
    """The prefix tree of seq's blocks: KV from the batch-invariant prefill is shared only with
    sequences computed the same way, so that their logits keep its guarantee."""
    return INVARIANT if seq.invariant else None
