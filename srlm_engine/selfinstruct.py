"""Self-instruction creation: new prompts by few-shot prompting, kept only if they pass filters.

The few-shot prompt is a plain continuation, not a chat turn, so it works with a base model and
with a chat model alike (a chat model simply continues the text):

    Below is a list of tasks that people asked an AI assistant to do. Each task is self-contained
    and can be answered with text alone.

    Task 1: <shot>
    ...
    Task 8: <shot>
    Task 9:

generation stops at "\\nTask", and the text up to there is the candidate. Shots: 6 seed prompts and
2 prompts generated earlier in the run when there are 2, else 8 seed prompts (fewer if the seed
is smaller), shuffled; sampled at temperature 0.6, top_p 0.9 (the paper's settings).

Filters (`PromptFilter`), in this order, each rejection counted under its reason:
    empty, truncated (hit max_tokens), too_short (< 3 words), too_long (> 150 words),
    blocklist (a word or phrase of BLOCKLIST), duplicate (same text after lowercasing, dropping
    punctuation and collapsing whitespace), similar (ROUGE-L F1 > 0.7 against a seed or kept prompt).
"""
from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

# Requests a text-only model cannot act on: seeing or producing images, sound or files, or
# browsing. Self-Instruct's list plus a few of the same kind. Matched as whole words on
# lowercased text, so "mapping" or "profile" pass but "plot" (also "the plot of a novel") is out.
BLOCKLIST = ("image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs",
             "chart", "diagram", "flowchart", "video", "videos", "audio", "music", "file", "files",
             "attached", "attachment", "screenshot", "draw", "drawing", "plot", "map", "maps",
             "go to", "url", "urls", "link below", "website below")

HEADER = ("Below is a list of tasks that people asked an AI assistant to do. Each task is "
          "self-contained and can be answered with text alone.\n\n")
REASONS = ("empty", "truncated", "too_short", "too_long", "blocklist", "duplicate", "similar")

