"""Self-instruction: each filter rejects for the reason it claims, ROUGE-L equals rouge-score,
and generate_prompts drives a fake engine with the paper's settings."""
import random
import re
import time
from types import SimpleNamespace

import pytest

from srlm_engine.selfinstruct import (PromptFilter, fewshot_prompt, generate_prompts, lcs_length,
                                      normalize, pick_shots, rouge_tokens)

SEEDS = [f"Explain how {x} works to a curious teenager." for x in
         ("photosynthesis", "a bicycle gear", "compound interest", "a vaccine", "a rainbow",
          "an election", "a refrigerator", "the stock market", "a volcano", "a jet engine")]


def lcs_reference(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 = 2 * LCS / (len(a) + len(b)) over `rouge_tokens`, one pair at a time: the
    definition PromptFilter.max_similarity computes against many prompts at once."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb))


def random_text(rng, vocab, lo=1, hi=30):
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


# --------------------------------------------------------------------------- ROUGE-L

def test_lcs_matches_dynamic_programming():
    rng = random.Random(1)
    for _ in range(500):
        a = [rng.randrange(4) for _ in range(rng.randint(0, 90))]
        b = [rng.randrange(4) for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == lcs_reference(a, b)


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(2)
    # few words so that overlaps happen; case and punctuation on which both tokenizers agree
    vocab = ["the", "The", "cat", "dog,", "sat", "on", "mat.", "a", "red", "(big)", "x2", "Write"]
    for _ in range(200):
        a, b = random_text(rng, vocab), random_text(rng, vocab)
        assert rouge_tokens(a) == [t for t in re.sub(r"[^a-z0-9]+", " ", a.lower()).split()]
        want = scorer.score(a, b)["rougeL"].fmeasure
        assert rouge_l(a, b) == pytest.approx(want, abs=1e-12)
        assert rouge_l(b, a) == pytest.approx(want, abs=1e-12)
    assert rouge_l("", "a b") == 0.0


def test_similarity_search_equals_brute_force():
    rng = random.Random(3)
    vocab = ["write", "a", "poem", "about", "the", "sea", "story", "war", "short", "long", "love"]
    pool = [random_text(rng, vocab, 3, 12) for _ in range(200)]
    f = PromptFilter(pool, blocklist=())
    for _ in range(200):
        q = random_text(rng, vocab, 3, 12)
        brute = max(rouge_l(q, p) for p in pool)
        got = f.max_similarity(q)
        if brute > 0.7:
            assert got == pytest.approx(brute)
        else:
            assert got <= 0.7
        assert (f.check(q) == "similar") == (brute > 0.7 and normalize(q) not in {normalize(p) for p in pool})


def test_filter_is_fast_on_5k_prompts():
    rng = random.Random(4)
    vocab = [f"w{i}" for i in range(3000)] + ["the", "a", "of", "to", "how", "what", "write"] * 40
    f = PromptFilter(blocklist=())
    prompts = [random_text(rng, vocab, 5, 40) for _ in range(5_000)]
    t = time.perf_counter()
    kept = sum(f.offer(p) for p in prompts)
    assert kept > 4500
    # about 0.6 s on the dev CPU (10k prompts: about 1.8 s); the bound only guards against a
    # quadratic pure-Python fallback, which takes minutes
    assert time.perf_counter() - t < 6.0


# --------------------------------------------------------------------------- each filter

@pytest.mark.parametrize("prompt, reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("Sort numbers", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image I sent you in detail.", "blocklist"),
    ("Draw a cat using ASCII characters.", "blocklist"),
    ("Go to the store website and tell me the price.", "blocklist"),
    ("Summarize the attached file in three sentences.", "blocklist"),
    ("Open this URL and read the first paragraph.", "blocklist"),
    ("Summarize the audio/video recording of my meeting.", "blocklist"),  # punctuation between words
    ("explain   how PHOTOSYNTHESIS works to a curious teenager", "duplicate"),
    ("Explain how photosynthesis works to a curious child.", "similar"),
])
def test_each_filter_rejects_for_its_reason(prompt, reason):
    f = PromptFilter(SEEDS)
    assert f.check(prompt) == reason
    assert not f.offer(prompt) and f.stats[reason] == 1
    assert sum(f.stats.values()) == 1


def test_filter_keeps_good_prompts_and_indexes_them():
    f = PromptFilter(SEEDS)
    ok = "List three ways to save water at home during a drought."
    assert f.check(ok) is None
    assert f.check("Sort these numbers: 3 1 2") is None           # exactly 3+ words
    assert f.check(" ".join(["word"] * 150)) is None               # 150 is allowed
    assert f.check("Explain the mapping between keys and values in a profile.") is None
    assert f.offer(ok)
    assert f.check(ok.upper()) == "duplicate"
    assert f.check("List three ways to save water at home in a drought.") == "similar"


# --------------------------------------------------------------------------- prompts and shots

def test_fewshot_prompt_and_shots():
    p = fewshot_prompt(["a b c", " d e f\n"])
    assert p.endswith("Task 1: a b c\nTask 2: d e f\nTask 3:")
    rng = random.Random(0)
    shots = pick_shots(rng, SEEDS, [])
    assert len(shots) == 8 and set(shots) <= set(SEEDS) and len(set(shots)) == 8
    shots = pick_shots(rng, SEEDS, ["g1"])
    assert set(shots) <= set(SEEDS)                        # one generated is not enough
    shots = pick_shots(rng, SEEDS, ["g1", "g2", "g3"])
    assert len(shots) == 8 and sum(s.startswith("g") for s in shots) == 2
    assert len(pick_shots(rng, SEEDS[:3], [])) == 3        # small seed: all of it


