"""The benches' baselines do the same work as ours: checks of the helpers they time.

(Here, not in bench/, so that `make test` runs them.)
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import bench_generate  # noqa: E402
import bench_prefill  # noqa: E402
import bench_train  # noqa: E402


def test_transformers_samples_as_the_engine_does(monkeypatch):
    """temperature 0.7 and top-p 0.9 only: no top-k, which transformers applies (50) unless told."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.generation import logits_process as lp

    warpers = []

    def spy(call):
        def __call__(self, input_ids, scores):  # the names transformers checks for
            warpers.append(type(self).__name__)
            return call(self, input_ids, scores)
        return __call__
    for cls in (lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.TemperatureLogitsWarper):
        monkeypatch.setattr(cls, "__call__", spy(cls.__call__))
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    tok = SimpleNamespace(eos_token_ids=[2], encode=lambda s, add_special_tokens: [5 + ord(c) % 50 for c in s])
    assert bench_generate.hf_generate(hf, tok, ["ab", "cde"], 2, 3, 4) == 2 * 2 * 3
    assert sorted(set(warpers)) == ["TemperatureLogitsWarper", "TopPLogitsWarper"]


@pytest.mark.slow  # the real SmolLM2 (as the bench runs it): a few seconds to load and generate
def test_batch1_prefills_the_whole_prompt_as_transformers_does():
    from srlm_engine.engine import LLM
    from srlm_engine.model.pull import pull

    llm = LLM(pull(), device="cpu", kv_cache_tokens=2048, max_num_seqs=4)
    hits, generate = [], llm.generate

    def spy(prompts, params, **kw):
        before = llm.pool.hit_tokens
        out = generate(prompts, params, **kw)
        hits.append(llm.pool.hit_tokens - before)
        return out
    llm.generate = spy
    hf = SimpleNamespace(device=torch.device("cpu"), generate=lambda ids, max_new_tokens, **kw: torch.cat(
        [ids, ids.new_zeros(ids.shape[0], max_new_tokens)], 1))
    bench_generate.batch1(llm, hf, 8)
    assert hits[-1] == 0  # the timed call: no prompt token from the warm-up's cache


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_train_tiny_steps_each_run_the_reference_model_once(impl):
    step, ref_model = bench_train._tiny_step(impl)
    calls = []
    ref_model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    step()
    step()
    assert len(calls) == 2


def test_the_prefill_baseline_computes_the_same_logits(tmp_path):
    """bench_prefill's per-sequence SDPA and the engine's invariant prefill agree to rounding on a
    tiny model, and the bench puts the engine's own prefill back afterwards."""
    sys.path.insert(0, str(Path(__file__).parent / "engine"))
    from enginekit import random_prompts, tiny_config, write_word_tokenizer

    from srlm_engine.engine import attention, model_runner
    from srlm_engine.engine.llm import LLM
    from srlm_engine.model.llama import Llama
    from srlm_engine.model.weights import save_model
    save_model(Llama(tiny_config()).init_weights(seed=0, std=0.3), tmp_path)
    write_word_tokenizer(tmp_path)
    engine = LLM(tmp_path, kv_cache_tokens=2048)
    ps = [list(range(2, 40)) + p for p in random_prompts(6, 1, 50, seed=1)]
    out = {}
    for v in ("invariant", "sdpa"):
        with bench_prefill.Variant(v):
            engine.pool.forget_prefixes()
            out[v] = engine.next_token_logprobs(ps)
    assert model_runner.MIN_ROWS == 16 and attention.PagedAttention._prefill is not bench_prefill.sdpa_prefill
    torch.testing.assert_close(out["invariant"], out["sdpa"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(out["invariant"], out["sdpa"])  # two computations, not one timed twice
