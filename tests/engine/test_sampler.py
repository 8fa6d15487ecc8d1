"""Sampler: the filters against a per-row reference written from their definitions, greedy rows,
per-row generators, and the distribution of the exponential race."""
from __future__ import annotations

import math

import pytest
import torch

from srlm_engine.engine.sampler import Sampler, SamplingParams, filter_logits, make_generator


def reference_filter(row: list[float], t: float, k: int, p: float, mp: float) -> list[float]:
    """One row, by the definitions: scale by 1/t; keep the k largest; keep the smallest
    high-probability prefix with mass >= p; keep tokens with prob >= min_p * max prob."""
    x = [v / t for v in row]
    ninf = float("-inf")
    if k > 0:
        kth = sorted(x, reverse=True)[k - 1]
        x = [v if v >= kth else ninf for v in x]
    if p < 1:
        m = max(x)
        z = sum(math.exp(v - m) for v in x)
        order = sorted(range(len(x)), key=lambda i: -x[i])
        mass, keep = 0.0, set()
        for i in order:
            if mass >= p:
                break
            keep.add(i)
            mass += math.exp(x[i] - m) / z
        x = [v if i in keep else ninf for i, v in enumerate(x)]
    if mp > 0:
        m = max(x)
        z = sum(math.exp(v - m) for v in x)
        probs = [math.exp(v - m) / z for v in x]
        top = max(probs)
        x = [v if probs[i] >= mp * top else ninf for i, v in enumerate(x)]
    return x


CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, -1, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, -1, 0.9, 0.0), (0.5, -1, 1.0, 0.1),
    (1.0, 3, 0.5, 0.0), (0.9, 10, 0.8, 0.05), (2.0, 1, 1.0, 0.0), (1.0, -1, 0.05, 0.0),
]


@pytest.mark.parametrize("vocab", [37, 1000])
def test_filters_match_reference(vocab):
    # vocab 1000 > CANDIDATES (256): peaked rows take the candidate path, flat rows (scaled
    # down) hold under top_p of the mass in their best 256 and take the full sort
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([4.0, 0.05] * (len(CASES) // 2))[:, None]
    logits = torch.randn(len(CASES), vocab, generator=g) * scale
    t, k, p, mp = (torch.tensor(c) for c in zip(*CASES))
    got = filter_logits(logits, t.float(), k.long(), p.float(), mp.float())
    for i, (ti, ki, pi, mpi) in enumerate(CASES):
        want = torch.tensor(reference_filter(logits[i].tolist(), ti, ki, pi, mpi))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), CASES[i]
        keep = ~torch.isinf(want)
        torch.testing.assert_close(got[i][keep], want[keep])


def test_greedy_rows_and_seeded_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=5),
          SamplingParams(temperature=0.8, seed=5)]
    gens = [None, make_generator(5, 0), make_generator(5, 1)]
    toks, lp = Sampler()(logits, ps, gens)
    assert toks[0] == int(logits[0].argmax())
    torch.testing.assert_close(lp, logits.log_softmax(-1))
    # same seed and sample index -> same draw, whatever the other rows are
    again, _ = Sampler()(logits[1:2], ps[1:2], [make_generator(5, 0)])
    assert again[0] == toks[1]


def test_exponential_race_samples_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = SamplingParams(temperature=0.7, top_k=3)
    g = make_generator(11, 0)
    n = 4000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[Sampler()(logits, [p], [g])[0][0]] += 1
    want = filter_logits(logits, torch.tensor([0.7]), torch.tensor([3]), torch.tensor([1.0]),
                         torch.tensor([0.0])).softmax(-1)[0]
    assert counts[3:].sum() == 0  # filtered out by top-k
    # binomial standard error at n=4000 is under 0.008; 0.03 is about four of them
    torch.testing.assert_close(counts / n, want, atol=0.03, rtol=0)
