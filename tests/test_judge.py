"""The judge prompt, score parsing on adversarial outputs, and both judging modes on a fake engine."""
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from srlm_engine.io import DataError
from srlm_engine.judge import (DEFAULT_TEMPLATE, Judgment, expected_score, fill_template,
                               item_seed, judge_expected, judge_samples, load_template, parse_score,
                               score_tokens)


# --------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, want", [
    ("Relevant and clear.\nScore: 4", 4),
    ("Score: 0", 0),
    ("Score: 5", 5),
    # several score lines: the last one wins, even when it is invalid or holds no number
    ("Score: 2\nOn reflection it covers more.\nScore: 3", 3),
    ("Score: 3\nScore: 9", None),
    ("Score: 3\nScore: N/A", None),
    ("Score: 4\nScore:", None),
    # a sum gives the total after its last "="; a range or an unfinished expression is no score
    ("Score: 1+1+1+0+1 = 4", 4),
    ("Score: 1 + 1 + 0 + 1 + 1 = 4", 4),
    ("Score = 1+1+1 = 3", 3),
    ("Total score: 1+1+1+0+1 = 4/5", 4),
    ("Score: 1+1+1+1+1+1 = 6", None),
    ("Score: 1+1+0+1+1 =", None),
    ("Score: 2+2", None),
    ("Score: 3-4", None),
    ("Score: 3 - 4", None),
    ("Score: 3 to 4", None),
    ("Score: 3 or 4", None),
    ("Score: 4,5", None),
    ("Score: 4, since it is clear", 4),
    ("Score: 4 - clear and complete", 4),
    # labelled terms: a sum with no total is no score; a total with its parts in brackets is the total
    ("Score: 1 (relevance) + 1 (coverage)", None),
    ("Score: 1 (relevance) + 1 (coverage) + 1 (usefulness) = 3", 3),
    ("Score: 4 (1+1+1+1)", 4),
    ("Score: 4 (1 + 1 + 1 + 1 + 0)", 4),
    ("Score: 3 (good), 4 if it cited sources", None),
    ("Score: 3 (out of 5)", 3),
    ("Score: 2 (relevant) - lacks detail", 2),
    # fractions out of 5 are read; other scales are not
    ("Good.\nScore: 4/5", 4),
    ("Score: 4 out of 5", 4),
    ("Score: 8/10", None),
    # decimals: the rubric adds whole points
    ("Score: 4.5", None),
    ("Score: 4.0", 4),
    # out of range
    ("Score: 7", None),
    ("Score: -1", None),
    ("Score: 45", None),
    # no score at all, or one only mentioned inside the justification
    ("The answer is fine but short.", None),
    ("I would give this a score of 4 since it is relevant.", None),
    ("It deserves Score: 4 in my view, though it rambles.", None),
    ("A score of 5 would be too generous.\nScore: 3", 3),
    ("Score: the answer is relevant", None),
    # unicode digits: fullwidth (NFKC) and Arabic-Indic (Unicode decimal digits)
    ("Score: \uff14", 4),
    ("\uff33\uff43\uff4f\uff52\uff45\uff1a\uff15", 5),
    ("Score: \u0663", 3),
    # markdown and other decorations
    ("**Score:** 3", 3),
    ("**Score: 2**", 2),
    ("### Final score: 1", 1),
    ("score: 4 points.", 4),
    ("Score: [5]", 5),
    ("Score:\n4", None),
    # a score statement that begins a sentence after the justification, on the same line
    ("It covers every part of the question, so it earns 4 points. Score: 4", 4),
    ("Relevant and clear! **Score:** 5", 5),
    ("Is it useful? Score: 2", 2),
    ("Short. Score: 3-4", None),  # the same rules for what it states
    ("Score: 2\nOn reflection it is complete. Score: 4", 4),  # the last statement wins
    ("Score: 4. Score: 9", None),
    ("It gets a score: 4 from me.", None),  # mid-sentence, after no sentence end
    ("I'd give it a score of 4. It is fine.", None),
])
def test_parse_score(text, want):
    assert parse_score(text) == want


def test_default_template_contract():
    t = DEFAULT_TEMPLATE
    assert "{instruction}" in t and "{response}" in t
    assert t.rstrip().endswith("Score: <points>")
    assert "100 words" in t
    for c in ("Relevance", "Coverage", "Usefulness", "Clarity", "Expertise"):
        assert c in t


def test_fill_template_single_pass():
    t = "Q: {instruction} A: {response} {other}"
    got = fill_template(t, "about {response}?", "it is {x}")
    assert got == "Q: about {response}? A: it is {x} {other}"


