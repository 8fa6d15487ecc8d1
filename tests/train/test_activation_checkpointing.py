"""Activation checkpointing modes (train/parallel.py): the same loss and gradients as none; what
each mode keeps for backward (the bytes the forward leaves allocated, from the profiler's memory
events) and what it recomputes (matmuls run in backward)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from srlm_engine.model.llama import Llama
from srlm_engine.train.losses import TokenLogprobs
from srlm_engine.train.parallel import Dist, parallelize
from trainkit import tiny_config

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in MATMULS
        return func(*args, **(kwargs or {}))


def run(mode, ids, tgt):
    """-> (per-token log-probs, grads by name, bytes kept for backward, matmuls in backward)."""
    torch.manual_seed(0)
    model = Llama(tiny_config(num_hidden_layers=3, intermediate_size=96)).init_weights(0).train()
    root = parallelize(TokenLogprobs(model), model.layers, Dist(), activation_checkpointing=mode)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        logp = root(ids, tgt)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())  # allocated minus freed
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # an uneven upstream gradient
    with CountMatmuls() as counter:
        (logp * weights).sum().backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in root.named_parameters()}
    return logp.detach(), grads, kept, counter.n


@pytest.fixture(scope="module")
def runs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (3, 37), generator=g)  # odd batch and length
    tgt = ids.roll(-1, 1)
    tgt[:, :5] = -100
    return {m: run(m, ids, tgt) for m in ("none", "selective", "full")}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_numbers_as_without(runs, mode):
    logp, grads, _, _ = runs[mode]
    logp0, grads0, _, _ = runs["none"]
    assert torch.equal(logp, logp0)
    assert grads.keys() == grads0.keys()
    for name in grads0:  # recomputed ops are the same ops on the same inputs: bit-identical
        assert torch.equal(grads[name], grads0[name]), name


def test_selective_keeps_less_and_recomputes_no_matmul(runs):
    _, _, kept_none, mm_none = runs["none"]
    _, _, kept_sel, mm_sel = runs["selective"]
    _, _, kept_full, mm_full = runs["full"]
    assert kept_full < kept_sel < 0.75 * kept_none
    assert mm_sel == mm_none  # backward's own matmuls only: q/k/v/o/gate/up cached, down_proj never rerun
    assert mm_full > mm_none  # whole blocks re-run their projections


def test_unknown_mode_is_an_error():
    model = Llama(tiny_config())
    with pytest.raises(ValueError, match="activation_checkpointing must be one of none, selective, full"):
        parallelize(TokenLogprobs(model), model.layers, Dist(), activation_checkpointing="blocks")
