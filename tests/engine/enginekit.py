"""Helpers shared by the engine tests: a word-level tokenizer, the tiny config, random prompts.
(Imported as `enginekit`, not from conftest: several test folders have a conftest.py.)"""
from __future__ import annotations

import json

import torch

from srlm_engine.config import ModelConfig

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


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (L,), generator=g).tolist() for L in lens]


BYTE_EOS = "<|eos|>"
BYTE_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|eos|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_byte_tokenizer(path, chat_template: str | None = BYTE_CHAT_TEMPLATE) -> int:
    """A byte-level tokenizer (ids 0..255: the 256 bytes, 256: <|eos|>), so any text encodes to
    real tokens and decodes back; returns its vocabulary size (257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": BYTE_EOS, "chat_template": chat_template}))
    return tok.get_vocab_size()