def test_load_template(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Rate {response} for {instruction}.\nScore: <n>")
    assert load_template(good).startswith("Rate")
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate the response to {instruction}.")
    with pytest.raises(DataError, match=r"bad\.txt.*\{response\}"):
        load_template(bad)
    none = tmp_path / "none.txt"
    none.write_text("Rate it.")
    with pytest.raises(DataError, match=r"none\.txt.*\{instruction\} and \{response\}"):
        load_template(none)
    with pytest.raises(DataError, match="not found"):
        load_template(tmp_path / "missing.txt")


def test_judgment_counts():
    j = Judgment.from_texts(["Score: 4", "no idea", "Score: 3"])
    assert j.scores == [4, None, 3] and j.mean == 3.5 and (j.n_scored, j.n_unscored) == (2, 1)
    j = Judgment.from_texts(["?", "Score: 6"])
    assert j.mean is None and j.n_unscored == 2


# --------------------------------------------------------------------------- expected score

def test_expected_score_hand_computed():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0],      # 0.2 + 0.6 + 1.2 = 2.0
                      [0.05, 0.1, 0.15, 0.2, 0.0, 0.0],    # same shape, half the mass: renormalised -> 2.0
                      [1, 1, 1, 1, 1, 1],                  # uniform -> 2.5
                      [0, 0, 0, 0, 0, 1.0],                # certain 5
                      [0, 0.5, 0, 0, 0.5, 0]])             # (1 + 4) / 2 = 2.5
    got = expected_score(p.log())
    assert torch.allclose(got, torch.tensor([2.0, 2.0, 2.5, 5.0, 2.5], dtype=torch.float64))
    # fixed logits: softmax([0, ln 3, 0, 0, 0, 0]) = [1,3,1,1,1,1]/8 -> (3+2+3+4+5)/8 = 17/8
    logits = torch.tensor([[0.0, math.log(3), 0, 0, 0, 0]], dtype=torch.float64) + 11.0
    assert expected_score(logits).item() == pytest.approx(17 / 8, abs=1e-12)


def test_expected_score_range_and_degenerate():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(1000, 6, generator=g) * 30
    lp[::7, 2] = -math.inf
    e = expected_score(lp)
    assert e.shape == (1000,) and bool((e >= 0).all()) and bool((e <= 5).all())
    # no probability on any digit: unscored (NaN), not the uniform distribution's 2.5; the other
    # rows of the batch are unaffected
    dead = torch.tensor([[-math.inf] * 6, [0.0, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf]])
    got = expected_score(dead)
    assert math.isnan(got[0].item()) and got[1].item() == 0.0
    with pytest.raises(ValueError):
        expected_score(torch.zeros(2, 5))


# --------------------------------------------------------------------------- fakes

class CharTokenizer:
    """One token per character: digits are single tokens, ' 4' is two (Llama 3 / SmolLM style)."""

    def encode(self, s, add_special_tokens=False):
        return [ord(c) % 256 for c in s]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


class WordTokenizer(CharTokenizer):
    """GPT-2 style: a leading space joins the next word, so ' 4' is one token."""

    def __init__(self):
        self.vocab = {}

    def encode(self, s, add_special_tokens=False):
        return [self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r" ?[^\s]+|\s", s)]

    def decode(self, ids):
        words = {i: t for t, i in self.vocab.items()}
        return "".join(words[i] for i in ids)


@dataclass
class FakeLLM:
    """Records the prompts it gets, decoded: the judge must send token ids, never text (text would
    be encoded again with the tokenizer's BOS added)."""
    tokenizer: object
    texts: list = field(default_factory=list)       # scripted outputs, consumed in order
    vocab: int = 256
    digit_logprobs: dict = field(default_factory=dict)  # token id -> log-prob
    calls: list = field(default_factory=list)

    def _text(self, prompts):
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts)
        return [self.tokenizer.decode(p) for p in prompts]

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", self._text(prompts), params))
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for p in per_request:
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=self.texts.pop(0))
                                                 for _ in range(p["n"])]))
        return outs

    def next_token_logprobs(self, prompts, token_ids=None):
        self.calls.append(("logprobs", self._text(prompts)))
        lp = torch.full((len(prompts), self.vocab), -20.0)
        for tid, v in self.digit_logprobs.items():
            lp[:, tid] = v
        return lp if token_ids is None else lp[:, token_ids]


def params(**kw):
    return kw


# --------------------------------------------------------------------------- judge_samples

