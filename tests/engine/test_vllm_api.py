"""vLLM's offline API: a vLLM example run unchanged but for its import line, the LLM's vLLM
arguments, the output fields (Logprob, stop_reason, finished, request_id, prompt) and chat."""
from __future__ import annotations

import ast
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srlm_engine.device import default_device
from srlm_engine.engine import LLM, Logprob, SamplingParams
from greedy import greedy_generate
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import save_model
from srlm_engine.tokenizer import TokenizerError

from enginekit import EOS, random_prompts, tiny_config, write_byte_tokenizer

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    """A tiny random Llama at <tmp>/facebook/opt-125m, with a byte-level tokenizer and a chat
    template; 512 positions fit the example's chat prompt (one token per byte)."""
    root = tmp_path_factory.mktemp("vllm_example")
    path = root / "facebook" / "opt-125m"
    path.mkdir(parents=True)
    vocab = write_byte_tokenizer(path)
    save_model(Llama(tiny_config(vocab_size=vocab, max_position_embeddings=512)).init_weights(seed=0, std=0.3), path)
    return path


def _printed(out: str, label: str) -> list[str]:
    return [line.split(None, 1)[1] for line in out.splitlines() if line.startswith(label)]


def test_vllm_basic_example_runs_with_only_its_import_changed(byte_dir, monkeypatch, capsys):
    monkeypatch.chdir(byte_dir.parent.parent)  # LLM(model="facebook/opt-125m") is this checkpoint
    source = (HERE / "vllm_basic_example.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("from ", "import "))]
    assert imports == ["from srlm_engine import LLM, SamplingParams"]
    example = runpy.run_path(str(HERE / "vllm_basic_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    prompts = example["prompts"]
    assert [ast.literal_eval(p) for p in _printed(out, "Prompt:")] == prompts
    # what it printed is what the engine generates for the same calls (LLM's default seed)
    llm = LLM(model=str(byte_dir))
    want = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95), use_tqdm=False)
    assert [ast.literal_eval(t) for t in _printed(out, "Output:")] == [o.outputs[0].text for o in want]
    assert any(o.outputs[0].text for o in want)
    # the first token's log-prob is the model's log-softmax at the prompt's end
    firsts = _printed(out, "First:")
    assert len(firsts) == len(prompts)
    full = llm.next_token_logprobs(prompts)
    for prompt, line, row in zip(prompts, firsts, full):
        tok, lp, rank, word = line.split(" ", 3)
        tok = int(tok)
        assert float(lp) == pytest.approx(row[tok].item(), abs=1e-4)
        assert int((row > row[tok] + 1e-4).sum()) + 1 <= int(rank) <= int((row >= row[tok] - 1e-4).sum())
        assert ast.literal_eval(word) == llm.tokenizer.decode([tok], skip_special_tokens=False)
    # the chat's prompt is the conversation rendered by the checkpoint's template
    assert [ast.literal_eval(p) for p in _printed(out, "Chat:")] == [
        "<|system|>You are a helpful assistant<|eos|><|user|>Hello<|eos|>"
        "<|assistant|>Hello! How can I assist you today?<|eos|>"
        "<|user|>Write an essay about the importance of higher education.<|eos|><|assistant|>"]
    assert len(_printed(out, "Reply:")) == 1


def test_root_exports_load_without_torch_until_used():
    code = ("import sys, srlm_engine; assert 'torch' not in sys.modules, 'torch loaded eagerly'; "
            "from srlm_engine import LLM, SamplingParams, RequestOutput, CompletionOutput, Logprob; "
            "import srlm_engine.engine as e; assert LLM is e.LLM and Logprob is e.Logprob; "
            "import os; assert os.environ['OMP_WAIT_POLICY']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import srlm_engine
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        srlm_engine.NoSuchName


def test_vllm_constructor_arguments(tiny_dir):
    def weight_dtype(**kw):
        return LLM(model=tiny_dir, device="cpu", kv_cache_tokens=64, **kw).model.embed_tokens.weight.dtype

    # `auto` is fp32 on a CPU without native bf16 (tests/conftest.py pins SRLM_CPU_BF16=0)
    assert weight_dtype() == torch.float32 == weight_dtype(dtype="auto") == weight_dtype(dtype="float")
    assert weight_dtype(dtype="bfloat16") == torch.bfloat16 == weight_dtype(dtype=torch.bfloat16)
    assert weight_dtype(dtype="half") == torch.float16 == weight_dtype(dtype="float16")
    assert LLM(tiny_dir, kv_cache_tokens=64).device == default_device()  # the GPU where there is one
    with pytest.raises(ValueError, match="LLM: dtype must be one of auto, .* got 'fp8'"):
        LLM(tiny_dir, device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="dtype must be .* got torch.int8"):
        LLM(tiny_dir, device="cpu", dtype=torch.int8)
    with pytest.raises(TypeError, match="gpu_memory_utilization=0.9: the KV cache is sized in tokens: pass kv_"):
        LLM(tiny_dir, gpu_memory_utilization=0.9)
    with pytest.raises(TypeError, match="unsupported argument no_such_option=1"):
        LLM(tiny_dir, no_such_option=1)
    with pytest.raises(ValueError, match="trust_remote_code=True is refused"):
        LLM(tiny_dir, trust_remote_code=True)
    assert LLM(tiny_dir, device="cpu", kv_cache_tokens=64, trust_remote_code=False).max_model_len == 128
    with pytest.raises(ValueError, match=r"max_model_len must be an integer in 1\.\.128 .* got 129"):
        LLM(tiny_dir, device="cpu", max_model_len=129)


def test_max_model_len_caps_the_context(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=256, max_model_len=40)
    with pytest.raises(ValueError, match="request 0: prompt of 40 tokens does not fit the model's context of 40"):
        llm.generate([list(range(2, 42))], use_tqdm=False)
    o = llm.generate([list(range(2, 32))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) == 10 and o.finish_reason == "length" and o.stop_reason is None


def test_request_outputs_carry_vllms_fields(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    p = SamplingParams(temperature=0, max_tokens=4)
    outs = llm.generate(["w5 w6 w7", [8, 9, 10]], p, use_tqdm=False)
    assert [o.request_id for o in outs] == ["0", "1"] and all(o.finished for o in outs)
    assert outs[0].prompt == "w5 w6 w7" and outs[0].prompt_token_ids == [5, 6, 7]
    assert outs[1].prompt is None  # token ids given: no text, as vLLM
    assert all(c.finished() and c.logprobs is None for o in outs for c in o.outputs)


def test_chat_one_or_many_conversations_and_a_template(tiny_dir, tiny_model):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)  # its tokenizer has no chat template
    conv = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}]
    with pytest.raises(TokenizerError, match="this tokenizer has no chat_template"):
        llm.chat(conv, use_tqdm=False)
    template = "{% for m in messages %}{{ m.content }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}"
    p = SamplingParams(temperature=0, max_tokens=5)
    one = llm.chat(conv, p, use_tqdm=False, chat_template=template)
    assert len(one) == 1 and one[0].prompt == "w5 w6 w7 w9" and one[0].prompt_token_ids == [5, 6, 7, 9]
    assert one[0].outputs[0].token_ids == greedy_generate(tiny_model, [5, 6, 7, 9], 5, eos_token_ids=[EOS])
    many = llm.chat([conv, conv[:1]], p, use_tqdm=False, chat_template=template, add_generation_prompt=False)
    assert [o.prompt for o in many] == ["w5 w6 w7 ", "w5 w6 "] and [o.request_id for o in many] == ["0", "1"]
    with pytest.raises(TokenizerError, match="chat_template line 1: "):
        llm.chat(conv, use_tqdm=False, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="chat: conversation 1 must be a non-empty list"):
        llm.chat([conv, []], use_tqdm=False, chat_template=template)
    with pytest.raises(ValueError, match="chat: messages must be a conversation"):
        llm.chat([], use_tqdm=False)


def test_chat_renders_the_checkpoints_template(byte_dir):
    llm = LLM(byte_dir, device="cpu", kv_cache_tokens=1024)
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert out.prompt == "<|user|>hi<|eos|><|assistant|>"
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)


