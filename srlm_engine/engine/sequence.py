"""Sequence: one sample of one request, from its prompt to its finish reason.

The scheduler moves it between waiting and running and gives it KV blocks; the model runner reads
its tokens and block table; the LLM appends the sampled tokens and decides when it stops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import torch

from srlm_engine.engine.sampler import SamplingParams

_ids = count()


@dataclass(eq=False)
class Sequence:
    """One sample of one request: its tokens, its KV blocks and its output state."""
    request: int
    index: int
    token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator | None = None
    keep_logprobs: bool = False   # next_token_logprobs: keep the full row, sample nothing
    invariant: bool = False       # prefill by the batch-invariant path (attention.invariant_attention)
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_prompt: int = 0
    num_computed: int = 0         # tokens whose KV is in the cache (or written this step)
    num_shared: int = 0           # tokens in prefix-cache hit blocks (written already: slot -1)
    block_table: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # prefix keys of the full blocks committed
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float = 0.0
    # per generated token, {token id: (log-prob, rank)}: the top-k and the sampled token
    logprobs: list[dict[int, tuple[float, int]]] | None = None
    full_logprobs: torch.Tensor | None = None
    # incremental detokenization (only used when the request has stop strings)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_text_end: int | None = None

    def __post_init__(self):
        self.num_prompt = len(self.token_ids)
        self.prefix_offset = self.read_offset = self.num_prompt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]