def test_judge_samples_one_request_per_item_with_n_k():
    llm = FakeLLM(CharTokenizer(), texts=["Fine.\nScore: 4", "Score: 5", "garbled",
                                          "Meh.\nScore: 2", "Score: 7", "nothing"])
    js = judge_samples(llm, ["What is 2+2?", "Name a color."], ["4", "Blue."], k=3, seed=7,
                       params_factory=params)
    assert len(llm.calls) == 1
    _, prompts, p = llm.calls[0]
    # one request per item, each with its own seed: sample j of two items must not share random draws
    assert len(prompts) == 2 and p == [dict(n=3, temperature=0.7, top_p=0.9, max_tokens=256, seed=item_seed(7, i))
                                       for i in range(2)]
    assert len({item_seed(7, 0), item_seed(7, 1), item_seed(8, 0), item_seed(7, 0)}) == 3
    assert item_seed(None, 3) is None and 0 <= item_seed(2**62, 10**6) < 2**63
    assert prompts[0].startswith("<user>") and prompts[0].endswith("</user><assistant>")
    assert "What is 2+2?" in prompts[0] and "[Answer]\n4" in prompts[0]
    assert js[0].scores == [4, 5, None] and js[0].mean == 4.5 and js[0].n_unscored == 1
    assert js[1].scores == [2, None, None] and js[1].mean == 2.0 and js[1].n_scored == 1
    assert judge_samples(llm, [], [], params_factory=params) == []
    with pytest.raises(ValueError):
        judge_samples(llm, ["a"], ["b", "c"], params_factory=params)


# --------------------------------------------------------------------------- judge_expected

def test_score_tokens_follow_the_tokenizer():
    suffix, ids = score_tokens(CharTokenizer())
    assert suffix == "Score: " and ids == [ord(str(d)) for d in range(6)]
    wt = WordTokenizer()
    suffix, ids = score_tokens(wt)
    assert suffix == "Score:" and ids == [wt.vocab[f" {d}"] for d in range(6)]


def sentencepiece_tokenizer():
    """Llama 2's tokenizer.json in small: Prepend("▁") and Replace(" ", "▁") normalizers, BPE with
    byte fallback, digits split into single pieces, so no "▁4" piece: "4" alone encodes to
    ["▁", "4"], while after "Score: " the digit is the one token "4"."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers

    from srlm_engine.tokenizer import Tokenizer
    pieces = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["▁", "S", "c", "o", "r", "e", ":", "Sc", "Sco", "Scor", "Score"] + list("0123456789"))
    merges = [("S", "c"), ("Sc", "o"), ("Sco", "r"), ("Scor", "e")]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(pieces)}, merges, unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"}, "{{ messages[0].content }}")


def test_score_tokens_sentencepiece_digit_after_a_space_piece():
    # Llama 2 (the paper's model), TinyLlama, Mistral: the digit in "\nScore: 4" is one token,
    # though "4" alone is two; this raised "more than one token each" before.
    tok = sentencepiece_tokenizer()
    assert len(tok.encode("4", add_special_tokens=False)) == 2
    suffix, ids = score_tokens(tok)
    assert suffix == "Score: " and ids == [tok.token_to_id(str(d)) for d in range(6)]
    for d, i in enumerate(ids):  # the very token training puts after "Score: "
        assert tok.encode(f"\nScore: {d}", add_special_tokens=False)[-1] == i


def test_judge_expected_prefix():
    tok = CharTokenizer()
    probs = [0.1, 0.2, 0.3, 0.4, 0.0, 0.0]
    llm = FakeLLM(tok, digit_logprobs={ord(str(d)): math.log(p) if p else -math.inf
                                       for d, p in enumerate(probs)})
    got = judge_expected(llm, ["q1", "q2"], ["r1", "r2"], after="prefix")
    assert got == pytest.approx([2.0, 2.0])
    assert [c[0] for c in llm.calls] == ["logprobs"]  # one pass, nothing generated
    assert all(p.endswith("<assistant>Score: ") for p in llm.calls[0][1])


def test_judge_expected_no_digit_mass_is_unscored():
    # every digit at -inf: nothing to take an expectation of, so the item is unscored (None)
    llm = FakeLLM(CharTokenizer(), digit_logprobs={ord(str(d)): -math.inf for d in range(6)})
    assert judge_expected(llm, ["q"], ["r"]) == [None]


def test_judge_expected_after_judgment():
    wt = WordTokenizer()
    ids = score_tokens(wt)[1]
    llm = FakeLLM(wt, texts=["Relevant and clear.\n", "Off topic.\nScore:"], vocab=512,
                  digit_logprobs={ids[5]: math.log(0.6), ids[4]: math.log(0.2)})
    got = judge_expected(llm, ["q1", "q2"], ["r1", "r2"], after="judgment", params_factory=params)
    # p(4) : p(5) = 1 : 3 after renormalising (the other digits sit at exp(-20)): ~ 4.75
    assert got == pytest.approx([4.75, 4.75], abs=1e-6)
    (_, _, p), (_, lp_prompts) = llm.calls
    assert p["n"] == 1 and p["temperature"] == 0.0 and p["stop"] == ["Score:"]
    assert lp_prompts[0].endswith("<assistant>Relevant and clear.\nScore:")
    assert lp_prompts[1].endswith("<assistant>Off topic.\nScore:")
    with pytest.raises(ValueError, match="after"):
        judge_expected(llm, ["q"], ["r"], after="both")


# --------------------------------------------------------------------------- special tokens

def bos_tokenizer():
    """A Llama-style tokenizer: its post-processor adds BOS, and its chat template writes one too."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors

    from srlm_engine.tokenizer import Tokenizer
    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hi", "there", "Score", ":"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words + list("012345"))}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return Tokenizer(hf, {"bos_token": "<s>", "eos_token": "</s>"}, template)


