"""Fixtures for the training tests: a tiny random Llama beside the real SmolLM2 tokenizer files
(vocab 49152, hidden 32, 2 layers: the fused kernel and chat template are the real ones, the
forward costs milliseconds), and short SFT / preference records."""
import json
import shutil
import socket
from pathlib import Path

import pytest

from srlm_engine.config import ModelConfig
from srlm_engine.model.llama import Llama
from srlm_engine.model.pull import pull
from srlm_engine.model.weights import save_model
from srlm_engine.train.checkpoint import TOKENIZER_FILES

DATA = Path(__file__).parent / "data"


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **kw})


def make_model_dir(path: Path, seed: int = 0, **kw) -> Path:
    save_model(Llama(tiny_config(**kw)).init_weights(seed), path)
    src = pull()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="session")
def sft_records():
    return read_jsonl(DATA / "sft_train.jsonl")


@pytest.fixture(scope="session")
def pair_records():
    return read_jsonl(DATA / "pairs.jsonl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
