"""LLM-as-a-Judge: the additive 5-point judge prompt, score parsing, and two ways to score.

`judge_samples` samples K judgments per (instruction, response) and averages the parsed scores,
as the paper does (K = 3, temperature 0.7, top_p 0.9). `judge_expected` reads the model's
distribution over the score digits right after "Score:" and returns its expected value: one
forward pass per item, unscored (None) only where the digits carry no probability at all.

The engine is duck-typed: `llm.generate(prompts, params, use_tqdm=True)` (a progress bar with tokens/s),
`llm.next_token_logprobs(prompts) -> Tensor [B, V]` and `llm.tokenizer` (`encode`,
`apply_chat_template`). Prompts go to the engine as token ids, encoded without special tokens:
the rendered chat template already holds its BOS, as in `LLM.chat` and in training. Nothing here
imports the engine at import time.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import DataError

PLACEHOLDERS = ("{instruction}", "{response}")
SCORE_PREFIX = "Score:"
MAX_SCORE = 5

# The paper's additive rubric, one line per point. Every judge prompt holds it, so its length is
# paid on every judgment and every EFT example: this wording (180 SmolLM2 tokens) keeps each
# criterion's sense in a third of the paper's words.
DEFAULT_TEMPLATE = """\
Grade the assistant's answer to the user's request from 0 to 5: start at 0 and add one point for \
each criterion the answer meets.
1. Relevance: it is on topic and bears on the request, even if partly.
2. Coverage: it deals with a good part of what was asked.
3. Usefulness: it handles the core of the request in a way the user can act on.
4. Clarity: it answers directly and completely, as an assistant, and is well organised.
5. Expertise: it is accurate, expert and closely fitted to the request, with nothing extraneous.

[Request]
{instruction}

[Answer]
{response}

