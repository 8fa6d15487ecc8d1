"""Record schemas with file:line errors, the EFT -> SFT converter and the Open Assistant converter."""
import json

import pytest

from srlm_engine.config import SEED_DIR
from srlm_engine.data import (convert_oasst, eft_to_sft, load_eft_eval, load_eft_train,
                              load_ift, load_pairs, load_sft, pair_conversations, sft_conversation)
from srlm_engine.io import DataError
from srlm_engine.judge import DEFAULT_TEMPLATE, parse_score

SEED = SEED_DIR


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def sft(*turns, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


# --------------------------------------------------------------------------- SFT

def test_sft_good_records_keep_extra_fields(tmp_path):
    p = write(tmp_path / "ift.jsonl", [sft(("user", "hi"), ("assistant", "hello"), category="chat"),
                                       sft(("system", "be brief"), ("user", "a"), ("assistant", "b"))])
    recs = load_sft(p)
    assert len(recs) == 2 and recs[0]["category"] == "chat"


@pytest.mark.parametrize("bad, msg", [
    (sft(("user", "hi")), "no assistant turn"),
    (sft(("user", "hi"), ("bot", "x")), r"messages\[1\]\.role"),
    (sft(("user", "  "), ("assistant", "x")), r"messages\[0\]\.content"),
    (sft(("user", "hi"), ("assistant", 3)), r"messages\[1\]\.content"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"text": "x"}, "needs field 'messages', or 'prompt' and 'completion'"),
    # TRL's prompt-completion forms, malformed
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
     "field\\(s\\) 'prompt' are message lists but 'completion' not"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     r"completion\[0\]\.role must be 'assistant', got 'user'"),
    ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]},
     r"missing field .prompt\[0\]\.content."),
    ({"prompt": "q", "completion": ""}, "'completion' must be a non-empty string"),
])
def test_sft_bad_record_names_file_and_line(tmp_path, bad, msg):
    p = write(tmp_path / "ift.jsonl", [sft(("user", "a"), ("assistant", "b")), "", bad])
    with pytest.raises(DataError, match=rf"ift\.jsonl:3: .*{msg}"):
        load_sft(p)


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_sft_prompt_completion_forms(tmp_path):
    # TRL's prompt-completion records: strings are one user and one assistant turn; in the
    # conversational form only the completion is trained, not the assistant turns of the prompt.
    recs = [{"prompt": "q", "completion": "a", "id": 1},
            {"prompt": msgs(("system", "s"), ("user", "q1"), ("assistant", "a1"), ("user", "q2")),
             "completion": msgs(("assistant", "a2"))}]
    loaded = load_sft(write(tmp_path / "sft.jsonl", recs))
    assert loaded == recs  # kept as written; the trainer renders them
    assert sft_conversation(loaded[0]) == (msgs(("user", "q"), ("assistant", "a")), 1)
    conv, first = sft_conversation(loaded[1])
    assert conv == recs[1]["prompt"] + recs[1]["completion"] and first == 4
    assert sft_conversation(sft(("user", "q"), ("assistant", "a"))) == (msgs(("user", "q"), ("assistant", "a")), 0)
    with pytest.raises(DataError, match=r"sft\.jsonl:1: a seed IFT record needs field 'messages'"):
        load_ift(tmp_path / "sft.jsonl")


def test_seed_file_with_broken_line(tmp_path):
    p = write(tmp_path / "seed.jsonl", [sft(("user", "a"), ("assistant", "b")),
                                        '{"messages": [{"role": "user", "content": "x"}',
                                        sft(("user", "c"), ("assistant", "d"))])
    with pytest.raises(DataError, match=r"seed\.jsonl:2: invalid JSON"):
        load_sft(p)


