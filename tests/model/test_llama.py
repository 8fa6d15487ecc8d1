"""Our Llama computes what transformers' LlamaForCausalLM computes on the same directory."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from srlm_engine.model.weights import load_config, load_model
from srlm_engine.tokenizer import Tokenizer

from greedy import greedy_generate


def reference_logits(path, ids):
    ref = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


def test_tiny_logits_match_transformers(tiny_checkpoint):
    path, written = tiny_checkpoint
    ours = load_model(path)
    ids = torch.randint(0, ours.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        assert torch.equal(got, written.eval()(ids)), "loading changed the weights"
    want = reference_logits(path, ids)
    assert got.shape == (3, 37, ours.config.vocab_size)
    assert (got - want).abs().max().item() < 1e-4


def test_checkpoint_saved_sharded_by_transformers(tmp_path):
    cfg = LlamaConfig(vocab_size=91, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                      num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
                      rope_theta=50000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path)
    ids = torch.randint(0, 91, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids)
    assert (got - reference_logits(tmp_path, ids)).abs().max().item() < 1e-4


def test_bf16_load_casts_every_tensor(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # rotary angles stay fp32, as in transformers


@pytest.mark.slow  # loads the real 135M model twice (ours and transformers): ~10 s
def test_smollm2_logits_match_transformers_on_long_prompt(smollm2_dir):
    # The q/k row permutation only shows at longer range: rotary pairs mixed up still agree at
    # position 0, so the prompt is well over 200 tokens.
    tok = Tokenizer.from_pretrained(smollm2_dir)
    text = ("Paris, the capital of France, has been a centre of finance, diplomacy, commerce, "
            "fashion and science for centuries. Its 2,165,423 residents (2019) live in 105.4 km2. ") * 8
    ids = torch.tensor([tok.encode(text)])
    assert ids.shape[1] >= 200
    ours = load_model(smollm2_dir)
    assert load_config(smollm2_dir).rope_theta == 100000.0
    with torch.no_grad():
        got = ours(ids)
    assert (got - reference_logits(smollm2_dir, ids)).abs().max().item() < 1e-4


@pytest.mark.slow  # real model greedy decoding without a cache: a few seconds
def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    tok = Tokenizer.from_pretrained(smollm2_dir)
    model = load_model(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = greedy_generate(model, tok.encode(prompt, add_special_tokens=False), 24, tok.eos_token_ids)
    assert "Paris" in tok.decode(out)