Justify the total in at most 100 words, then write it as the final line:
Score: <points>"""


# --------------------------------------------------------------------------- templates

def check_template(template: str, source: str = "judge template") -> str:
    """Return `template` if it holds both placeholders, else raise DataError naming `source`
    and the missing placeholder(s)."""
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise DataError(f"{source}: missing placeholder {' and '.join(missing)} "
                        f"(a judge template must hold both {PLACEHOLDERS[0]} and {PLACEHOLDERS[1]})")
    return template


def load_template(path: str | Path) -> str:
    """Read a user judge template (UTF-8 text) and check it at once (see `check_template`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return check_template(path.read_text(encoding="utf-8"), str(path))


_PLACEHOLDER_RE = re.compile(r"\{(instruction|response)\}")


def fill_template(template: str, instruction: str, response: str) -> str:
    """Fill both placeholders in one pass: braces elsewhere in the template are left alone, and a
    placeholder that appears inside the instruction or response text is not filled again."""
    values = {"instruction": instruction, "response": response}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


# --------------------------------------------------------------------------- parsing

# A score statement starts a line (after markdown: **, #, >, -, `) or a sentence on it (after
# ". ", "! ", "? ") with "Score", optionally "Final/Total/Overall", then ":" or "="; the rest of
# the line is what it states. Text is NFKC-normalised first (fullwidth "Ｓｃｏｒｅ：４" ->
# "Score:4"); `\d` then matches any Unicode decimal digit (Arabic-Indic "٣" too) and int() reads
# it, so such digits parse.
_SCORE_LINE_RE = re.compile(
    r"(?:^[ \t>#*_`\-]*|(?<=[.!?])[ \t]+[*_`]*)(?:final[ \t]+|total[ \t]+|overall[ \t]+)?score[ \t*_`]*[:=]",
    re.IGNORECASE | re.MULTILINE,
)
# The number a score line states, with its markdown, brackets and "/5" or "out of 5".
_NUMBER_RE = re.compile(
    r"[ \t*_`]*[\[(<]?(?P<int>-?\d+)(?:\.(?P<frac>\d+))?[\])>]?"
    r"[ \t]*(?:(?:/|out[ \t]+of)[ \t]*(?P<den>\d+(?:\.\d+)?))?(?P<tail>.*)$",
    re.IGNORECASE,
)
# A number that goes on into another one: a sum or product ("1+1+0"), a range ("3-4", "3 to 4",
# "3 or 4") or a decimal comma ("4,5"). Without an "=" result it states no single score.
_CONTINUED_RE = re.compile(r"[ \t]*(?:[-+*×x–—~,]|to\b|or\b)[ \t]*\d", re.IGNORECASE)
# A label in brackets right after a number: "1 (relevance) + 1 (coverage)" goes on past it, while
# "4 (1+1+1+1)" states 4 and shows its parts.
_LABEL_RE = re.compile(r"[ \t]*\([^()]*\)")


def has_score_line(text: str) -> bool:
    """Whether text holds a score line, whatever it states ("Score: N/A" too)."""
    return _SCORE_LINE_RE.search(unicodedata.normalize("NFKC", text)) is not None


def parse_score(text: str) -> int | None:
    """The score of a judgment: what its LAST score line states, or None (unscored).

    A score line is a line, or a sentence on a line, that begins with "Score:" (case-insensitive,
    markdown allowed, e.g. "**Score:** 3", "### Final score: 3", "... so it earns 4 points.
    Score: 4"); "score" in the middle of a sentence ("I'd give it a score of 4", "it gets a
    score: 4") is not one. The judge states its score at the end, so only the last score
    statement counts: if it holds no valid score ("Score: N/A", "Score: 9"), the judgment is
    unscored even when an earlier line held one. Rules for what the line states:
    - an integer 0..5 -> that integer; out of range ("Score: 7", "-1") -> None;
    - "4/5" or "4 out of 5" -> 4; any other denominator ("8/10") -> None (not our scale);
    - a decimal with a non-zero fraction ("4.5", "4,5") -> None, since the rubric adds whole
      points; "4.0" -> 4;
    - a sum with its result ("1+1+0+1+1 = 4") -> the number after the last "=", by the same rules;
      a range or an expression with no "=" result ("3-4", "2+2", "1 (relevance) + 1 (coverage)")
      -> None: never guessed; a total with its parts in brackets ("4 (1+1+1+1)") -> the total;
    - fullwidth and other Unicode decimal digits ("４", "٤") are read as their value.
    """
    text = unicodedata.normalize("NFKC", text)
    last = None
    for last in _SCORE_LINE_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end():].partition("\n")[0]
    stated = rest.rpartition("=")[2]  # a sum's result; the whole rest of the line if there is no "="
    m = _NUMBER_RE.match(stated)
    if m is None or m["tail"][:1].isdigit() or _CONTINUED_RE.match(_LABEL_RE.sub("", m["tail"], count=1)):
        return None
    if m["frac"] is not None and int(m["frac"]) != 0:
        return None
    if m["den"] is not None and float(m["den"]) != MAX_SCORE:
        return None
    value = int(m["int"])
    return value if 0 <= value <= MAX_SCORE else None


# --------------------------------------------------------------------------- sampled judging

@dataclass
class Judgment:
    """K sampled judgments of one response. `scores[i]` is None where `texts[i]` had no valid
    score line; `mean` averages the parsed ones and is None when none parsed."""

    texts: list[str]
    scores: list[int | None]
    mean: float | None
    n_scored: int
    n_unscored: int

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "Judgment":
        scores = [parse_score(t) for t in texts]
        parsed = [s for s in scores if s is not None]
        mean = sum(parsed) / len(parsed) if parsed else None
        return cls(list(texts), scores, mean, len(parsed), len(scores) - len(parsed))


def _default_params(**kw):
    from .engine.sampler import SamplingParams  # lazy: the engine is optional for this module

    return SamplingParams(**kw)


