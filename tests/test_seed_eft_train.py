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
    # The preset's M1 data: IFT, the EFT seed and the examples derived from IFT, in its EFT target.
    from srlm_engine import data
    from srlm_engine.augment import eft_augment
    from srlm_engine.config import SEED_DIR, LoopConfig
    from srlm_engine.tokenizer import Tokenizer
    from srlm_engine.train.batches import encode_sft

    cfg = LoopConfig.build(preset)
    ift = data.load_ift(SEED_DIR / "ift.jsonl")
    eft = data.load_eft_train(SEED_DIR / "eft_train.jsonl") + (eft_augment(ift, cfg.seed, cfg.eft_augment)
                                                              if cfg.eft_augment else [])
    records = ift + data.eft_to_sft(eft, target=cfg.eft_target)
    enc = encode_sft(Tokenizer.from_pretrained(smollm2_dir), records, cfg.sft.max_seq_len)
    assert enc.truncated == 0


def test_near_topic_examples_of_docs_judge_md(records):
    """docs/data/eft_near_topic.jsonl (docs/JUDGE.md): four kinds per request, graded as written, the
    right long answer the longest, and no eval request among them."""
    extra = load_eft_train(Path(__file__).resolve().parents[1] / "docs" / "data" / "eft_near_topic.jsonl")
    by_request: dict[str, dict] = {}
    for r in extra:
        by_request.setdefault(r["instruction"], {})[r["kind"]] = r
    assert len(by_request) == 48 and all(set(k) == {"near", "wrong", "short", "best"} for k in by_request.values())
    for kinds in by_request.values():
        assert kinds["near"]["score"] in (0, 1) and kinds["wrong"]["score"] == 1
        assert (kinds["short"]["score"], kinds["best"]["score"]) == (4, 5)
        assert len(kinds["best"]["response"]) > max(len(kinds[k]["response"]) for k in ("near", "wrong", "short"))
        assert min(len(kinds[k]["response"]) for k in ("near", "wrong")) >= len(kinds["short"]["response"])
    requests = {norm(q) for q in by_request}
    for eval_set in EVAL_SETS:
        assert not eval_instructions(eval_set) & requests, eval_set
    assert not {norm(r["instruction"]) for r in records} & requests  # new requests, not the seed's