def test_ift_needs_a_user_turn(tmp_path):
    # The loop takes each seed IFT record's first user turn as a seed prompt; an SFT record
    # without one still trains, but as a seed it is a DataError naming file and line.
    no_user = sft(("system", "s"), ("assistant", "a"))
    p = write(tmp_path / "ift.jsonl", [sft(("system", "s"), ("user", "q"), ("assistant", "a")), no_user])
    assert len(load_sft(p)) == 2
    with pytest.raises(DataError, match=r"ift\.jsonl:2: messages hold no user turn"):
        load_ift(p)
    write(p, [sft(("user", "q"), ("assistant", "a")), sft(("user", "hi"))])
    with pytest.raises(DataError, match=r"ift\.jsonl:2: messages hold no assistant turn"):
        load_ift(p)  # and the SFT rules still apply


# --------------------------------------------------------------------------- pairs

def test_pairs(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 4.5, "rejected_score": 1}
    assert load_pairs(write(tmp_path / "ok.jsonl", [good]))[0]["chosen_score"] == 4.5
    p = write(tmp_path / "pairs.jsonl", [good, {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: chosen and rejected are the same"):
        load_pairs(p)
    p = write(tmp_path / "p2.jsonl", [{"prompt": "p", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match=r"p2\.jsonl:1: .*'chosen'"):
        load_pairs(p)


def test_pairs_in_trls_conversational_and_implicit_prompt_forms(tmp_path):
    user, a, b = msgs(("user", "2+2?")), msgs(("assistant", "4")), msgs(("assistant", "5"))
    conversational = {"prompt": msgs(("system", "Be brief."), ("user", "2+2?")), "chosen": a, "rejected": b}
    implicit = {"chosen": user + a, "rejected": user + b, "score": 3}
    recs = load_pairs(write(tmp_path / "pairs.jsonl", [conversational, implicit]))
    assert recs == [conversational, implicit]
    assert pair_conversations(recs[0]) == (conversational["prompt"], a[0], b[0])
    assert pair_conversations(recs[1]) == (user, a[0], b[0])  # the prompt is the messages both begin with
    # the string form is the same conversation with the prompt as one user turn
    assert pair_conversations({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == (user, a[0], b[0])


@pytest.mark.parametrize("bad, msg", [
    ({"prompt": "q", "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))},
     r"field\(s\) 'chosen', 'rejected' are message lists but 'prompt' not: give prompt, chosen, rejected all"),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("user", "a")), "rejected": msgs(("assistant", "b"))},
     r"chosen\[0\]\.role must be 'assistant', got 'user'"),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a"), ("assistant", "c")),
      "rejected": msgs(("assistant", "b"))}, "field 'rejected'|field 'chosen' must hold one assistant message"),
    ({"prompt": msgs(("human", "q")), "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))},
     r"prompt\[0\]\.role must be one of 'system', 'user', 'assistant', got 'human'"),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a"))}, "missing field 'rejected'"),
    ({"prompt": msgs(("user", "q")), "chosen": [], "rejected": msgs(("assistant", "b"))},
     "field 'chosen' must be a non-empty list of messages"),
    ({"prompt": msgs(("user", "q")), "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "a"))},
     "chosen and rejected are the same text"),
    ({"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "r"), ("assistant", "b"))},
     "begin with different messages"),
    ({"chosen": msgs(("user", "q"), ("assistant", "a")), "rejected": msgs(("user", "q"), ("user", "b"))},
     r"rejected\[1\]\.role must be 'assistant' \(the reply after the prompt\)"),
    ({"chosen": msgs(("user", "q")), "rejected": msgs(("user", "q"), ("assistant", "b"))},
     r"field 'chosen' must hold one assistant message after the prompt \(1 message\(s\)\), got 0"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
])
def test_bad_pair_records_name_file_line_and_field(tmp_path, bad, msg):
    p = write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: .*({msg})"):
        load_pairs(p)


# --------------------------------------------------------------------------- EFT

EFT = {"instruction": "Name a prime.", "response": "7", "justification": "Correct and direct.", "score": 4}


def test_eft_train_and_conversion(tmp_path):
    recs = load_eft_train(write(tmp_path / "eft.jsonl", [EFT]))
    (rec,) = eft_to_sft(recs, DEFAULT_TEMPLATE)
    user, asst = rec["messages"]
    assert user["role"] == "user" and "Name a prime." in user["content"] and "\n7\n" in user["content"]
    assert "{instruction}" not in user["content"] and "{response}" not in user["content"]
    assert asst == {"role": "assistant", "content": "Correct and direct.\nScore: 4"}
    assert parse_score(asst["content"]) == 4
    with pytest.raises(DataError, match="placeholder"):
        eft_to_sft(recs, "no placeholders here")


def test_eft_score_target_is_the_score_line_alone(tmp_path):
    # what the expected-score judge reads right after the judge prompt (judge_expected, after="prefix")
    recs = load_eft_train(write(tmp_path / "eft.jsonl", [EFT]))
    (judgment,) = eft_to_sft(recs, DEFAULT_TEMPLATE, "judgment")
    (score,) = eft_to_sft(recs, DEFAULT_TEMPLATE, "score")
    assert score["messages"][0] == judgment["messages"][0]
    assert score["messages"][1] == {"role": "assistant", "content": "Score: 4"}
    assert parse_score(score["messages"][1]["content"]) == 4
    with pytest.raises(ValueError, match="EFT target"):
        eft_to_sft(recs, DEFAULT_TEMPLATE, "justification")


@pytest.mark.parametrize("change, msg", [
    ({"score": 6}, "'score' must be an integer 0..5"),
    ({"score": 3.0}, "'score' must be an integer"),
    ({"score": True}, "'score' must be an integer"),
    ({"justification": "Good.\nScore: 4"}, "already holds a 'Score:' line"),
    ({"justification": "Good.\n**Score:** N/A"}, "already holds a 'Score:' line"),
    ({"response": ""}, "'response'"),
])
def test_eft_train_bad(tmp_path, change, msg):
    with pytest.raises(DataError, match=rf"eft\.jsonl:1: .*{msg}"):
        load_eft_train(write(tmp_path / "eft.jsonl", [{**EFT, **change}]))


def test_eft_eval(tmp_path):
    good = {"instruction": "q", "responses": ["a", "b", "c"], "scores": [5, 3, 0]}
    assert load_eft_eval(write(tmp_path / "ok.jsonl", [good]))[0]["scores"] == [5, 3, 0]
    cases = [({"responses": ["only one"], "scores": [5]}, "at least 2 responses, got 1"),
             ({"scores": [5, 3]}, "as long as 'responses' \\(3\\), got 2"),
             ({"scores": [5, 3, 6]}, r"scores\[2\] must be an integer 0..5"),
             ({"scores": [5, 3, 2.5]}, r"scores\[2\]"),
             ({"responses": ["a", "", "c"]}, r"responses\[1\]"),
             ({"responses": "abc"}, "must be a list")]
    for change, msg in cases:
        p = write(tmp_path / "eval.jsonl", [good, {**good, **change}])
        with pytest.raises(DataError, match=rf"eval\.jsonl:2: .*{msg}"):
            load_eft_eval(p)


# --------------------------------------------------------------------------- Open Assistant

def reply(text, rank, lang="en", **kw):
    return {"message_id": text, "text": text, "role": "assistant", "rank": rank, "lang": lang,
            "replies": [{"text": "follow-up", "role": "prompter", "lang": lang, "replies": []}], **kw}


def tree(tid, text, replies, lang="en", state="ready_for_export"):
    return {"message_tree_id": tid, "tree_state": state,
            "prompt": {"message_id": tid, "text": text, "role": "prompter", "lang": lang,
                       "replies": replies}}


def test_convert_oasst(tmp_path):
    trees = [
        tree("t1", "How do magnets work?", [reply("B", 1), reply("A", 0), reply("C", 2), reply("U", None)]),
        tree("t2", "Wie spät ist es?", [reply("x", 0, "de"), reply("y", 1, "de")], lang="de"),
        tree("t3", "Tell a joke.", [reply("only", 0)]),                       # IFT, too few ranked
        tree("t4", "Explain DNS.", [reply("first", 1), reply("second", 2)]),  # no rank 0 left
        tree("t5", "Draft.", [reply("a", 0), reply("b", 1)], state="aborted_low_grade"),
        tree("t6", "List 7 colors.", [reply(str(i), i) for i in range(7)]),
        tree("t7", "Gone?", [reply("del", 0, deleted=True), reply("ok", 1)]),
    ]
    src = write(tmp_path / "trees.jsonl", trees)
    # the train export: IFT only; the validation export: EFT eval only
    assert convert_oasst(src, tmp_path / "out", eval_share=0) == {
        "trees": 7, "skipped_state": 1, "skipped_lang": 1, "no_rank0": 2, "too_few_ranked": 0, "ift": 3, "eft_eval": 0}
    ift = load_sft(tmp_path / "out" / "ift.jsonl")
    assert convert_oasst(src, tmp_path / "out", eval_share=1) == {
        "trees": 7, "skipped_state": 1, "skipped_lang": 1, "no_rank0": 0, "too_few_ranked": 2, "ift": 0, "eft_eval": 3}
    assert [r["messages"][1]["content"] for r in ift] == ["A", "only", "0"]
    assert ift[0]["messages"][0] == {"role": "user", "content": "How do magnets work?"}
    ev = load_eft_eval(tmp_path / "out" / "eft_eval.jsonl")
    assert ev[0]["responses"] == ["A", "B", "C"] and ev[0]["scores"] == [5, 4, 3]
    assert ev[1]["responses"] == ["first", "second"] and ev[1]["scores"] == [5, 4]  # renumbered
    assert ev[2]["scores"] == [5, 4, 3, 2, 1, 0, 0]


def test_convert_oasst_never_evaluates_the_judge_on_what_sft_trained(tmp_path):
    trees = [tree(f"t{i}", f"question {i}", [reply(f"best {i}", 0), reply(f"worse {i}", 1)]) for i in range(400)]
    src = write(tmp_path / "trees.jsonl", trees)
    counts = convert_oasst(src, tmp_path / "out")  # one file, the default split
    ift = {r["messages"][0]["content"] for r in load_sft(tmp_path / "out" / "ift.jsonl")}
    ev = {r["instruction"] for r in load_eft_eval(tmp_path / "out" / "eft_eval.jsonl")}
    assert not ift & ev and len(ift | ev) == 400
    assert 0.10 < counts["eft_eval"] / 400 < 0.20  # near the default share of 0.15
    assert convert_oasst(src, tmp_path / "again") == counts  # the split is a pure function of the tree ids
    assert (tmp_path / "again" / "eft_eval.jsonl").read_bytes() == (tmp_path / "out" / "eft_eval.jsonl").read_bytes()
    with pytest.raises(ValueError, match="eval_share must be in"):
        convert_oasst(src, tmp_path / "x", eval_share=1.5)


def test_convert_oasst_broken_line(tmp_path):
    src = write(tmp_path / "trees.jsonl", [tree("t", "q", []), "{oops"])
    with pytest.raises(DataError, match=r"trees\.jsonl:2"):
        convert_oasst(src, tmp_path / "out")


# --------------------------------------------------------------------------- the real seed files

@pytest.mark.parametrize("name, loader", [("ift.jsonl", load_ift), ("eft_train.jsonl", load_eft_train),
                                          ("eft_eval.jsonl", load_eft_eval)])
def test_real_seed_files_validate(name, loader):
    path = SEED / name
    if not path.is_file():
        pytest.skip(f"{path} not written yet")
    recs = loader(path)
    assert recs
    if name == "eft_train.jsonl":
        assert all(parse_score(r["messages"][1]["content"]) is not None for r in eft_to_sft(recs))
