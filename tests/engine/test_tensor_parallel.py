"""Tensor-parallel generation (engine/tensor_parallel.py): k ranks over gloo on localhost against
one process, on the tiny random checkpoints of tests/conftest.py, fp32.

The row-parallel sums add the ranks' partials in another order than one process does, so the
logits differ by float rounding (log-probabilities by up to ~1e-6 here) while the greedy top-2
gaps of these models are 4e-3 or more: tokens, greedy and sampled, come out the same.
Across the ranks of a group the logits are all-gathered, so there they are equal bit for bit.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from srlm_engine.engine import LLM
from srlm_engine.engine import tensor_parallel as tp
from srlm_engine.model import weights
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import load_config, load_state_dict, load_state_dict_slices, save_model

from enginekit import write_word_tokenizer
from tp_worker import holdings, run_requests

WORKER = Path(__file__).with_name("tp_worker.py")
TWO_KV_HEADS = ["gqa_untied", "llama3_rope", "head_dim_bias", "mha_tied"]  # mha_tied: 4 kv heads, tied


def checkpoint(path: Path, name: str, tiny_writer) -> str:
    tiny_writer(path, name)
    write_word_tokenizer(path, load_config(path).vocab_size)
    return str(path)


def prompts_for(seed: int, vocab: int = 77) -> list[list[int]]:
    """Prompts of 1 to 40 tokens: within one block, a full block, several blocks."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (1, 5, 16, 23, 40)]


def launch(nproc: int, spec: dict, tmp: Path) -> list[dict]:
    """Run tp_worker.py in `nproc` processes under torch.distributed.run; each rank's result."""
    (tmp / "spec.json").write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                        "--master-addr", "127.0.0.1", "--master-port", str(port), str(WORKER),
                        str(tmp / "spec.json"), str(tmp)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads((tmp / f"rank{i}.json").read_text()) for i in range(nproc)]


def assert_same_outputs(got: dict, want: dict) -> None:
    """Tokens and finish reasons equal; log-probabilities equal to float rounding."""
    for kind in ("greedy", "sampled", "unseeded"):
        for g_req, w_req in zip(got[kind], want[kind], strict=True):
            assert [c[:2] for c in g_req] == [list(c[:2]) for c in w_req], kind
            assert [c[2] for c in g_req] == pytest.approx([c[2] for c in w_req], abs=1e-4), kind
    assert torch.allclose(torch.tensor(got["next_token_logprobs"]), torch.tensor(want["next_token_logprobs"]),
                          atol=1e-5)


def reference(model_dir: str, prompts, seed: int) -> dict:
    """One process, the same calls as each rank makes (LLM's seed: its group's rank 0's)."""
    llm = LLM(model_dir, device="cpu", num_threads=1, kv_cache_tokens=1024, seed=seed)
    return {**json.loads(json.dumps(run_requests(llm, prompts))), **holdings(llm)}


# ---------------------------------------------------------------- one process

