"""next_token_logprobs is batch-invariant on the CPU: a prompt's logits are the same bits however
it was computed (alone, in a batch, chunked, from a cached prefix, on 1 or 2 threads). This is what
makes the loop's expected-score judgments byte-identical for any number of data-parallel ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srlm_engine.engine.attention import invariant_attention
from srlm_engine.engine.llm import LLM

from enginekit import random_prompts


def _sdpa(q, k, v, scale):
    o = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                       v.float().transpose(0, 1)[None], is_causal=True, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (4, 4, 24), (6, 2, 17)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_invariant_attention_matches_sdpa(nh, nkv, hd, dtype, tol):
    g = torch.Generator().manual_seed(nh + hd)
    L = 301  # not a multiple of the key block or the row quantum
    q, k, v = (torch.randn(L, h, hd, generator=g).to(dtype) for h in (nh, nkv, nkv))
    out = invariant_attention(q, k, v, 0.3)
    assert out.dtype == dtype and out.shape == (L, nh, hd)
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, 0.3), atol=tol, rtol=tol)
    # the last n queries of a context: the rows of the full computation
    torch.testing.assert_close(invariant_attention(q[-7:], k, v, 0.3).float(), _sdpa(q, k, v, 0.3)[-7:],
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_attention_rows_do_not_depend_on_the_split(dtype):
    g = torch.Generator().manual_seed(0)
    L = 700
    q, k, v = (torch.randn(L, h, 64, generator=g).to(dtype) for h in (9, 3, 3))
    full = invariant_attention(q, k, v, 0.125)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for ctx, n in ((700, 1), (700, 5), (650, 650), (129, 3), (128, 128), (1, 1), (300, 17), (513, 400)):
                assert torch.equal(invariant_attention(q[ctx - n:ctx], k[:ctx], v[:ctx], 0.125), full[ctx - n:ctx]), \
                    (t, ctx, n)
    finally:
        torch.set_num_threads(threads)


def test_next_token_logprobs_are_the_same_bits_in_any_batch(tiny_dir):
    """Alone, in a batch, from the prefix cache, chunked by a small token budget, on one thread."""
    shared = list(range(2, 50))
    ps = [shared + p for p in random_prompts(9, 1, 70, seed=3)]
    cols = list(range(12))
    alone = []
    llm = LLM(tiny_dir, kv_cache_tokens=4096)
    for p in ps:
        llm.pool.forget_prefixes()
        alone.append(llm.next_token_logprobs([p], token_ids=cols)[0])
    alone = torch.stack(alone)
    llm.pool.forget_prefixes()
    assert torch.equal(llm.next_token_logprobs(ps, token_ids=cols), alone)
    assert llm.pool.hit_tokens > 0  # the batch reused the shared prefix
    assert torch.equal(llm.next_token_logprobs(ps[::-1], token_ids=cols).flip(0), alone)  # all cached
    chunked = LLM(tiny_dir, kv_cache_tokens=4096, max_num_batched_tokens=37, num_threads=1)
    assert torch.equal(chunked.next_token_logprobs(ps[4:], token_ids=cols), alone[4:])


def test_invariant_prefixes_are_a_tree_of_their_own(tiny_dir):
    """KV that generate() computed (SDPA prefill) is never reused by next_token_logprobs, nor the reverse."""
    from srlm_engine.engine.sampler import SamplingParams
    llm = LLM(tiny_dir, kv_cache_tokens=4096)
    p = list(range(2, 60))
    llm.generate([p], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    hits = llm.pool.hit_tokens
    llm.next_token_logprobs([p])
    assert llm.pool.hit_tokens == hits  # generate's blocks are not in its tree
    llm.next_token_logprobs([p])
    assert llm.pool.hit_tokens > hits  # its own are
    fresh = LLM(tiny_dir, kv_cache_tokens=4096)
    fresh.next_token_logprobs([p])
    fresh.generate([p], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert fresh.pool.hit_tokens == 0  # next_token_logprobs' blocks are not in generate's tree
    fresh.generate([p], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert fresh.pool.hit_tokens == 48  # its own are: the prompt's 3 full blocks
