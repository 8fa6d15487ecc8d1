"""EFT augmentation: each grading rule on hand-made IFT records, the planted error, the irrelevant
reply, determinism, valid records, and on the seed IFT set: every variant, and length no shortcut."""
import re
from collections import Counter

import pytest

from srlm_engine.augment import VARIANTS, eft_augment, write_eft_augment
from srlm_engine.config import SEED_DIR
from srlm_engine.data import check_eft_train, load_eft_train, load_ift
from srlm_engine.evaluate import spearman
from srlm_engine.judge import has_score_line

SEED_IFT = SEED_DIR / "ift.jsonl"
ALL = len(VARIANTS)  # per_record that keeps every variant made


def ift(instruction, reply):
    return {"messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": reply}]}


SPIDER = ift("How many legs does a spider have?",
             "A spider has 8 legs. Insects have six legs, so spiders are not insects; they belong to "
             "the arachnids, along with scorpions and ticks. Some spiders also have 8 eyes.")
TIPS = ift("Give me three tips for writing clear emails.",
           "Here are three tips:\n\n1. Put the main request in the first sentence.\n"
           "2. Keep each paragraph to one idea.\n3. End with the action you need and a deadline.\n\n"
           "Short emails also tend to get faster replies.")
TULIPS = ift("When should I plant tulip bulbs?",
             "Plant tulip bulbs in autumn, a few weeks before the ground freezes. They need a long "
             "cold spell to bloom, so spring planting usually gives weak flowers or none.")
BREAD = ift("Explain why bread goes stale.",
            "Bread goes stale mainly because its starch recrystallizes, not because it dries out. "
            "As the loaf cools, starch molecules that swelled with water during baking slowly line up "
            "again and push water out, which makes the crumb firm and crumbly. A refrigerator speeds "
            "this up, which is why bread keeps better at room temperature or in the freezer.")
RECORDS = [SPIDER, TIPS, TULIPS, BREAD]


def variants(records, seed=0):
    """{(instruction, variant): record} over eft_augment(records) with every variant kept."""
    out = {}
    for r in eft_augment(records, seed=seed, per_record=ALL):
        key = (r["instruction"], r["source"].removeprefix("augment:"))
        assert key not in out
        out[key] = r
    return out


def instruction(rec):
    return rec["messages"][0]["content"]


def reply(rec):
    return rec["messages"][1]["content"]


# variant -> (score, phrases its justification must hold: the points it earns and those it misses)
RULES = {
    "reference": (5, ["relevance, coverage, and usefulness points", "earning the clarity point",
                      "earns the expertise point"]),
    "short": (4, ["relevance, coverage, and usefulness points", "earning the clarity point",
                  "fifth point is not earned"]),
    "padded": (4, ["relevance, coverage, and usefulness points", "earning the clarity point",
                   "misses the expertise point"]),
    "rambling": (3, ["relevance, coverage, and usefulness points", "misses the clarity point",
                     "rules out the expertise point"]),
    "partial": (2, ["earning the relevance point", "(point 2)", "cannot act on it",
                    "clarity point nor the expertise point"]),
    "error": (1, ["earning the relevance point", "none of the other points"]),
    "irrelevant": (0, ["does not address the request", "fails the relevance criterion"]),
}


@pytest.mark.parametrize("variant,record", [
    ("reference", BREAD), ("short", SPIDER), ("padded", TIPS), ("rambling", BREAD),
    ("partial", TIPS), ("error", SPIDER), ("irrelevant", TULIPS)])
def test_each_rule_grades_and_justifies(variant, record):
    rec = variants(RECORDS)[instruction(record), variant]
    score, phrases = RULES[variant]
    assert rec["score"] == score
    for p in phrases:
        assert p in rec["justification"], (variant, p)
    assert check_eft_train(rec) is rec
    # the justification ends on its reasons, without the score: that is the `score` field's
    assert not has_score_line(rec["justification"])
    assert not re.search(r"\b(no|one|two|three|four|five|[0-5]) points?\.?$", rec["justification"], re.I)


def test_reference_under_eight_words_loses_the_expertise_point():
    q = "What is 7 times 6?"
    rec = variants([ift(q, "7 times 6 is 42."), BREAD])[q, "reference"]
    assert rec["score"] == 4
    assert "does not earn the expertise point" in rec["justification"]


def test_short_is_the_first_sentence_and_only_where_a_rule_says_it_is_complete():
    v = variants(RECORDS)
    assert v[instruction(SPIDER), "short"]["response"] == "A spider has 8 legs."
    assert v[instruction(TULIPS), "short"]["response"] == ("Plant tulip bulbs in autumn, a few weeks "
                                                            "before the ground freezes.")
    # not a short factual question: a request for tips, an explanation, a "how do I"
    how = ift("How do I keep bread fresh?", "Keep bread fresh in a bread box. Slice only what you eat.")
    v.update(variants([how, BREAD]))
    for rec in (TIPS, BREAD, how):
        assert (instruction(rec), "short") not in v
    # a factual question whose first sentence does not restate it: no rule says it is complete
    other = ift("What is the tallest animal?", "Giraffes. Males can reach almost six meters.")
    assert ("What is the tallest animal?", "short") not in variants([other, BREAD])


def test_padding_and_rambling_keep_the_reply_and_are_longer():
    v = variants(RECORDS)
    for rec in RECORDS:
        ref = v[instruction(rec), "reference"]
        padded, rambling = v[instruction(rec), "padded"], v[instruction(rec), "rambling"]
        assert reply(rec) in padded["response"] and reply(rec) in rambling["response"]
        assert len(ref["response"]) < len(padded["response"]) < len(rambling["response"])
        assert ref["score"] > padded["score"] > rambling["score"]  # longer, and lower


