"""The engine on a CUDA GPU (Triton paged attention, CUDA graphs for decode) against the plain
greedy loop on CPU, plus seeds, preemption and log-probs there; with graphs and eagerly."""
from __future__ import annotations

import pytest
import torch

from srlm_engine.engine import LLM, SamplingParams

from enginekit import EOS, random_prompts
from greedy import greedy_generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MODES = [pytest.param(False, id="cuda_graphs"), pytest.param(True, id="eager")]


def reference(model, prompts, max_tokens):
    return [greedy_generate(model, p, max_tokens, eos_token_ids=[EOS]) for p in prompts]


@pytest.mark.parametrize("eager", MODES)
def test_greedy_matches_plain_loop(tiny_dir, tiny_model, eager):
    # 37 sequences: the batch shrinks through 37, 36, ... as they stop, so decode steps replay
    # graphs of several padded sizes (48, 32, 24, ...) with padding rows each time.
    prompts = random_prompts(37, 1, 40, seed=3) + [list(range(2, 34))]
    llm = LLM(tiny_dir, device="cuda", dtype=torch.float32, kv_cache_tokens=4096, max_num_seqs=64, enforce_eager=eager)
    assert llm.runner.backend.name == "triton"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference(tiny_model, prompts, 24)
    steps = llm.stats()["cuda_graph_steps"]
    assert steps == 0 if eager else steps > 0
    assert len(llm.pool.free) == llm.pool.num_blocks


def test_graphs_equal_eager_sampling_and_seed_is_batch_independent(tiny_dir):
    target = list(range(5, 30))
    p = SamplingParams(n=4, temperature=0.7, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True, logprobs=2)
    graphs = LLM(tiny_dir, device="cuda", dtype=torch.float32, kv_cache_tokens=8192)
    eager = LLM(tiny_dir, device="cuda", dtype=torch.float32, kv_cache_tokens=8192, enforce_eager=True)
    alone = graphs.generate([target], p, use_tqdm=False)[0]
    others = random_prompts(31, 3, 50, seed=7)
    mixed = [SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=12)] * 31
    batch = graphs.generate(others[:13] + [target] + others[13:], mixed[:13] + [p] + mixed[13:],
                            use_tqdm=False)[13]
    plain = eager.generate([target], p, use_tqdm=False)[0]
    tokens = [c.token_ids for c in alone.outputs]
    assert len({tuple(t) for t in tokens}) > 1  # the 4 samples differ
    assert [c.token_ids for c in batch.outputs] == tokens
    assert [c.token_ids for c in plain.outputs] == tokens
    for a, b in zip(alone.outputs, plain.outputs):
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
        assert all(set(x) == set(y) for x, y in zip(a.logprobs, b.logprobs))
    assert graphs.stats()["cuda_graph_steps"] > 0


def test_preemption_keeps_outputs(tiny_dir, tiny_model):
    prompts = random_prompts(10, 1, 40, seed=1)
    llm = LLM(tiny_dir, device="cuda", dtype=torch.float32, kv_cache_tokens=80, max_num_batched_tokens=7,
              max_num_seqs=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference(tiny_model, prompts, 24)
    assert llm.stats()["preemptions"] > 0 and llm.stats()["cuda_graph_steps"] > 0


def test_next_token_logprobs_on_cpu(tiny_dir, tiny_model):
    llm = LLM(tiny_dir, device="cuda", dtype=torch.float32, kv_cache_tokens=1024)
    ps = random_prompts(5, 1, 30, seed=9)
    lp = llm.next_token_logprobs(ps)
    assert lp.device.type == "cpu" and lp.shape == (5, 256)
    with torch.no_grad():
        want = torch.stack([tiny_model(torch.tensor([p]))[0, -1].log_softmax(-1) for p in ps])
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)


def test_bf16_graphs_equal_bf16_eager(tiny_dir):
    """bf16 (the loop's generation dtype): graph replay computes what the eager step computes."""
    prompts = random_prompts(8, 5, 40, seed=4)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    a = LLM(tiny_dir, device="cuda", dtype=torch.bfloat16, kv_cache_tokens=2048, max_num_seqs=8)
    b = LLM(tiny_dir, device="cuda", dtype=torch.bfloat16, kv_cache_tokens=2048, max_num_seqs=8, enforce_eager=True)
    got = [o.outputs[0].token_ids for o in a.generate(prompts, p, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in b.generate(prompts, p, use_tqdm=False)]
    # 8 prompts, max_num_seqs 8: every decode step has 8 rows, the captured size: same shapes,
    # same kernels, so the same numbers.
    assert got == want

