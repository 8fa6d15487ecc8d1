"""Block pool: fixed-size KV blocks, reference counts, prefix hashes, LRU eviction.

A sequence's KV lives in the blocks of its block table; token t sits in slot
block_table[t // block_size] * block_size + t % block_size of every layer's cache.

Prefix caching at block granularity: a *full* block is keyed by hash((parent key, its token
ids)), so a key names the whole prefix up to the block's end. A block gets its key when the step
that writes its last token is scheduled (`commit`): the engine writes every token's KV of a
layer before any attention of that layer reads, so a sequence scheduled later in the same step
may already hit it. That is how the n samples of one prompt, submitted together, allocate the
prompt's full blocks once.

A block whose ref count drops to 0 keeps its key and content and goes to the back of the free
list; allocation takes from the front (least recently freed first), evicting that block's key.
Blocks without a key go to the front, as they can never be hit.
"""
from __future__ import annotations

from collections import OrderedDict


INVARIANT = "batch-invariant"  # the prefix tree of the blocks the batch-invariant prefill wrote


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.key: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple | None] = [None] * num_blocks  # content check on a hit
        self.by_key: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # counters for tests and benchmarks
        self.allocated = 0        # fresh blocks handed out (not hits)
        self.hit_tokens = 0       # prompt tokens found in the cache
        self.queried_tokens = 0   # prompt tokens looked up

    @classmethod
    def for_tokens(cls, tokens: int, block_size: int) -> "BlockPool":
        """A pool holding at least `tokens` tokens."""
        return cls(-(-tokens // block_size), block_size)

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def blocks_needed(self, held: int, tokens: int) -> int:
        """Blocks to add to a table of `held` blocks so that it holds `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - held)

    def slots(self, table: list[int], start: int, end: int, shared: int = 0) -> list[int]:
        """Cache slots of positions start..end-1 of the sequence with block table `table`; -1 for
        the first `shared` positions (prefix-cache hits: their KV is there already)."""
        bs = self.block_size
        return [-1 if p < shared else table[p // bs] * bs + p % bs for p in range(start, end)]

    def num_idle(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the free list (ref 0): taking them shrinks it."""
        return sum(self.ref[b] == 0 for b in blocks)

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @staticmethod
    def chain_key(parent: int | None, tokens) -> int:
        return hash((parent, tuple(tokens)))

    def lookup(self, token_ids: list[int], root=None) -> list[int]:
        """Blocks holding the longest cached prefix of token_ids (full blocks only) in the prefix
        tree `root` (see commit_full); no refs taken."""
        bs, hits, parent = self.block_size, [], root
        for i in range(len(token_ids) // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = self.chain_key(parent, chunk)
            b = self.by_key.get(parent)
            if b is None or self.tokens[b] != chunk:
                break
            hits.append(b)
        return hits

    def take(self, blocks: list[int]) -> None:
        """Add a reference to cached blocks found by lookup()."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref 1), evicting the least recently freed cached ones."""
        if n > len(self.free):
            raise RuntimeError(f"block pool exhausted: need {n}, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.key[b] is not None:
                if self.by_key.get(self.key[b]) == b:
                    del self.by_key[self.key[b]]
                self.key[b], self.tokens[b] = None, None
            self.ref[b] = 1
            out.append(b)
        self.allocated += n
        return out

    def commit(self, block: int, parent_key: int | None, tokens) -> int:
        """Key a full block by its prefix; returns the key. An equal block already cached keeps
        its entry (this one stays private and unkeyed in the index)."""
        chunk = tuple(tokens)
        k = self.chain_key(parent_key, chunk)
        if self.key[block] is None and k not in self.by_key:
            self.by_key[k] = block
            self.key[block], self.tokens[block] = k, chunk
        return k

    def commit_full(self, table: list[int], keys: list[int], token_ids: list[int], upto: int,
                    root=None) -> None:
        """Key every block of `table` that is full once the first `upto` of `token_ids` are
        written, after the len(keys) already keyed; their keys are appended to `keys`. `root`
        names a separate prefix tree: blocks whose KV was computed another way (the batch-invariant
        prefill, INVARIANT) are found only by lookups from the same root."""
        bs = self.block_size
        for i in range(len(keys), upto // bs):
            keys.append(self.commit(table[i], keys[-1] if keys else root, token_ids[i * bs:(i + 1) * bs]))

    def forget_prefixes(self) -> None:
        """Drop every key: no cached prefix is hit again (after a step failed between keying its
        blocks and writing their KV). Blocks in use keep their references."""
        self.by_key.clear()
        self.key = [None] * self.num_blocks
        self.tokens = [None] * self.num_blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; in reverse so a prefix's tail is evicted first."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released twice"
            if self.ref[b] == 0:
                self.free[b] = None
                if self.key[b] is None:
                    self.free.move_to_end(b, last=False)
