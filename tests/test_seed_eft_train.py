"""The hand-written EFT seed (srlm_engine/seed/eft_train.jsonl): size, score spread, no leak of either
EFT eval set, and length that does not predict the score."""
from collections import Counter
from pathlib import Path

import pytest

from srlm_engine.config import SEED_DIR
from srlm_engine.data import load_eft_eval, load_eft_train
from srlm_engine.evaluate import spearman
from srlm_engine.judge import MAX_SCORE

SEED = SEED_DIR

MIN_RECORDS = 300
MIN_PER_SCORE = 25
LONG_WORDS, SHORT_WORDS = 80, 25   # long: over 80 words; short: under 25 words
MIN_LONG_LOW = MIN_SHORT_HIGH = 30
MAX_RHO = 0.3
MAX_JUSTIFICATION_WORDS = 120


def words(text: str) -> int:
    return len(text.split())


def norm(text: str) -> str:
    return " ".join(text.casefold().split())


@pytest.fixture(scope="module")
def records():
    return load_eft_train(SEED / "eft_train.jsonl")  # validates every line, naming a bad one


def test_enough_records(records):
    assert len(records) >= MIN_RECORDS


def test_every_score_is_well_represented(records):
    hist = Counter(r["score"] for r in records)
    thin = {s: hist[s] for s in range(MAX_SCORE + 1) if hist[s] < MIN_PER_SCORE}
    assert not thin, f"scores with fewer than {MIN_PER_SCORE} records: {thin} (histogram {sorted(hist.items())})"


EVAL_SETS = ("eft_eval.jsonl", "eft_eval_lengthfree.jsonl")


def eval_instructions(eval_set: str) -> set[str]:
    return {norm(r["instruction"]) for r in load_eft_eval(SEED / eval_set)}


@pytest.mark.parametrize("eval_set", EVAL_SETS)
def test_no_eval_instruction_leaks_into_train(records, eval_set):
    eval_instr = eval_instructions(eval_set)
    leaked = sorted({r["instruction"] for r in records if norm(r["instruction"]) in eval_instr})
    assert not leaked, f"{eval_set} instructions in eft_train: {leaked}"


def test_length_does_not_predict_score(records):
    rho = spearman([words(r["response"]) for r in records], [r["score"] for r in records])
    assert rho < MAX_RHO, f"Spearman(response words, score) = {rho:.3f}, must stay below {MAX_RHO}"


def test_long_low_and_short_high_responses(records):
    long_low = [r for r in records if words(r["response"]) > LONG_WORDS and r["score"] <= 2]
    short_high = [r for r in records if words(r["response"]) < SHORT_WORDS and r["score"] >= 4]
    assert len(long_low) >= MIN_LONG_LOW, f"only {len(long_low)} responses over {LONG_WORDS} words score 0-2"
    assert len(short_high) >= MIN_SHORT_HIGH, f"only {len(short_high)} responses under {SHORT_WORDS} words score 4-5"


def test_justifications_are_brief(records):
    long = [(r["instruction"][:60], words(r["justification"])) for r in records
            if words(r["justification"]) >= MAX_JUSTIFICATION_WORDS]
    assert not long, f"justifications of {MAX_JUSTIFICATION_WORDS}+ words: {long}"


@pytest.mark.slow  # the real SmolLM2 tokenizer (pulled once into the user cache)
@pytest.mark.parametrize("preset", ["quick", "small"])
def test_the_cpu_presets_train_every_seed_record_whole(smollm2_dir, preset):
    # SFT cuts a record longer than max_seq_len from the left: the head of the judge rubric would go.
    # The preset's M1 data: IFT, the EFT seed and its extra examples and those derived from IFT, in its
    # EFT target, as the loop reads them.
    from srlm_engine import data
    from srlm_engine.config import LoopConfig
    from srlm_engine.loop import Inputs
    from srlm_engine.tokenizer import Tokenizer
    from srlm_engine.train.batches import encode_sft

    cfg = LoopConfig.build(preset)
    inputs = Inputs.load(cfg)
    records = inputs.ift + data.eft_to_sft(inputs.eft, target=cfg.eft_target)
    enc = encode_sft(Tokenizer.from_pretrained(smollm2_dir), records, cfg.sft.max_seq_len)
    assert enc.truncated == 0


def test_near_topic_examples(records):
    """srlm_engine/seed/eft_near_topic.jsonl (docs/JUDGE.md): four written kinds per request, graded as
    written, the right long answer the longest, and three shorter ones taken from them at the same
    grade (near_cut, wrong_cut: short and still off topic or wrong; best_cut: the long right answer's
    opening sentences), so that no length says which grade an answer has; no eval request among them."""
    extra = load_eft_train(SEED_DIR / "eft_near_topic.jsonl")
    by_request: dict[str, dict] = {}
    for r in extra:
        by_request.setdefault(r["instruction"], {})[r["kind"]] = r
    written, cuts = {"near", "wrong", "short", "best"}, {"near_cut", "wrong_cut", "best_cut"}
    assert len(by_request) == 48 and all(set(k) == written | cuts for k in by_request.values())
    for kinds in by_request.values():
        assert kinds["near"]["score"] in (0, 1) and kinds["wrong"]["score"] == 1
        assert (kinds["short"]["score"], kinds["best"]["score"]) == (4, 5)
        assert len(kinds["best"]["response"]) > max(len(kinds[k]["response"]) for k in ("near", "wrong", "short"))
        assert min(len(kinds[k]["response"]) for k in ("near", "wrong")) >= len(kinds["short"]["response"])
        for k in ("near", "best"):
            cut, whole = kinds[k + "_cut"], kinds[k]
            assert whole["response"].startswith(cut["response"]) and len(cut["response"]) < len(whole["response"])
            assert cut["score"] == whole["score"]
        assert kinds["wrong_cut"]["score"] == 1
        assert len(kinds["wrong_cut"]["response"]) < len(kinds["wrong"]["response"])
        assert len(kinds["best_cut"]["response"]) > len(kinds["short"]["response"])
    lengths = {k: [len(v[k]["response"]) for v in by_request.values()] for k in written | cuts}
    # the short wrong and off-topic answers are shorter than the short right ones, the cut right ones as
    # long as the long wrong ones: across the file, length does not order the grades
    assert max(lengths["wrong_cut"]) < 300 and sum(lengths["wrong_cut"]) < sum(lengths["short"])
    assert sum(lengths["best_cut"]) >= sum(lengths["wrong"]) * 0.8
    requests = {norm(q) for q in by_request}
    for eval_set in EVAL_SETS:
        assert not eval_instructions(eval_set) & requests, eval_set
    assert not {norm(r["instruction"]) for r in records} & requests  # new requests, not the seed's
