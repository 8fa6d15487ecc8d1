"""Preference pairs from judged candidates: the best against the worst, ties dropped (AIFT(M_t)).

A candidate's score is its averaged judge score; None (or NaN) means the judge never produced a
valid score for it, and such candidates take no part. A prompt gives no pair when fewer than 2
candidates are scored, when the best and worst scores are equal (a tie; with min_margin > 0, when
they differ by min_margin or less: expected scores are continuous, so exact ties are rare), or when every candidate
of the top score is the same text as every one of the bottom score (the same answer sampled twice
and judged differently).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

OUTCOMES = ("pairs", "ties", "too_few_scored", "identical")


def _scored(candidates: Sequence[str], scores: Sequence[float | None]) -> list[tuple[int, float]]:
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    return [(i, float(s)) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]


def _select(prompt: str, candidates: Sequence[str], scores: Sequence[float | None],
            length_control: bool, min_margin: float = 0.0) -> tuple[dict | None, str]:
    """The pair for one prompt, or None (see the module docstring for when), and its outcome.

    chosen = a candidate with the highest score, rejected = one with the lowest. Without length
    control the first such candidate (in candidate order) is taken. With length control
    (Meta-Rewarding, Wu et al. 2024), the shortest candidate (in characters) of the top score tier
    and the longest of the bottom tier, which counters the drift toward ever longer answers. When
    those two are the same text, the next candidate in that order whose text differs is taken.
    A pair is {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}."""
    scored = _scored(candidates, scores)
    if len(scored) < 2:
        return None, "too_few_scored"
    hi = max(s for _, s in scored)
    lo = min(s for _, s in scored)
    if hi - lo <= min_margin:
        return None, "ties"
    top = [i for i, s in scored if s == hi]
    bottom = [i for i, s in scored if s == lo]
    if length_control:
        # stable sorts keep candidate order among equal lengths
        top.sort(key=lambda i: len(candidates[i]))
        bottom.sort(key=lambda i: -len(candidates[i]))
    # the first (chosen, rejected) in that order whose texts differ: the same answer sampled twice
    # and judged differently says nothing, but another candidate of the same tier may
    c, r = next(((c, r) for c in top for r in bottom if candidates[c] != candidates[r]), (None, None))
    if c is None:
        return None, "identical"
    return {"prompt": prompt, "chosen": candidates[c], "rejected": candidates[r],
            "chosen_score": hi, "rejected_score": lo}, "pairs"


def build_pairs(prompts: Sequence[str], candidates: Sequence[Sequence[str]],
                scores: Sequence[Sequence[float | None]],
                length_control: bool = False, min_margin: float = 0.0) -> tuple[list[dict], dict[str, int]]:
    """One pair per prompt where its candidates give one (see _select for which). Returns (pairs in
    prompt order, counts) where counts has one entry per outcome in OUTCOMES (pairs, ties,
    too_few_scored, identical); they sum to the number of prompts."""
    if not len(prompts) == len(candidates) == len(scores):
        raise ValueError(f"{len(prompts)} prompts, {len(candidates)} candidate lists, "
                         f"{len(scores)} score lists: they must match")
    pairs, counts = [], dict.fromkeys(OUTCOMES, 0)
    for p, c, s in zip(prompts, candidates, scores):
        rec, outcome = _select(p, c, s, length_control, min_margin)
        counts[outcome] += 1
        if rec is not None:
            pairs.append(rec)
    return pairs, counts


__all__ = ["OUTCOMES", "build_pairs"]