def render_judge_prompts(tokenizer, instructions: Sequence[str], responses: Sequence[str],
                         template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The filled judge prompt as one user turn, rendered by the model's chat template with the
    assistant turn opened."""
    if len(instructions) != len(responses):
        raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses")
    check_template(template)
    return [tokenizer.apply_chat_template([{"role": "user", "content": fill_template(template, i, r)}],
                                          add_generation_prompt=True)
            for i, r in zip(instructions, responses)]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts. No special tokens are added: the chat template's text
    already starts with its BOS (where the model has one), and the tokenizer's own BOS on top
    would make two, which the model never saw in training."""
    return [list(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]


def judge_samples(llm, instructions: Sequence[str], responses: Sequence[str], *,
                  template: str = DEFAULT_TEMPLATE, k: int = 3, temperature: float = 0.7,
                  top_p: float = 0.9, max_tokens: int = 256, seed: int | None = None,
                  params_factory: Callable | None = None) -> list[Judgment]:
    """Judge each (instruction, response) K times and average the parsed scores.

    All items go to the engine in one `generate` call; each item is ONE request with n=k, so the
    K samples share the judge prompt's KV blocks. Each item gets its own seed, mixed from `seed`
    and its index: one seed for all would give sample j of every item the same random draws, and
    the K samples of near-identical answers would agree more often than independent ones. Returns
    one Judgment per item, in order; an item whose judge prompt does not fit the engine's context
    gets k empty, unscored samples."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    prompts = render_judge_prompts(llm.tokenizer, instructions, responses, template)
    if not prompts:
        return []
    make = params_factory or _default_params
    ids = encode_prompts(llm.tokenizer, prompts)
    out = [Judgment.from_texts([""] * k) for _ in ids]  # k unscored samples where nothing ran
    fit = fitting(llm, ids)
    if fit:
        params = [make(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=item_seed(seed, i))
                  for i in fit]
        for i, o in zip(fit, llm.generate([ids[i] for i in fit], params, use_tqdm=True)):
            out[i] = Judgment.from_texts([c.text for c in o.outputs])
    return out


def item_seed(seed: int | None, i: int) -> int | None:
    """Item i's seed of a call seeded with `seed` (None stays unseeded)."""
    return None if seed is None else (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xD6E8FEB86659FD93) % 2**63


def fitting(llm, ids: Sequence[list[int]]) -> list[int]:
    """Indices of the judge prompts that fit the engine's context with room for one token (all,
    where the engine states no `max_model_len`). The others are not sent and stay unscored: one
    long response must not stop a whole batch of judgments (the engine refuses such a request)."""
    limit = getattr(llm, "max_model_len", None)
    return [i for i, t in enumerate(ids) if limit is None or len(t) < limit]


# --------------------------------------------------------------------------- expected score

def expected_score(logprobs_of_digits: torch.Tensor) -> torch.Tensor:
    """E[score] under the digit distribution renormalised over the six scores.

    logprobs_of_digits: [B, 6], log p("0") .. log p("5") (any common offset; unnormalised is fine).
    Returns [B] float64 in [0, 5]: sum_s s * softmax(lp)_s. A row with every entry -inf carries
    no information: it is NaN (unscored), never a guessed middle score; so is a row holding NaN."""
    lp = logprobs_of_digits.to(torch.float64)
    if lp.ndim != 2 or lp.shape[1] != MAX_SCORE + 1:
        raise ValueError(f"expected [B, {MAX_SCORE + 1}] log-probs, got {tuple(lp.shape)}")
    p = torch.softmax(lp, dim=1)  # [B, 6]; an all -inf row gives NaN
    return p @ torch.arange(MAX_SCORE + 1, dtype=torch.float64)


def score_tokens(tokenizer) -> tuple[str, list[int]]:
    """How to ask for the score digit: (prompt suffix, ids of the tokens for 0..5).

    Follows how the tokenizer splits the EFT target "...\\nScore: 4", so the model is read at the
    same position it was trained to write the digit:
    - if " 4" is one token there (GPT-2 style BPE), the suffix is "Score:" and the ids are the
      tokens " 0" .. " 5";
    - else, if "4" is one token after "Score: " (Llama 3, SmolLM, SentencePiece with split
      digits), the suffix is "Score: " and the ids are "0" .. "5" as encoded there (Llama 2's
      SentencePiece encodes "4" alone as "▁", "4": only the token in context counts);
    - else, if each digit alone encodes to one token, the suffix is "Score: " and those ids are
      used (the split could not be confirmed in context).
    Raises ValueError if the tokenizer has no single-token digits."""
    enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    digits = [str(d) for d in range(MAX_SCORE + 1)]
    for suffix, piece in ((SCORE_PREFIX, " {}"), (SCORE_PREFIX + " ", "{}")):
        base = enc("\n" + suffix)
        ids = []
        for d in digits:
            full = enc("\n" + suffix + piece.format(d))
            if full[:-1] != base:  # the digit is more than the one token after the suffix
                break
            ids.append(full[-1])
        else:
            return suffix, ids
    alone = [enc(d) for d in digits]
    if all(len(a) == 1 for a in alone):
        return SCORE_PREFIX + " ", [a[0] for a in alone]
    raise ValueError("tokenizer encodes the digits 0..5 to more than one token each; "
                     "the expected-score judge needs single-token digits")


def judge_expected(llm, instructions: Sequence[str], responses: Sequence[str], *,
                   template: str = DEFAULT_TEMPLATE, after: str = "prefix",
                   temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 256,
                   seed: int | None = None, params_factory: Callable | None = None) -> list[float | None]:
    """Expected judge score in [0, 5] per item, from the next-token distribution over the digits;
    None (unscored) where the digits have no probability at all, or where the judge prompt does
    not fit the engine's context.

    after="prefix": the assistant turn starts with the score prefix at once (no justification).
    after="judgment": the justification is generated first (greedy by default; stop at "Score:"),
    then the score prefix is appended on a new line. Either way, one `next_token_logprobs` call
    reads the digit log-probs (see `score_tokens` for which tokens), and `expected_score` turns
    them into the expectation."""
    if after not in ("prefix", "judgment"):
        raise ValueError(f"after must be 'prefix' or 'judgment', got {after!r}")
    prompts = render_judge_prompts(llm.tokenizer, instructions, responses, template)
    if not prompts:
        return []
    suffix, digit_ids = score_tokens(llm.tokenizer)
    # keep: the items still judged (prompts[j] is item keep[j]'s); the others do not fit the
    # engine's context and stay unscored (see `fitting`)
    keep = list(range(len(prompts)))
    if after == "judgment":
        params = (params_factory or _default_params)(n=1, temperature=temperature, top_p=top_p,
                                                     max_tokens=max_tokens, seed=seed,
                                                     stop=[SCORE_PREFIX])
        ids = encode_prompts(llm.tokenizer, prompts)
        keep = fitting(llm, ids)
        outs = llm.generate([ids[i] for i in keep], params, use_tqdm=True) if keep else []
        prompts = [prompts[i] + _strip_score_prefix(o.outputs[0].text).rstrip() + "\n"
                   for i, o in zip(keep, outs)]
    ids = encode_prompts(llm.tokenizer, [p + suffix for p in prompts])
    fit = fitting(llm, ids)
    scores = [None] * len(instructions)
    if fit:
        logprobs = llm.next_token_logprobs([ids[j] for j in fit], token_ids=digit_ids)  # [B, 6]
        for j, x in zip(fit, expected_score(logprobs).tolist()):
            scores[keep[j]] = None if math.isnan(x) else x
    return scores


def _strip_score_prefix(text: str) -> str:
    # Engines that keep the stop string in the output would leave "Score:" at the end.
    return text[: -len(SCORE_PREFIX)] if text.endswith(SCORE_PREFIX) else text


__all__ = ["DEFAULT_TEMPLATE", "Judgment", "check_template", "encode_prompts", "expected_score",
           "fill_template", "fitting", "has_score_line", "judge_expected", "judge_samples", "load_template",
           "parse_score", "render_judge_prompts", "score_tokens"]
