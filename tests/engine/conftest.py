"""Fixtures for the engine tests: a tiny random Llama checkpoint with a word-level tokenizer."""
from __future__ import annotations

import os

# Spinning OpenMP barriers make small steps 3-4x slower on a shared 2-core machine; only takes
# effect if torch was not loaded yet (see bench/bench_generate.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import save_model

from enginekit import tiny_config, write_word_tokenizer


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
