"""The length-free judge evaluation set, srlm_engine/seed/eft_eval_lengthfree.jsonl.

On srlm_engine/seed/eft_eval.jsonl the rule "the longer answer is better" agrees with the human scores
on most pairs, so a judge can look good there by counting words. This hand-written set is built
so that length says nothing: long answers that are wrong, padded or off topic, short answers that
are complete and correct. These tests keep it that way."""

import pytest

from srlm_engine.config import SEED_DIR
from srlm_engine.data import load_eft_eval, load_eft_train, load_ift
from srlm_engine.evaluate import judge_vs_human

SEED = SEED_DIR
LENGTHFREE = SEED / "eft_eval_lengthfree.jsonl"


def norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def length_rule_accuracy(items) -> float:
    """Pairwise accuracy against the human scores of a "judge" that scores each response by its
    number of characters."""
    human = [item["scores"] for item in items]
    judge = [[len(r) for r in item["responses"]] for item in items]
    return judge_vs_human(human, judge).pairwise_accuracy


@pytest.fixture(scope="module")
def items():
    return load_eft_eval(LENGTHFREE)


def test_size_and_shape(items):
    assert len(items) >= 40
    for i, item in enumerate(items):
        assert len(item["responses"]) == 4, f"item {i}: {item['instruction']!r}"
        assert len(set(item["scores"])) >= 3, f"item {i}: {item['instruction']!r} scores {item['scores']}"


def test_instructions_are_new(items):
    own = [norm(item["instruction"]) for item in items]
    assert len(own) == len(set(own)), "an instruction appears twice in the length-free set"
    seen = {norm(r["instruction"]) for r in load_eft_eval(SEED / "eft_eval.jsonl")}
    seen |= {norm(r["instruction"]) for r in load_eft_train(SEED / "eft_train.jsonl")}
    seen |= {norm(next(m["content"] for m in r["messages"] if m["role"] == "user"))
             for r in load_ift(SEED / "ift.jsonl")}
    shared = [item["instruction"] for item in items if norm(item["instruction"]) in seen]
    assert not shared, f"instructions already in the other seed files: {shared}"


def test_longest_response_is_rarely_the_unique_best(items):
    hits = 0
    for item in items:
        lengths, scores = [len(r) for r in item["responses"]], item["scores"]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        top = max(scores)
        hits += scores[longest] == top and scores.count(top) == 1
    assert hits / len(items) <= 0.40


def test_length_rule_is_near_chance(items):
    assert 0.35 <= length_rule_accuracy(items) <= 0.60


def test_length_rule_does_well_on_the_original_set():
    """For contrast, the reason this set exists: on eft_eval.jsonl, length alone ranks most pairs."""
    assert length_rule_accuracy(load_eft_eval(SEED / "eft_eval.jsonl")) > 0.65