def test_partial_is_a_cut_of_the_reply_and_skipped_when_it_would_keep_the_answer():
    v = variants(RECORDS)
    cut = v[instruction(TIPS), "partial"]["response"]
    # the lead-in alone covers nothing, so the first tip comes with it
    assert cut == "Here are three tips:\n\n1. Put the main request in the first sentence."
    assert reply(TIPS).startswith(cut)
    # these replies lead with their answer: the first third would still hold it
    for rec in (SPIDER, TULIPS, BREAD):
        assert (instruction(rec), "partial") not in v
    code = ift("Write a Python function that doubles a number.",
               "```python\ndef double(x):\n    return 2 * x\n```\n\nIt works for ints and floats. "
               "For a list, use a comprehension. Strings are repeated instead.")
    assert ("Write a Python function that doubles a number.", "partial") not in variants([code, BREAD])


def test_error_changes_the_answer_everywhere_digit_for_digit():
    v = variants(RECORDS)
    err = v[instruction(SPIDER), "error"]["response"]
    assert err != reply(SPIDER)
    assert re.sub(r"[0-9]", "#", err) == re.sub(r"[0-9]", "#", reply(SPIDER))  # only a digit changed
    new = re.match(r"A spider has ([0-9]+) legs\.", err)[1]
    assert new != "8" and err.count(f"{new} eyes") == 1  # every occurrence of the answer's number
    assert f"giving {new} where the correct figure is 8" in v[instruction(SPIDER), "error"]["justification"]


def test_error_prefers_the_answer_to_a_restated_given():
    rec = ift("What is 15% of 240?", "15% of 240 is 36.\n\nCalculation: 240 x 0.15 = 36.")
    for seed in range(5):
        err = variants([rec, BREAD], seed=seed)[("What is 15% of 240?", "error")]["response"]
        assert err.startswith("15% of 240 is ") and not err.startswith("15% of 240 is 36.")


def test_error_skipped_without_a_number_or_with_an_invented_one():
    v = variants(RECORDS)
    assert (instruction(TULIPS), "error") not in v   # asks "when", but the reply holds no number
    assert (instruction(TIPS), "error") not in v
    # the numbers of a composed text are invented, changing one makes nothing wrong; a number the
    # request states is another matter
    q = "Write a slogan for a gym that is open 24 hours."
    invented = ift(q, '"Over 100 machines, zero excuses."\n\nIt is short and bold.')
    assert (q, "error") not in variants([invented, BREAD])
    stated = ift(q, '"Over 100 machines, open 24 hours."\n\nIt is short and bold.')
    err = variants([stated, BREAD])[q, "error"]
    assert err["response"].startswith('"Over 100 machines, open ') and "24" not in err["response"]
    assert "(the request itself says 24)" in err["justification"]


def test_irrelevant_reply_comes_from_another_record():
    v = variants(RECORDS)
    replies = {instruction(r): reply(r) for r in RECORDS}
    for rec in RECORDS:
        other = v[instruction(rec), "irrelevant"]["response"]
        assert other != reply(rec) and other in replies.values()
    # a single record has no other record to borrow from; a duplicate prompt is no other record
    assert (instruction(BREAD), "irrelevant") not in variants([BREAD])
    twin = ift(instruction(BREAD), "Starch recrystallizes as bread cools, pushing water out of the crumb.")
    assert not any(r["source"] == "augment:irrelevant" for r in eft_augment([BREAD, twin], per_record=ALL))


def test_deterministic_for_a_seed():
    records = load_ift(SEED_IFT)
    assert eft_augment(records, seed=3) == eft_augment(records, seed=3)
    assert eft_augment(records, seed=3) != eft_augment(records, seed=4)


def test_per_record():
    out = eft_augment(RECORDS, per_record=2)
    assert Counter(r["instruction"] for r in out) == {instruction(r): 2 for r in RECORDS}
    with pytest.raises(ValueError, match="per_record"):
        eft_augment(RECORDS, per_record=0)


def test_seed_ift_every_variant_valid_and_length_no_shortcut(tmp_path):
    out = tmp_path / "eft_augment.jsonl"
    counts = write_eft_augment(SEED_IFT, out, seed=0, per_record=4)
    records = load_eft_train(out)  # every line passes check_eft_train
    assert counts == dict(Counter(r["source"].removeprefix("augment:") for r in records))
    assert set(counts) == set(VARIANTS) and all(counts.values()), counts
    assert all(r["score"] == RULES[r["source"].removeprefix("augment:")][0] or
               r["source"] == "augment:reference" for r in records)
    rho = spearman([len(r["response"]) for r in records], [r["score"] for r in records])
    assert rho < 0.3, rho  # 0.15 on the seed set at seed 0


def test_srlm_data_eft_augment_writes_graded_records(tmp_path, capsys):
    from srlm_engine.cli import main
    from srlm_engine.data import load_eft_train

    out = tmp_path / "eft_aug.jsonl"
    assert main(["data", "eft-augment", str(SEED_DIR / "ift.jsonl"), "--out", str(out), "--per-record", "2"]) == 0
    recs = load_eft_train(out)
    assert len(recs) == 2 * 165 and {r["score"] for r in recs} >= {0, 2, 4, 5}
    assert f"{len(recs)} EFT records -> {out}: reference " in capsys.readouterr().out
