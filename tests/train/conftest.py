"""Fixtures for the training tests (helpers live in trainkit.py)."""
import pytest

from trainkit import DATA, make_model_dir, read_jsonl


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def sft_records():
    return read_jsonl(DATA / "sft_train.jsonl")


@pytest.fixture(scope="session")
def pair_records():
    return read_jsonl(DATA / "pairs.jsonl")
