"""PagedAttention (the engine's attend callable) against dense causal attention, on one step that
mixes decode rows, a fresh prefill and a prefill after a cached prefix, for every CPU backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srlm_engine.engine.attention import KVCache, PagedAttention, StepMetadata, select_backend

NH, NKV, HD, BS = 6, 2, 16, 4


def dense(q, k, v):
    """q [T, nh, hd], k/v [T, nkv, hd], causal -> [T, nh, hd] in float64."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    k, v = k.repeat_interleave(NH // NKV, 0), v.repeat_interleave(NH // NKV, 0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_step_matches_dense(backend):
    b = select_backend("cpu", backend)
    if b.name != backend:
        pytest.skip("srlm_engine._C is not built")
    g = torch.Generator().manual_seed(0)
    cache = KVCache(1, 32, BS, NKV, HD, torch.float32, "cpu")
    # three sequences: total lengths, tokens already cached, and their (scattered) blocks
    lens, cached = [9, 7, 11], [8, 0, 5]
    tables = [[5, 2, 30], [1, 17], [8, 9, 3]]
    q = [torch.randn(L, NH, HD, generator=g) for L in lens]
    k = [torch.randn(L, NKV, HD, generator=g) for L in lens]
    v = [torch.randn(L, NKV, HD, generator=g) for L in lens]
    slot = lambda s, p: tables[s][p // BS] * BS + p % BS  # noqa: E731
    for s in (0, 2):  # write the cached prefixes as an earlier step would have
        for p in range(cached[s]):
            cache.k[0].view(-1, NKV, HD)[slot(s, p)] = k[s][p]
            cache.v[0].view(-1, NKV, HD)[slot(s, p)] = v[s][p]
    # packed order: the decode row (seq 0) first, then the prefills (seqs 1, 2)
    new = [range(cached[s], lens[s]) for s in range(3)]
    width = max(map(len, tables))
    meta = StepMetadata(
        slot_mapping=torch.tensor([slot(s, p) for s in range(3) for p in new[s]]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32), num_decode=1,
        query_starts=[1, 1 + len(new[1])], query_lens=[len(new[1]), len(new[2])], ctx_lens=lens)
    attend = PagedAttention(b, cache, meta, HD ** -0.5)
    out = attend(0, *(torch.cat([t[s][cached[s]:] for s in range(3)]) for t in (q, k, v)))
    want = torch.cat([dense(q[s], k[s], v[s])[cached[s]:] for s in range(3)])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_batched_prefill_matches_per_sequence(tiny_dir, tiny_model):
    """The GPU backend's one-call prefill (forced on here, on CPU) gives the plain loop's tokens,
    with chunked prefill and prefix-cache hits in the same steps (sequences of ragged contexts)."""
    from srlm_engine.engine import LLM, SamplingParams

    from enginekit import EOS, random_prompts
    from greedy import greedy_generate

    shared = list(range(2, 50))
    prompts = random_prompts(9, 2, 40, seed=5) + [shared + [60, 61], shared + [70], shared]
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=4096, max_num_batched_tokens=64, attention_backend="torch")
    llm.runner.backend.batched_prefill = True
    calls = []
    orig = PagedAttention._prefill_batched
    PagedAttention._prefill_batched = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    finally:
        PagedAttention._prefill_batched = orig
    want = [greedy_generate(tiny_model, p, 12, eos_token_ids=[EOS]) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert calls and llm.pool.hit_tokens > 0
