"""The engine on a tiny random Llama against the plain greedy loop (tests/greedy.py),
plus the scheduler's paths: chunked prefill, preemption, prefix sharing, seeds, bad input."""
from __future__ import annotations

import pytest
import torch

from srlm_engine.engine import LLM, SamplingParams

from enginekit import EOS, random_prompts
from greedy import greedy_generate


def reference(model, prompts, max_tokens):
    return [greedy_generate(model, p, max_tokens, eos_token_ids=[EOS]) for p in prompts]


@pytest.fixture(scope="module")
def prompts():
    # mixed lengths: shorter than a block, exact multiples of the block size, several blocks
    return random_prompts(10, 1, 40, seed=1) + [list(range(2, 18)), list(range(2, 34))]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_greedy_matches_plain_loop(tiny_dir, tiny_model, prompts, backend):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=2048, attention_backend=backend)
    if backend == "cpp" and llm.runner.backend.name != "cpp":
        pytest.skip("srlm_engine._C is not built")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    want = reference(tiny_model, prompts, 20)
    for o, w, p in zip(outs, want, prompts):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == w
        assert o.outputs[0].finish_reason == ("stop" if w[-1] == EOS else "length")


def test_chunked_prefill_and_preemption_keep_outputs(tiny_dir, tiny_model, prompts):
    want = reference(tiny_model, prompts, 24)
    # budget of 7 tokens chunks every prompt longer than 7; a pool of one max-length sequence
    # (40 + 24 tokens = 4 blocks of 16... plus slack) forces preemption by recompute
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=80, max_num_batched_tokens=7, max_num_seqs=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.stats()["preemptions"] > 0
    assert len(llm.pool.free) == llm.pool.num_blocks  # everything released at the end


def test_n_samples_share_prompt_blocks(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=4096)
    prompt = list(range(2, 2 + 16 * 3 + 5))  # 3 full blocks + 5 tokens
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    out = llm.generate([prompt], p, use_tqdm=False)[0]
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    # 3 shared full blocks once; each sample its own tail block (5 prompt + 8 new tokens < 16)
    assert llm.pool.allocated == 3 + 4
    assert llm.pool.hit_tokens == 3 * 48
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct samples


def test_seed_independent_of_batch(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=8192)
    target = list(range(5, 30))
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([target], p, use_tqdm=False)[0]
    others = random_prompts(31, 3, 50, seed=7)
    mixed = [SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=12)] * 31
    batch = llm.generate(others[:13] + [target] + others[13:], mixed[:13] + [p] + mixed[13:],
                         use_tqdm=False)[13]
    assert [c.token_ids for c in batch.outputs] == [c.token_ids for c in alone.outputs]
    assert [c.cumulative_logprob for c in batch.outputs] == pytest.approx(
        [c.cumulative_logprob for c in alone.outputs], abs=1e-4)


def test_prefix_cache_across_calls_and_eviction(tiny_dir, tiny_model):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=256)
    shared = list(range(2, 66))  # 4 full blocks
    a = llm.generate([shared + [70, 71]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    before = llm.pool.hit_tokens
    b = llm.generate([shared + [80]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert llm.pool.hit_tokens - before == 64
    assert b[0].outputs[0].token_ids == reference(tiny_model, [shared + [80]], 4)[0]
    assert a[0].outputs[0].token_ids == reference(tiny_model, [shared + [70, 71]], 4)[0]
    # a prompt that is exactly its cached blocks still runs its last token for the logits
    c = llm.generate([shared], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert c[0].outputs[0].token_ids == reference(tiny_model, [shared], 4)[0]
    # other prompts fill the small pool and evict the cached blocks; outputs stay right
    many = random_prompts(6, 30, 40, seed=5)
    outs = llm.generate(many, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference(tiny_model, many, 4)


def test_next_token_logprobs(tiny_dir, tiny_model):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    ps = random_prompts(5, 1, 30, seed=9)
    lp = llm.next_token_logprobs(ps)
    assert lp.shape == (5, 256) and lp.dtype == torch.float32
    with torch.no_grad():
        want = torch.stack([tiny_model(torch.tensor([p]))[0, -1].log_softmax(-1) for p in ps])
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    cols = [7, 0, 255, 7]  # some columns only (what the expected-score judge reads), in the order asked
    fresh = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)  # no cached prefixes: the same computation as `lp`'s
    assert torch.equal(fresh.next_token_logprobs(ps, token_ids=cols), lp[:, cols])


def test_logprobs_and_stops(tiny_dir, tiny_model):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    prompt = random_prompts(1, 10, 10, seed=11)[0]
    full = reference(tiny_model, [prompt], 12)[0]
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=3),
                     use_tqdm=False)[0].outputs[0]
    assert len(o.logprobs) == len(o.token_ids)
    for tok, d in zip(o.token_ids, o.logprobs):
        assert tok in d and len(d) == 3 and max(d, key=lambda t: d[t].logprob) == tok  # greedy: sampled is top-1
        assert sorted(x.rank for x in d.values()) == [1, 2, 3] and d[tok].rank == 1
        assert all(x.decoded_token == llm.tokenizer.decode([t]) for t, x in d.items())
    assert o.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(o.token_ids, o.logprobs)))
    assert o.stop_reason is None and o.finished()
    # stop token id: ends there, token kept in token_ids but not in the text (as vLLM), finish "stop"
    cut = full.index(full[3]) + 1
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[full[3]]),
                     use_tqdm=False)[0].outputs[0]
    assert o.token_ids == full[:cut] and o.finish_reason == "stop" and o.stop_reason == full[3]
    assert o.text == llm.tokenizer.decode(full[:cut - 1])
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[full[3]],
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert o.text == llm.tokenizer.decode(full[:cut])
    # stop string: the text is cut before it (word tokenizer: tokens decode to "w<id>" words)
    word = llm.tokenizer.decode([full[5]])
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[word]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == word and word not in o.text
    o2 = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[word],
                                               include_stop_str_in_output=True),
                      use_tqdm=False)[0].outputs[0]
    assert o2.text.endswith(word) and o2.text.startswith(o.text)
    # a stop string that never occurs: runs to max_tokens
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=["no such word"]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == ("stop" if EOS in full else "length") and o.token_ids == full


