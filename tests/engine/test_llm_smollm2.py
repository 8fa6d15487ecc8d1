"""The engine on the real SmolLM2-135M-Instruct against transformers.

Slow: loads the 135M model twice (ours and transformers') and runs transformers' generate once
per prompt, unbatched, so that no padding changes its numerics."""
from __future__ import annotations

import pytest
import torch

from srlm_engine.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Hi!", "What is 2 + 2?", "Name three primary colors.",
    "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into French.", "What is the capital of Japan?",
    "Give me a tip for learning to cook.",
    "List the planets of the solar system in order from the sun, and say one fact about each.",
    "Why is the sky blue? Answer for a ten-year-old, in a short paragraph.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Suggest a name for a small bakery that sells bread and cakes in a seaside town.",
    "What are the pros and cons of working from home? Give two of each.",
    "Write a Python function that returns the factorial of n.",
    "Describe a cat to someone who has never seen one, using at most three sentences, and be kind.",
    "I have eggs, flour, milk and sugar. What can I make for breakfast, and how?",
]


@pytest.fixture(scope="module")
def model_dir():
    from srlm_engine.model.pull import pull
    return pull()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, device="cpu", kv_cache_tokens=8192)


def test_greedy_matches_transformers(llm, model_dir):
    from transformers import LlamaForCausalLM

    max_tokens = 24
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    eos = llm.tokenizer.eos_token_ids
    for q, o in zip(QUESTIONS, outs):
        ids = torch.tensor([o.prompt_token_ids])
        with torch.inference_mode():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        want = g[0, ids.shape[1]:].tolist()
        assert o.outputs[0].token_ids == want, q
        assert o.outputs[0].text == llm.tokenizer.decode(want)
    assert len({len(o.prompt_token_ids) for o in outs}) > 8  # the lengths really are mixed


def test_stop_string_and_judge_logprobs(llm):
    msgs = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    full = llm.chat([msgs], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert "5" in full.text
    cut = llm.chat([msgs], SamplingParams(temperature=0, max_tokens=64, stop=["5"]),
                   use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index("5")]
    # next-token log-probs reuse the cached prompt and agree with greedy's first token
    prompt = llm.tokenizer.apply_chat_template(msgs)
    before = llm.pool.hit_tokens
    lp = llm.next_token_logprobs([prompt, prompt + "1"])
    assert llm.pool.hit_tokens > before
    assert int(lp[0].argmax()) == full.token_ids[0]
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-4)