@dataclass
class EncodingLLM:
    """Encodes what it is given exactly as the engine does (LLM._encode_all: text gets the
    tokenizer's special tokens, ids are taken as they are) and records the ids."""
    tokenizer: object
    seen: list = field(default_factory=list)

    def _ids(self, prompts):
        from srlm_engine.engine.llm import LLM
        engine = SimpleNamespace(tokenizer=self.tokenizer, config=SimpleNamespace(vocab_size=self.tokenizer.vocab_size))
        ids = LLM._encode_all(engine, prompts)
        self.seen += ids
        return ids

    def generate(self, prompts, params, use_tqdm=False):
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        return [SimpleNamespace(outputs=[SimpleNamespace(text="hi there")] * p["n"])
                for p, _ in zip(per_request, self._ids(prompts))]

    def next_token_logprobs(self, prompts, token_ids=None):
        lp = torch.zeros(len(self._ids(prompts)), self.tokenizer.vocab_size)
        return lp if token_ids is None else lp[:, token_ids]


def test_judge_prompts_carry_one_bos():
    tok = bos_tokenizer()
    bos = tok.token_to_id("<s>")
    assert tok.encode("hi", add_special_tokens=True) == [bos, tok.token_to_id("hi")]  # the trap
    llm = EncodingLLM(tok)
    judge_samples(llm, ["hi"], ["there"], k=2, params_factory=params)
    judge_expected(llm, ["hi"], ["there"], after="prefix")
    judge_expected(llm, ["hi"], ["there"], after="judgment", params_factory=params)
    assert len(llm.seen) == 4
    for ids in llm.seen:  # the template's BOS, once: what training and LLM.chat feed the model
        assert ids[0] == bos and ids.count(bos) == 1, ids[:4]



# --------------------------------------------------------------------------- long prompts

# the judge prompt of a one-character answer, in CharTokenizer's tokens, plus 100
SHORT_CONTEXT = len(CharTokenizer().apply_chat_template([{"role": "user", "content": fill_template(
    DEFAULT_TEMPLATE, "q1", "a")}])) + len("Score: ") + 100


@dataclass
class ShortContextLLM(FakeLLM):
    """Refuses a prompt that leaves no room for one token, as the engine does."""
    max_model_len: int = SHORT_CONTEXT

    def generate(self, prompts, params, use_tqdm=False):
        assert all(len(p) < self.max_model_len for p in prompts), "sent a prompt that does not fit"
        return super().generate(prompts, params, use_tqdm)

    def next_token_logprobs(self, prompts, token_ids=None):
        assert all(len(p) < self.max_model_len for p in prompts), "sent a prompt that does not fit"
        return super().next_token_logprobs(prompts, token_ids)


def test_an_answer_too_long_for_the_judge_is_unscored_not_a_failed_batch():
    # a 2k-context model judging a long answer: that item is unscored, the others are judged
    long = "x" * 200
    llm = ShortContextLLM(CharTokenizer(), texts=["Score: 4", "Score: 2"])
    js = judge_samples(llm, ["q1", "q2", "q3"], ["a", long, "b"], k=1, params_factory=params)
    assert [j.scores for j in js] == [[4], [None], [2]] and js[1].mean is None and js[1].n_unscored == 1
    llm = ShortContextLLM(CharTokenizer(), digit_logprobs={ord("3"): 0.0})
    assert judge_expected(llm, ["q1", "q2"], [long, "a"]) == [None, pytest.approx(3.0)]
    # after="judgment": the judged prompt grows by the justification, and may stop fitting then
    llm = ShortContextLLM(CharTokenizer(), texts=["ok", "y" * 120], digit_logprobs={ord("5"): 0.0})
    got = judge_expected(llm, ["q1", "q2", "q3"], ["a", long, "b"], after="judgment", params_factory=params)
    assert got == [pytest.approx(5.0), None, None]
    assert len(llm.calls[0][1]) == 2 and len(llm.calls[1][1]) == 1
