"""Judge-vs-human metrics: rank correlations equal scipy's on random score tables, and the
table's other metrics on hand-made cases."""
import math
import random

import pytest

from srlm_engine.evaluate import (format_table, judge_vs_human, kendall_tau_b, rankdata,
                                  spearman)

stats = pytest.importorskip("scipy.stats")


def random_table(rng, n_items, judge_values):
    human, judge = [], []
    for _ in range(n_items):
        k = rng.randint(2, 6)
        human.append([rng.randint(0, 5) for _ in range(k)])
        judge.append([rng.choice(judge_values) for _ in range(k)])
    return human, judge


@pytest.mark.parametrize("judge_values", [list(range(6)), [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2],
                                          [2.5, 2.5, 3.0]])
def test_correlations_equal_scipy(judge_values):
    rng = random.Random(len(judge_values))
    human, judge = random_table(rng, 150, judge_values)
    rhos, taus, constant = [], [], 0
    for h, j in zip(human, judge):
        assert rankdata(j) == list(stats.rankdata(j))
        want_rho = stats.spearmanr(h, j).statistic if len(set(h)) > 1 and len(set(j)) > 1 else math.nan
        want_tau = stats.kendalltau(h, j).statistic if len(set(h)) > 1 and len(set(j)) > 1 else math.nan
        got_rho, got_tau = spearman(h, j), kendall_tau_b(h, j)
        if math.isnan(want_rho):
            assert math.isnan(got_rho) and math.isnan(got_tau)
            constant += 1
            continue
        assert got_rho == pytest.approx(want_rho, abs=1e-12)
        assert got_tau == pytest.approx(want_tau, abs=1e-12)
        rhos.append(want_rho)
        taus.append(want_tau)
    m = judge_vs_human(human, judge)
    assert m.n_constant == constant and m.n_correlated == len(rhos) and constant > 0
    assert m.spearman == pytest.approx(sum(rhos) / len(rhos), abs=1e-12)
    assert m.kendall_tau == pytest.approx(sum(taus) / len(taus), abs=1e-12)


def test_scipy_gives_nan_on_constant_input():
    # the skip rule mirrors scipy: a constant side makes both statistics undefined
    with pytest.warns(Warning):
        assert math.isnan(stats.spearmanr([1, 2, 3], [4, 4, 4]).statistic)
    assert math.isnan(stats.kendalltau([1, 2, 3], [4, 4, 4]).statistic)
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4])) and math.isnan(kendall_tau_b([4, 4], [1, 2]))


def test_table_metrics_hand_made():
    human = [[5, 4, 3],   # judge agrees perfectly
             [5, 3, 3],   # judge ties the human-different pair (5 vs 3): wrong; equal pair not counted
             [5, 4]]      # judge reverses; judge gave no score to the best one
    judge = [[5.0, 3.0, 1.0],
             [4.0, 4.0, 2.0],
             [None, 4.67]]
    m = judge_vs_human(human, judge)
    # pairs: item 0 -> 3 right; item 1 -> (0,1) tie wrong, (0,2) right; item 2 -> (0,1) wrong
    assert m.n_pairs == 6 and m.pairwise_accuracy == pytest.approx(4 / 6)
    # 5-best: item 0 (5.0) only; item 1's best got 4.0, item 2's best is unscored
    assert m.five_best == pytest.approx(1 / 3)
    # exact match: item 0 only (item 1 ties differ: human ties 1,2, judge ties 0,1)
    assert m.exact_match == pytest.approx(1 / 3)
    assert m.n_unscored == 1 and m.n_constant == 0 and m.n_instructions == 3
    assert m.spearman == pytest.approx((1.0 + 0.5 - 1.0) / 3)


def test_five_threshold_and_exact_match_with_ties():
    m = judge_vs_human([[5, 2], [5, 2], [3, 3]], [[4.5, 1], [4.33, 1], [2, 2]])
    assert m.five_best == pytest.approx(1 / 3)   # 4.5 counts, 4.33 does not; [3,3]: 2 < 4.5
    assert m.exact_match == 1.0                           # equal stays equal counts as a match
    assert m.n_constant == 1 and m.n_correlated == 2
    assert judge_vs_human([[5, 2]], [[5, 1]], five=5.0).five_best == 1.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="instruction 0"):
        judge_vs_human([[5, 4]], [[1.0]])
    with pytest.raises(ValueError, match="at least 2"):
        judge_vs_human([[5]], [[1.0]])
    with pytest.raises(ValueError):
        judge_vs_human([[5, 4]], [])


def test_format_table():
    a = judge_vs_human([[5, 4, 3]], [[5, 4, 3]])
    b = judge_vs_human([[5, 4, 3]], [[1, 2, 3]])
    t = format_table({"SFT baseline": b, "M1": a})
    lines = t.strip().splitlines()
    assert lines[0] == "| | SFT baseline | M1 |"
    assert "| pairwise accuracy | 0.0 | 100.0 |" in lines
    assert "| 5-best % | 0.0 | 100.0 |" in lines
    assert "| Spearman | -1.000 | 1.000 |" in lines
    assert "| Kendall tau | -1.000 | 1.000 |" in lines
    assert "| instructions | 1 | 1 |" in lines


def test_a_judge_that_scored_nothing_measures_nothing():
    # a raw model's sampled judge, 0% of its answers parsed: n/a everywhere, never "pairwise accuracy 0.0"
    m = judge_vs_human([[5, 4, 3], [2, 1]], [[None, None, None], [None, None]])
    assert all(math.isnan(getattr(m, k)) for k in ("pairwise_accuracy", "five_best", "exact_match", "spearman",
                                                       "kendall_tau"))
    assert (m.n_unscored, m.n_instructions, m.n_pairs) == (5, 2, 4)
    assert "| pairwise accuracy | n/a |" in format_table({"M0": m})
    # one scored response is something to measure: the unscored rank below it
    assert judge_vs_human([[5, 4]], [[None, 2.0]]).pairwise_accuracy == 0.0


def test_length_rule_against_a_hand_computed_value():
    from srlm_engine.evaluate import length_rule
    items = [{"instruction": "q1", "responses": ["a" * 50, "a" * 10, "a" * 30], "scores": [5, 1, 3]},
             {"instruction": "q2", "responses": ["bb", "b" * 40, "b" * 40], "scores": [4, 0, 2]}]
    m = length_rule(items)
    # q1: lengths order the scores exactly -> 3 of 3 pairs; q2: (0,1) longer is worse: wrong,
    # (0,2) wrong, (1,2) a length tie on different scores: wrong -> 0 of 3. Pooled: 3 / 6.
    assert m.n_pairs == 6 and m.pairwise_accuracy == 0.5
    assert m.spearman == pytest.approx((1.0 + -0.8660254037844387) / 2)
    assert m.exact_match == 0.5 and m.n_unscored == 0
    assert math.isnan(m.five_best)  # a length is on no score scale
