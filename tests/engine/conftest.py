"""Fixtures for the engine tests: a tiny random Llama checkpoint with a word-level tokenizer."""
from __future__ import annotations

import json
import os

# Spinning OpenMP barriers make small steps 3-4x slower on a shared 2-core machine; only takes
# effect if torch was not loaded yet (see bench/bench_generate.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from srlm_engine.config import ModelConfig
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import save_model

VOCAB = 256
EOS = 1


def write_word_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """Token i is the word "w{i}"; id 1 is the eos "<eos>". Decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["<eos>"] = EOS
    del vocab[f"w{EOS}"]
    vocab["<unk>"] = 0
    del vocab["w0"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<eos>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": None}))


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 2-layer GQA Llama; std 0.3 makes its next-token distribution peaked enough that
    greedy argmax is not decided by float rounding."""
    path = tmp_path_factory.mktemp("tiny")
    save_model(Llama(tiny_config()).init_weights(seed=0, std=0.3), path)
    write_word_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from srlm_engine.model.weights import load_model
    return load_model(tiny_dir)


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]