def test_max_tokens_capped_at_context(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)  # max_position_embeddings = 128
    o = llm.generate([list(range(2, 122))], SamplingParams(temperature=0, max_tokens=50,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert len(o.outputs[0].token_ids) == 8 and o.outputs[0].finish_reason == "length"


def test_bad_requests_raise_before_any_work(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=256)
    good = [2, 3, 4]
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        llm.generate([good, []], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        llm.generate([good, ""], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"request 2: prompt of 128 tokens .* context of 128"):
        llm.generate([good, good, list(range(2, 130))], use_tqdm=False)
    with pytest.raises(ValueError, match="request 0: token id 999"):
        llm.generate([[999]], use_tqdm=False)
    small = LLM(tiny_dir, device="cpu", kv_cache_tokens=64)
    with pytest.raises(ValueError, match="request 1: .*exceeds the KV cache of 64"):
        small.generate([good, list(range(2, 52))], SamplingParams(max_tokens=20), use_tqdm=False)
    for field, kw in [("max_tokens", dict(max_tokens=0)), ("n", dict(n=0)),
                      ("temperature", dict(temperature=-1)), ("top_p", dict(top_p=0)),
                      ("top_k", dict(top_k=-2)), ("min_p", dict(min_p=1.5)),
                      ("logprobs", dict(logprobs=-1)), ("stop", dict(stop=[""])),
                      ("seed", dict(seed=1.5))]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="request 0: SamplingParams.logprobs = 999 exceeds the vocabulary"):
        llm.generate([good], SamplingParams(max_tokens=2, logprobs=999), use_tqdm=False)
    assert llm.scheduler.has_work() is False and llm.pool.allocated == 0


def test_error_during_generation_names_request(tiny_dir, monkeypatch):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    import srlm_engine.engine.llm as mod

    def boom(seq, *a):
        if seq.request == 1:
            raise KeyError("detokenizer broke")
        return None

    monkeypatch.setattr(mod, "check_stop", boom)
    with pytest.raises(RuntimeError, match=r"request 1 \(sample 0\)"):
        llm.generate([[2, 3], [4, 5]], SamplingParams(max_tokens=3), use_tqdm=False)
    monkeypatch.undo()
    assert len(llm.pool.free) == llm.pool.num_blocks  # reset and usable again
    assert len(llm.generate([[2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs) == 1


def test_a_failed_step_leaves_no_stale_prefix(tiny_dir, monkeypatch):
    # blocks are keyed when scheduled, before the forward writes their KV; a step that fails in
    # between must not leave those keys for the next request with the same prefix to hit
    from srlm_engine.engine import attention

    prompt = random_prompts(1, 40, 40, seed=5)[0]  # two full 16-token blocks
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024).generate([prompt], p, use_tqdm=False)[0]
    want = want.outputs[0].token_ids
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    real = attention.PagedAttention.__call__

    def interrupted(self, layer, *args):
        if layer == 1:
            raise KeyboardInterrupt("Ctrl-C in the middle of a step")
        return real(self, layer, *args)

    monkeypatch.setattr(attention.PagedAttention, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], p, use_tqdm=False)
    monkeypatch.undo()
    assert len(llm.pool.free) == llm.pool.num_blocks and not llm.pool.by_key
    assert llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids == want