# --------------------------------------------------------------------------- generate_prompts

class FakeLLM:
    def __init__(self, texts):
        self.texts, self.calls = list(texts), []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((list(prompts), params))
        outs = []
        for _ in prompts:
            t = self.texts.pop(0) if self.texts else "Sort numbers"
            reason = "length" if t.startswith("TRUNC") else "stop"
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t, finish_reason=reason)]))
        return outs


def params(**kw):
    return kw


def test_generate_prompts_counts_every_rejection():
    texts = [" Write a haiku about autumn leaves falling.\n",
             "Sort numbers",
             "Describe this picture of my dog please.",
             "Write a haiku about autumn leaves falling.",
             "TRUNC Write a very long essay about everything",
             "Explain how a bicycle gear works to a curious teenager!",
             "Name three rivers in South America and their lengths.",
             "Give a recipe for a quick vegetarian dinner for two people.",
             "Write a haiku about autumn leaves falling down."]
    llm = FakeLLM(texts)
    got, stats = generate_prompts(llm, SEEDS, count=3, batch_size=4, seed=5, params_factory=params)
    assert got == ["Write a haiku about autumn leaves falling.",
                   "Name three rivers in South America and their lengths.",
                   "Give a recipe for a quick vegetarian dinner for two people."]
    assert stats == {"empty": 0, "truncated": 1, "too_short": 1, "too_long": 0, "blocklist": 1,
                     "duplicate": 2, "similar": 0, "attempts": 8, "kept": 3, "stopped_early": 0,
                     "shots_dropped": 0, "unsent": 0}
    prompts, ps = llm.calls[0]
    assert len(llm.calls) == 2 and len(prompts) == 4 and len(ps) == 4
    for p in ps:
        assert p["n"] == 1 and p["temperature"] == 0.6 and p["top_p"] == 0.9 and p["stop"] == ["\nTask"]
    # each request its own seed (one per round drew the same uniforms for all), the same on a rerun
    seeds = [p["seed"] for _, ps in llm.calls for p in ps]
    assert len(set(seeds)) == 8
    again = FakeLLM(texts)
    generate_prompts(again, SEEDS, count=3, batch_size=4, seed=5, params_factory=params)
    assert [p["seed"] for _, ps in again.calls for p in ps] == seeds
    assert all(q.endswith("\nTask 9:") and q.count("\nTask ") == 9 for q in prompts)
    # the second round could use the generated prompts only once 2 were kept (after round one: 1)
    assert all("haiku" not in q for q in llm.calls[1][0])


def test_generate_prompts_uses_generated_shots_and_stops_on_rejections():
    llm = FakeLLM(["Write a limerick about a forgetful robot chef.",
                   "Name three rivers in South America and their lengths."])
    got, stats = generate_prompts(llm, SEEDS, count=10, batch_size=2, seed=0,
                                  max_consecutive_rejections=7, params_factory=params)
    assert len(got) == 2 and stats["stopped_early"] == 1
    assert stats["too_short"] == 7 and stats["attempts"] == 9
    later = llm.calls[1][0]
    assert all("robot chef" in q and "South America" in q for q in later)
    with pytest.raises(ValueError):
        generate_prompts(llm, [], count=1, params_factory=params)


class ShortContextLLM(FakeLLM):
    """A context of `limit` tokens, one token per character, as the engine counts a text prompt."""

    def __init__(self, texts, limit):
        super().__init__(texts)
        self.max_model_len = limit
        self.tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens=True: [0] * (len(text) + 1))


def test_a_fewshot_prompt_too_long_for_the_context_drops_shots_until_it_fits():
    # an 8-shot prompt longer than the model's context (2,379 tokens for a 2,048-token model) must
    # not stop the loop: shots are dropped until the prompt fits
    full = len(fewshot_prompt(SEEDS[:8])) + 1
    limit = full - 20  # the 8 shots do not fit, fewer do
    llm = ShortContextLLM(["Write a limerick about a forgetful robot chef.",
                           "Name three rivers in South America and their lengths."], limit)
    got, stats = generate_prompts(llm, SEEDS, count=2, batch_size=2, seed=0, params_factory=params)
    assert len(got) == 2 and stats["shots_dropped"] >= 2 and stats["unsent"] == 0
    sent = [p for prompts, _ in llm.calls for p in prompts]
    assert all(len(p) + 1 < limit for p in sent)  # every request sent fits the context
    assert all(p.count("\nTask ") < 9 for p in sent)  # 8 shots and "Task 9:" would be 9
    # a context too short for even one shot: nothing is sent, the call ends on its rejection limit
    tiny = ShortContextLLM([], 10)
    got, stats = generate_prompts(tiny, SEEDS, count=2, batch_size=4, seed=0, params_factory=params,
                                  max_consecutive_rejections=8)
    assert got == [] and stats["unsent"] == 8 and tiny.calls == [] and stats["stopped_early"] == 1