_WORD_RE = re.compile(r"[^\W_]+")        # letters and digits, Unicode-aware
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace: the key for exact duplicates."""
    return " ".join(text.lower().translate(_PUNCT).split())


def rouge_tokens(text: str) -> list[str]:
    """Lowercase runs of letters and digits. On ASCII text this is rouge-score's tokenizer
    (lowercase, non-alphanumerics as separators, no stemming); other letters are kept here."""
    return _WORD_RE.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro):
    one big-integer step per element of `b`, O(len(b) * len(a) / 64) word operations."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # bit i clear <=> the LCS row grew at column i
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


class _Postings:
    """For one word: the indices of indexed prompts holding it and how often, in growable arrays."""

    __slots__ = ("ids", "counts", "n")

    def __init__(self):
        self.ids, self.counts, self.n = np.empty(8, np.int64), np.empty(8, np.int64), 0

    def add(self, idx: int, count: int) -> None:
        if self.n == len(self.ids):
            self.ids, self.counts = np.resize(self.ids, 2 * self.n), np.resize(self.counts, 2 * self.n)
        self.ids[self.n], self.counts[self.n] = idx, count
        self.n += 1


class PromptFilter:
    """Decides whether a candidate prompt is kept; `check` returns None (keep) or the reason.

    Similarity search: LCS <= the bag-of-words overlap sum_w min(count_a(w), count_b(w)), so
    F1 <= 2 * overlap / (len_a + len_b). An inverted index gives the overlap with every indexed
    prompt in a few numpy ops; the exact bit-parallel LCS runs only where that bound exceeds the
    threshold. Seed prompts are indexed for similarity and duplicates but never filtered."""

    def __init__(self, seed_prompts: Iterable[str] = (), *, min_words: int = 3, max_words: int = 150,
                 max_rouge: float = 0.7, blocklist: Iterable[str] = BLOCKLIST):
        self.min_words, self.max_words, self.max_rouge = min_words, max_words, max_rouge
        words = sorted({normalize(w) for w in blocklist if normalize(w)})
        self._block = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b") if words else None
        self._seen: set[str] = set()
        self._vocab: dict[str, int] = {}
        self._tokens: list[list[int]] = []
        self._lengths = np.empty(64, np.int64)
        self._postings: dict[int, _Postings] = {}
        self.stats = Counter({r: 0 for r in REASONS})
        for p in seed_prompts:
            self.add(p)

    def _ids(self, text: str) -> list[int]:
        return [self._vocab.setdefault(t, len(self._vocab)) for t in rouge_tokens(text)]

    def add(self, prompt: str) -> None:
        """Index a prompt for the duplicate and similarity checks (no checks run)."""
        self._seen.add(normalize(prompt))
        ids, idx = self._ids(prompt), len(self._tokens)
        self._tokens.append(ids)
        if idx == len(self._lengths):
            self._lengths = np.resize(self._lengths, 2 * idx)
        self._lengths[idx] = len(ids)
        for w, c in Counter(ids).items():
            if w not in self._postings:
                self._postings[w] = _Postings()
            self._postings[w].add(idx, c)

    def max_similarity(self, prompt: str) -> float:
        """Highest ROUGE-L F1 against any indexed prompt, computed exactly only where it could
        exceed `max_rouge`; below that the value returned is only known to be <= max_rouge."""
        ids, n = self._ids(prompt), len(self._tokens)
        if not ids or not n:
            return 0.0
        overlap = np.zeros(n, np.int64)
        for w, c in Counter(ids).items():
            p = self._postings.get(w)
            if p is not None:
                overlap[p.ids[:p.n]] += np.minimum(p.counts[:p.n], c)
        bound = 2.0 * overlap / (len(ids) + self._lengths[:n])
        best = 0.0
        for j in np.flatnonzero(bound > self.max_rouge):
            other = self._tokens[j]
            best = max(best, 2.0 * lcs_length(ids, other) / (len(ids) + len(other)))
        return best

    def check(self, prompt: str) -> str | None:
        """The first filter the prompt fails, or None if it passes them all (nothing is indexed)."""
        text = prompt.strip()
        if not text:
            return "empty"
        n = len(text.split())
        if n < self.min_words:
            return "too_short"
        if n > self.max_words:
            return "too_long"
        # on the text with its punctuation: normalize() would join "audio/video" into one word
        if self._block is not None and self._block.search(" ".join(text.lower().split())):
            return "blocklist"
        if normalize(text) in self._seen:
            return "duplicate"
        if self.max_similarity(text) > self.max_rouge:
            return "similar"
        return None

    def offer(self, prompt: str) -> bool:
        """Check a prompt; keep (index) it if it passes, else count the reason. True if kept."""
        reason = self.check(prompt)
        if reason is None:
            self.add(prompt.strip())
            return True
        self.stats[reason] += 1
        return False


def fewshot_prompt(shots: Sequence[str]) -> str:
    """The continuation prompt for the given shots, ending with the next "Task N:"."""
    lines = [f"Task {i}: {s.strip()}" for i, s in enumerate(shots, 1)]
    return HEADER + "\n".join(lines) + f"\nTask {len(shots) + 1}:"


def pick_shots(rng: random.Random, seed_prompts: Sequence[str], generated: Sequence[str],
               n_shots: int = 8, n_generated: int = 2) -> list[str]:
    """6 seed + 2 generated prompts when 2 generated exist, else all 8 from the seed; shuffled."""
    g = n_generated if len(generated) >= n_generated else 0
    shots = rng.sample(list(seed_prompts), min(n_shots - g, len(seed_prompts)))
    shots += rng.sample(list(generated), g)
    rng.shuffle(shots)
    return shots


def _default_params(**kw):
    from .engine.sampler import SamplingParams  # lazy: the engine is optional for this module

    return SamplingParams(**kw)


def generate_prompts(llm, seed_prompts: Sequence[str], count: int, *, seed: int = 0,
                     batch_size: int = 64, temperature: float = 0.6, top_p: float = 0.9,
                     max_tokens: int = 256, max_consecutive_rejections: int = 2000,
                     prompt_filter: PromptFilter | None = None,
                     params_factory: Callable | None = None) -> tuple[list[str], dict[str, int]]:
    """Generate up to `count` new prompts that pass `prompt_filter` (default: PromptFilter over
    the seed prompts). Each round sends `batch_size` few-shot prompts, each with its own shots,
    as one `generate` call with n=1, each request with its own seed drawn from `seed` (one seed
    for the round gave every request the same random draws). Stops when `count` are
    kept, or after `max_consecutive_rejections` candidates in a row were rejected.

    A few-shot prompt too long for the engine's context (`llm.max_model_len`, where it states one)
    drops its last shots until it fits, down to one; one that does not fit even so is not sent.

    Returns (prompts, stats): stats counts every rejection by reason (REASONS), plus `attempts`,
    `kept`, `stopped_early` (1 if it stopped on rejections before reaching `count`), `shots_dropped`
    and `unsent` (requests that did not fit with one shot)."""
    if not seed_prompts:
        raise ValueError("self-instruction needs at least one seed prompt")
    rng = random.Random(seed)
    filt = prompt_filter if prompt_filter is not None else PromptFilter(seed_prompts)
    factory = params_factory or _default_params
    kept: list[str] = []
    attempts = streak = dropped = unsent = 0
    while len(kept) < count and streak < max_consecutive_rejections:
        shot_lists = [pick_shots(rng, seed_prompts, kept) for _ in range(batch_size)]
        seeds = [rng.randrange(2**31) for _ in shot_lists]  # drawn for every request, sent or not
        prompts, params = [], []
        for shots, seed_r in zip(shot_lists, seeds):
            prompt, cut = _fitting_prompt(llm, shots)
            dropped += cut
            if prompt is None:
                unsent += 1
                streak += 1
                continue
            prompts.append(prompt)
            params.append(factory(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                  seed=seed_r, stop=["\nTask"]))
        if not prompts:
            continue
        for out in llm.generate(prompts, params, use_tqdm=True):
            if len(kept) >= count or streak >= max_consecutive_rejections:
                break
            attempts += 1
            o = out.outputs[0]
            if getattr(o, "finish_reason", None) == "length":
                filt.stats["truncated"] += 1
                streak += 1
            elif filt.offer(o.text):
                kept.append(o.text.strip())
                streak = 0
            else:
                streak += 1
    stats = {r: int(filt.stats[r]) for r in REASONS}
    stats.update(attempts=attempts, kept=len(kept), stopped_early=int(len(kept) < count), shots_dropped=dropped,
                 unsent=unsent)
    return kept, stats


def _fitting_prompt(llm, shots: list[str]) -> tuple[str | None, int]:
    """(the few-shot prompt with as many of `shots` as leave the engine's context room for one token,
    or None if one shot is too many; the number of shots dropped)."""
    limit = getattr(llm, "max_model_len", None)
    for n in range(len(shots), 0, -1):
        prompt = fewshot_prompt(shots[:n])
        if limit is None or len(llm.tokenizer.encode(prompt, add_special_tokens=True)) < limit:
            return prompt, len(shots) - n
    return None, len(shots)


__all__ = ["BLOCKLIST", "PromptFilter", "fewshot_prompt", "generate_prompts", "lcs_length",
           "normalize", "pick_shots", "rouge_tokens"]
