"""Pair selection: best vs worst, ties and unscored handled, length control."""
import math

import pytest

from srlm_engine.data import check_pair
from srlm_engine.pairs import build_pairs


def select_pairs(prompt, candidates, scores, length_control=False):
    """The pair build_pairs makes of one prompt's candidates, or None."""
    pairs, counts = build_pairs([prompt], [candidates], [scores], length_control=length_control)
    assert sum(counts.values()) == 1 and len(pairs) == counts["pairs"]
    return pairs[0] if pairs else None


def test_best_against_worst():
    rec = select_pairs("p", ["a", "b", "c", "d"], [3.0, 4.67, 1.33, 2.0])
    assert rec == {"prompt": "p", "chosen": "b", "rejected": "c", "chosen_score": 4.67,
                   "rejected_score": 1.33}
    assert check_pair(rec) is rec  # a valid preference record


def test_ties_and_unscored():
    assert select_pairs("p", ["a", "b", "c"], [4.0, 4.0, 4.0]) is None
    assert select_pairs("p", ["a", "b", "c"], [None, 4.0, None]) is None        # one scored
    assert select_pairs("p", ["a", "b"], [float("nan"), 3.0]) is None
    rec = select_pairs("p", ["a", "b", "c", "d"], [None, 2.0, None, 5.0])     # unscored excluded
    assert (rec["chosen"], rec["rejected"]) == ("d", "b")
    # a tie at the top is fine as long as max != min: first of the tier without length control
    rec = select_pairs("p", ["x", "yy", "zzz"], [5.0, 5.0, 1.0])
    assert rec["chosen"] == "x"
    with pytest.raises(ValueError):
        select_pairs("p", ["a"], [1.0, 2.0])


def test_length_control():
    cands = ["medium answer", "a very long answer indeed", "short", "tiny", "the longest answer of all", "mid"]
    scores = [5.0, 5.0, 5.0, 1.0, 1.0, 1.0]
    plain = select_pairs("p", cands, scores)
    assert (plain["chosen"], plain["rejected"]) == ("medium answer", "tiny")
    lc = select_pairs("p", cands, scores, length_control=True)
    assert (lc["chosen"], lc["rejected"]) == ("short", "the longest answer of all")
    assert lc["chosen_score"] == 5.0 and lc["rejected_score"] == 1.0


def test_identical_texts_dropped():
    assert select_pairs("p", ["same", "same"], [5.0, 2.0]) is None
    assert select_pairs("p", ["same", "same", "same"], [5.0, 1.0, 1.0]) is None


@pytest.mark.parametrize("length_control", [False, True])
def test_a_differing_candidate_of_the_same_tier_makes_the_pair(length_control):
    # the first top and the first bottom candidate are the same answer, the second bottom one is not:
    # the prompt still gives a pair, whatever the candidate order
    for cands, scores in ((["A", "A", "B"], [5.0, 1.0, 1.0]), (["A", "B", "A"], [5.0, 1.0, 1.0]),
                          (["A", "B", "A"], [1.0, 5.0, 5.0])):
        pair = select_pairs("p", cands, scores, length_control=length_control)
        assert pair is not None and pair["chosen"] != pair["rejected"], (cands, scores)
        assert {pair["chosen"], pair["rejected"]} == {"A", "B"}


def test_build_pairs_counts():
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    cands = [["a", "b"], ["a", "b"], ["a", "b", "c"], ["same", "same"], ["x", "y"]]
    scores = [[1.0, 4.0], [3.0, 3.0], [None, None, 2.0], [5.0, 0.0], [math.nan, None]]
    pairs, counts = build_pairs(prompts, cands, scores)
    assert [p["prompt"] for p in pairs] == ["p1"] and pairs[0]["chosen"] == "b"
    assert counts == {"pairs": 1, "ties": 1, "too_few_scored": 2, "identical": 1}
    assert sum(counts.values()) == len(prompts)
    with pytest.raises(ValueError, match="must match"):
        build_pairs(prompts, cands[:2], scores)


def test_min_margin_drops_near_ties_of_continuous_scores():
    # expected scores: a margin of 0.0003 is a tie for any judge, but not for ==
    prompts, cands = ["p1", "p2", "p3"], [["a", "b"], ["a", "b"], ["a", "b"]]
    scores = [[3.2001, 3.2004], [2.0, 3.0], [1.0, 1.25]]
    assert build_pairs(prompts, cands, scores)[1]["pairs"] == 3
    pairs, counts = build_pairs(prompts, cands, scores, min_margin=0.25)
    assert [p["prompt"] for p in pairs] == ["p2"] and counts == {"pairs": 1, "ties": 2, "too_few_scored": 0,
                                                                  "identical": 0}