def test_shards_cover_every_row_once():
    for n, k in ((96, 2), (97, 2), (77, 4), (5, 3)):
        parts = [tp.split(n, k, r) for r in range(k)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1
    # vocabulary: equal slices of ceil(V / k) rows, the last one padded
    assert [tp.vocab_split(101, 2, r) for r in range(2)] == [(0, 51, 51), (51, 101, 51)]
    assert [tp.vocab_split(77, 4, r) for r in range(4)] == [(0, 20, 20), (20, 40, 20), (40, 60, 20), (60, 77, 20)]


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied", "head_dim_bias", "sharded"])
def test_each_rank_reads_only_its_slices(name, tmp_path, tiny_writer, monkeypatch):
    """Rank slices put back together are the whole checkpoint; only the tensors every rank holds
    whole (norms, row-parallel biases) are read whole."""
    if name == "sharded":
        tiny_writer(tmp_path, "head_dim_bias", max_shard_bytes=20_000)
    else:
        tiny_writer(tmp_path, name)
    cfg, k = load_config(tmp_path), 2
    whole = load_state_dict(tmp_path, cfg, torch.float32)
    read_whole = []
    real_read = weights._read

    def spy(f, hf, index, dtype, device):
        if index is None:
            read_whole.append(hf)
        return real_read(f, hf, index, dtype, device)

    monkeypatch.setattr(weights, "_read", spy)
    ranks = [load_state_dict_slices(tmp_path, cfg, tp.shard_slices(cfg, k, r), torch.float32) for r in range(k)]
    assert all(n.endswith(("norm.weight", "o_proj.bias", "down_proj.bias")) for n in read_whole)
    for key, t in whole.items():
        index = tp.shard_slices(cfg, k, 0).get(key)
        if index is None:
            assert all(torch.equal(sd[key], t) for sd in ranks), key
        else:
            assert torch.equal(torch.cat([sd[key] for sd in ranks], dim=len(index) - 1), t), key
            assert ranks[0][key].numel() < t.numel()


def test_refused_where_the_size_does_not_divide_the_heads(tmp_path, tiny_writer):
    # checked from config.json before any process group is needed
    two = checkpoint(tmp_path / "two", "gqa_untied", tiny_writer)  # 6 heads, 2 kv heads
    with pytest.raises(ValueError, match="tensor_parallel_size 4 does not divide num_key_value_heads 2"):
        LLM(two, tensor_parallel_size=4)
    three = tmp_path / "three"
    cfg = replace(load_config(two), num_key_value_heads=3)
    save_model(Llama(cfg).init_weights(0), three)
    write_word_tokenizer(three, cfg.vocab_size)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide num_key_value_heads 3"):
        LLM(three, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(two, tensor_parallel_size=0)


def test_needs_an_initialized_process_group(tmp_path, tiny_writer):
    with pytest.raises(RuntimeError, match="tensor_parallel_size 2 needs an initialized torch.distributed"):
        LLM(checkpoint(tmp_path, "gqa_untied", tiny_writer), tensor_parallel_size=2)


# ---------------------------------------------------------------- several processes

@pytest.mark.slow
def test_two_ranks_generate_what_one_process_does(tmp_path, tiny_writer):
    """Slow: starts 2 fresh Python processes (torch import, gloo group), ~15 s on 2 cores."""
    models = {name: checkpoint(tmp_path / name, name, tiny_writer) for name in TWO_KV_HEADS}
    prompts = prompts_for(0)
    ranks = launch(2, {"tp": 2, "models": models, "prompts": [prompts], "refuse": []}, tmp_path)
    for name, model_dir in models.items():
        a, b = ranks[0]["models"][name], ranks[1]["models"][name]
        # the same logits bit for bit on both ranks: equal samples and log-probabilities, exactly
        for kind in ("greedy", "sampled", "unseeded", "next_token_logprobs"):
            assert a[kind] == b[kind], (name, kind)
        # the ranks were built with seeds 0 and 1: both took rank 0's for the unseeded requests
        want = reference(model_dir, prompts, seed=0)
        assert_same_outputs(a, want)

        # what each rank holds: its heads, its slice of the vocabulary, about half the bytes
        cfg, hd = load_config(model_dir), load_config(model_dir).head_dim
        shapes, H = a["shapes"], cfg.hidden_size
        assert shapes["layers.0.self_attn.q_proj.weight"] == [cfg.num_attention_heads // 2 * hd, H]
        assert shapes["layers.0.self_attn.k_proj.weight"] == [cfg.num_key_value_heads // 2 * hd, H]
        assert shapes["layers.0.self_attn.o_proj.linear.weight"] == [H, cfg.num_attention_heads // 2 * hd]
        assert shapes["layers.0.mlp.down_proj.linear.weight"] == [H, cfg.intermediate_size // 2]
        assert shapes["embed_tokens.weight"] == [-(-cfg.vocab_size // 2), H]
        assert a["kv_cache_shape"][2] == b["kv_cache_shape"][2] == cfg.num_key_value_heads // 2
        # together the ranks hold the model once, plus what each holds whole (norms, row-parallel
        # biases) a second time and the padding row of an odd vocabulary (fp32: 4 bytes a number)
        L, bias = cfg.num_hidden_layers, cfg.attention_bias + cfg.mlp_bias
        whole = ((2 * L + 1) * H + L * bias * H) * 4
        pad = (2 * -(-cfg.vocab_size // 2) - cfg.vocab_size) * H * 4 * (1 if cfg.tie_word_embeddings else 2)
        assert a["param_bytes"] + b["param_bytes"] == want["param_bytes"] + whole + pad
        assert a["param_bytes"] < 0.55 * want["param_bytes"]
        # the CPU fast paths apply to the shards as to the whole model
        assert a["backend"] == want["backend"]
        assert a["small_batch_linears"] == want["small_batch_linears"]


@pytest.mark.slow
def test_two_replicas_of_two_ranks_generate_what_one_process_does(tmp_path, tiny_writer):
    """4 processes, 2 tensor-parallel groups of 2 (dist.new_group), each serving its own prompts.
    Slow: 4 fresh Python processes on 2 cores, ~15 s."""
    models = {name: checkpoint(tmp_path / name, name, tiny_writer) for name in ("gqa_untied", "head_dim_bias")}
    prompts = [prompts_for(1), prompts_for(2)]
    refuse = [[models["gqa_untied"], 4],  # 4 ranks, 2 kv heads
              [models["head_dim_bias"], 2]]  # 2 is not the default group's 4 ranks
    ranks = launch(4, {"tp": 2, "models": models, "prompts": prompts, "refuse": refuse}, tmp_path)
    for name, model_dir in models.items():
        for replica in (0, 1):
            a, b = (ranks[2 * replica + i]["models"][name] for i in (0, 1))
            assert a["next_token_logprobs"] == b["next_token_logprobs"]
            assert_same_outputs(a, reference(model_dir, prompts[replica], seed=2 * replica))
    for r in ranks:
        assert "tensor_parallel_size 4 does not divide num_key_value_heads 2" in r["refused"][0]
        assert "tensor_parallel_size is 2 but the default process group has 4 ranks" in r["refused"][1]
