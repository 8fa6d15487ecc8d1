"""Sampler: the filters against a per-row reference written from their definitions, the C++
sampling_stats op against its PyTorch reference, the candidate path against the whole-row path,
greedy rows, per-row generators, and the distribution of the draws."""
from __future__ import annotations

import math

import pytest
import torch

from srlm_engine.engine.sampler import (CAPACITY, Sampler, SamplingParams, candidate_floor, filter_logits,
                                        make_generator, sampling_stats, sampling_stats_reference)

try:
    import srlm_engine._C  # noqa: F401
    HAVE_OP = True
except ImportError:
    HAVE_OP = False


def reference_filter(row: list[float], t: float, k: int, p: float, mp: float) -> list[float]:
    """One row, by the definitions: scale by 1/t; keep the k largest; keep the smallest
    high-probability prefix with mass >= p; keep tokens with prob >= min_p * max prob."""
    x = [v / t for v in row]
    ninf = float("-inf")
    if 0 < k < len(x):
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


def test_top_k_beyond_the_candidates_renormalizes_before_top_p():
    # top_k = 300 lies between CANDIDATES (256) and V: top-p must see the distribution
    # renormalized over the 300 best tokens. Here the 256 best hold 90% of the whole mass, but
    # 0.8 + 0.08 = 0.88 of it is 90% of the top-300 mass, so only those two tokens are kept.
    V = 1000
    p = torch.empty(V)
    p[0], p[1], p[2] = 0.80, 0.08, 0.01
    p[250:300], p[300:] = 4.5e-5, 4e-5
    p[3:250] = (1 - p[0:3].sum() - p[250:].sum()) / 247
    logits = p.log()[None]
    got = filter_logits(logits, torch.tensor([1.0]), torch.tensor([300]), torch.tensor([0.9]), torch.tensor([0.0]))
    want = torch.tensor(reference_filter(logits[0].tolist(), 1.0, 300, 0.9, 0.0))
    assert torch.isinf(want).sum() == V - 2
    assert torch.equal(torch.isinf(got[0]), torch.isinf(want))
    draws = {Sampler()(logits, [SamplingParams(top_k=300, top_p=0.9)], [make_generator(s, 0)])[0][0]
             for s in range(200)}
    assert draws == {0, 1}


def test_greedy_rows_and_seeded_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=5),
          SamplingParams(temperature=0.8, seed=5)]
    gens = [None, make_generator(5, 0), make_generator(5, 1)]
    toks, lse = Sampler()(logits, ps, gens)
    assert toks[0] == int(logits[0].argmax())
    torch.testing.assert_close(logits - lse[:, None], logits.log_softmax(-1))
    # same seed and sample index -> same draw, whatever the other rows are
    again, _ = Sampler()(logits[1:2], ps[1:2], [make_generator(5, 0)])
    assert again[0] == toks[1]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 9e-6])
def test_temperatures_below_vllms_epsilon_are_greedy(temperature):
    # 1e-40 is a float32 subnormal: logits / 1e-40 overflow to inf and the draw was the last token
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 5
    ps = [SamplingParams(temperature=temperature, seed=1)] * 2
    toks, lse = Sampler()(logits, ps, [make_generator(1, 0), make_generator(1, 1)])
    assert toks == logits.argmax(-1).tolist()
    torch.testing.assert_close(logits - lse[:, None], logits.log_softmax(-1))


def test_draws_follow_the_filtered_distribution():
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


def _llm_like_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Peaked rows as a language model's: a few strong tokens over a long flat tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2
    strong = torch.randint(0, vocab, (rows, 8), generator=g)
    return x.scatter_add(1, strong, 12 + 6 * torch.rand(rows, 8, generator=g))


@pytest.mark.skipif(not HAVE_OP, reason="srlm_engine._C is not built")
@pytest.mark.parametrize("vocab", [1, 15, 17, 1000, 49152])
def test_sampling_stats_op_matches_reference(vocab):
    rows = 9
    x = _llm_like_logits(rows, vocab, vocab)
    x[0, : vocab // 2] = float("-inf")  # a row partly masked
    x[1] = x[1] * 0.01  # a flat row: past the capacity for the big vocabularies
    if vocab > 1:
        x[2, 1] = x[2].max()  # a tie at the maximum: the first index wins
    temp = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 1.0, 0.9, 0.3, 1.0])
    min_prob = torch.tensor([1e-5, 1e-6, 0.0, 1e-3, 1e-4, 0.5, 1.0, 1e-7, 0.2])
    capacity = 64
    got = torch.ops.srlm_C.sampling_stats(x, temp, min_prob, capacity)
    want = sampling_stats_reference(x, temp, min_prob, capacity)
    assert torch.equal(got[0], want[0])  # argmax, first index on ties
    torch.testing.assert_close(got[1], want[1])  # lse
    torch.testing.assert_close(got[2], want[2])  # lse at temperature
    count, want_count = got[5].tolist(), want[5].tolist()
    for r in range(rows):
        thr = float(want[2][r] + math.log(min_prob[r])) if min_prob[r] > 0 else math.inf
        near = ((x[r] / temp[r]) - thr).abs() < 1e-4 * max(1.0, abs(thr))  # may round either way
        if near.any():  # only the count may differ, by the tokens at the boundary
            assert abs(count[r] - want_count[r]) <= int(near.sum()) or -1 in (count[r], want_count[r])
            continue
        assert count[r] == want_count[r], r
        n = max(count[r], 0)
        assert torch.equal(got[3][r, :n], want[3][r, :n])  # the division is torch's: same bits
        assert torch.equal(got[4][r], want[4][r])
        assert torch.isinf(got[3][r, n:]).all()
    if vocab == 49152:
        assert count[1] == -1 and count[2] == 0 and count[6] == 0  # over capacity; off; none reaches 1