def test_logprobs_hold_the_top_k_and_the_sampled_tokens_rank(tiny_dir, tiny_model):
    """At temperature 2 most sampled tokens fall outside the top-1; each step's dict holds the
    top-1 (rank 1) and the sampled token with its rank in the model's own distribution."""
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    prompt = random_prompts(1, 8, 8, seed=3)[0]
    o = llm.generate([prompt], SamplingParams(temperature=2.0, max_tokens=12, logprobs=1, seed=5, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == 12
    outside = 0
    for j, (tok, d) in enumerate(zip(o.token_ids, o.logprobs)):
        with torch.no_grad():
            full = tiny_model(torch.tensor([prompt + o.token_ids[:j]]))[0, -1].log_softmax(-1)
        top = int(full.argmax())
        assert d[top].rank == 1 and d[top].logprob == pytest.approx(full[top].item(), abs=1e-4)
        assert set(d) == {top, tok} and isinstance(d[tok], Logprob)
        assert d[tok].logprob == pytest.approx(full[tok].item(), abs=1e-4)
        lp = full[tok].item()
        assert int((full > lp + 1e-4).sum()) + 1 <= d[tok].rank <= int((full >= lp - 1e-4).sum())
        outside += tok != top
    assert outside >= 3  # the ranks above 1 were checked, not only the top token's


def test_stop_reason_is_the_stop_string_or_token(tiny_dir):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    prompt = random_prompts(1, 10, 10, seed=11)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and full.stop_reason is None
    by_id = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[full.token_ids[2]],
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == full.token_ids[2]
    word = llm.tokenizer.decode([full.token_ids[4]])
    by_text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop=["nowhere", word],
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == word


def test_outputs_survive_the_data_parallel_round_trip(tiny_dir):
    from srlm_engine.engine.data_parallel import _from_dict, _to_dict

    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                   stop_token_ids=[3]), use_tqdm=False)[0]
    assert _from_dict(json.loads(json.dumps(_to_dict(out)))) == out