@pytest.mark.skipif(not HAVE_OP, reason="srlm_engine._C is not built")
@pytest.mark.parametrize("nan_at", [3, 18, 33])  # in a 16-wide vector, in the 20-wide row's tail, both
def test_sampling_stats_row_with_nan_is_nan(nan_at):
    # the op's comparisons must not skip the NaN: skipped, it gives a finite lse and another argmax than torch
    x = torch.zeros(2, 20 if nan_at < 20 else 40)
    x[0, 7] = 1.0
    x[0, nan_at] = float("nan")
    if nan_at == 33:
        x[0, 5] = float("nan")
    x[1] = torch.arange(x.shape[1]) * 0.1  # a sound row beside it keeps its statistics
    temp, min_prob = torch.tensor([0.7, 0.7]), torch.tensor([1e-3, 1e-3])
    got = torch.ops.srlm_C.sampling_stats(x, temp, min_prob, 8)
    want = sampling_stats_reference(x, temp, min_prob, 8)
    assert got[0].tolist() == want[0].tolist() == [5 if nan_at == 33 else nan_at, x.shape[1] - 1]
    assert got[1][0].isnan() and got[2][0].isnan() and got[5][0] == want[5][0] == 0
    torch.testing.assert_close(got[1][1], want[1][1])


@pytest.mark.skipif(not HAVE_OP, reason="srlm_engine._C is not built")
def test_sampling_stats_rejects_bad_input():
    x = torch.zeros(2, 5)
    op = torch.ops.srlm_C.sampling_stats
    with pytest.raises(RuntimeError, match="temperature\\[1\\] must be positive"):
        op(x, torch.tensor([1.0, 0.0]), torch.zeros(2), 4)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        op(x.double(), torch.ones(2), torch.zeros(2), 4)
    with pytest.raises(RuntimeError, match="min_prob must be \\[rows=2\\]"):
        op(x, torch.ones(2), torch.zeros(3), 4)
    with pytest.raises(RuntimeError, match="min_prob\\[0\\] must be in"):
        op(x, torch.ones(2), torch.tensor([2.0, 0.0]), 4)


@pytest.mark.parametrize("stats", ["op", "reference"])
@pytest.mark.parametrize("vocab", [1000, 49152])
def test_candidate_path_equals_whole_row_path(vocab, stats):
    """Top-p rows (with and without top-k and min-p) filter to the same tokens among their
    candidates as over the whole row, and the same uniform draws pick the same tokens; with the
    C++ op (CPU) and with the reference (the path of other devices)."""
    if stats == "op" and not HAVE_OP:
        pytest.skip("srlm_engine._C is not built")
    stats_fn = sampling_stats if stats == "op" else sampling_stats_reference
    cases = [(0.7, -1, 0.9, 0.0), (1.0, -1, 0.95, 0.0), (1.3, 5, 0.8, 0.0), (0.9, 4, 0.9, 0.05),
             (0.5, -1, 0.5, 0.0), (1.0, 1, 0.9, 0.0), (2.0, -1, 0.99, 0.1)]
    x = _llm_like_logits(len(cases), vocab, 7)
    ps = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp) for t, k, p, mp in cases]
    temp = torch.tensor([p.temperature for p in ps])
    floor = torch.tensor([candidate_floor(p, vocab) for p in ps])
    _, _, lse_t, vals, ids, count = stats_fn(x, temp, floor, CAPACITY)
    # the rows the Sampler sends to the candidate path (the others overflow CAPACITY at high temperature)
    fast = [i for i, (c, p) in enumerate(zip(count.tolist(), ps)) if c > 0 and p.top_k <= c]
    assert len(fast) >= (len(ps) if vocab == 1000 else 5)
    r = torch.tensor(fast)
    k, top_p, min_p = (torch.tensor([getattr(p, f) for p in ps]) for f in ("top_k", "top_p", "min_p"))
    full = filter_logits(x, temp, k, top_p.float(), min_p.float())
    for i, (t, kk, pp, mp) in enumerate(cases):  # the whole-row filter is the definition
        want = torch.tensor(reference_filter(x[i].tolist(), t, kk, pp, mp))
        assert torch.equal(torch.isinf(full[i]), torch.isinf(want)), cases[i]
    k, top_p, min_p = k[r], top_p[r].float(), min_p[r].float()
    for u in torch.linspace(0.001, 0.999, 37):
        uu = torch.full((len(fast),), float(u))
        got = Sampler._from_candidates(x, r, vals, ids, lse_t, temp, k, top_p, min_p, uu)
        want = Sampler._from_row(x, r, vals, ids, lse_t, temp, k, top_p, min_p, uu)
        for j, i in enumerate(fast):
            if got[j] != want[j]:  # allowed only where u falls on a boundary of the CDF (rounding)
                cdf = full[i].double().softmax(-1).cumsum(0)
                assert (cdf - float(u)).abs().min() < 1e-5, (cases[i], float(u))
            assert not torch.isinf(full[i, got[j]])  # a kept token


@pytest.mark.parametrize("field,value", [("stop", 5), ("stop", {"x": 1}), ("stop_token_ids", 5),
                                         ("stop_token_ids", "12")])
def test_stop_fields_of_the_wrong_type_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})
