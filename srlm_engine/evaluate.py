"""Judge against human scores on the EFT eval set: the paper's reward-modelling table, and
`judge_eval`, which runs a model's judge over that set in both modes.

Inputs are per instruction: the human scores of its responses (ints 0..5, the EFT-eval `scores`)
and the judge's scores of the same responses (averaged K-sample means, expected scores, or ints;
None or NaN where the judge produced no score). An unscored response ranks below every scored
one (as if it scored -1): a judge that fails to answer is wrong, not excused.

A judge that scored nothing (every response unscored) has every metric NaN: nothing was measured,
and a table shows n/a, not 0.

Definitions (fractions in the dataclass; `format_table` prints percentages like the paper):
- pairwise accuracy: over all response pairs of one instruction whose human scores differ, pooled
  over instructions, the fraction the judge orders the same way; a judge tie counts as wrong.
- 5-best: the fraction of instructions whose human-best response (any of them, if the best is
  shared) gets a judge score >= `five` (4.5 by default: the score rounds to 5, so an average of
  K=3 samples needs at least two 5s out of three, e.g. 4.67; an integer score needs 5 itself).
- exact match: the fraction of instructions whose judge ranking equals the human ranking exactly,
  ties included (the same weak order: every pair compares the same way, equal stays equal).
- Spearman rho and Kendall tau-b per instruction, averaged over instructions. These agree with
  scipy.stats.spearmanr and kendalltau (variant "b", average ranks for ties); where either side is
  constant both are undefined (scipy gives NaN), and the instruction is skipped and counted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from srlm_engine import judge

UNSCORED = -1.0


@dataclass(frozen=True)
class JudgeMetrics:
    pairwise_accuracy: float
    five_best: float
    exact_match: float
    spearman: float
    kendall_tau: float
    n_instructions: int
    n_pairs: int          # response pairs with different human scores (pairwise accuracy's base)
    n_correlated: int     # instructions in the Spearman / Kendall averages
    n_constant: int       # instructions skipped there: human or judge scores all equal
    n_unscored: int       # responses the judge gave no score


def rankdata(x: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's "average")."""
    order = sorted(range(len(x)), key=x.__getitem__)
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of the average ranks; NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b = (C - D) / sqrt((n0 - tx) (n0 - ty)), n0 = n(n-1)/2, tx / ty = pairs tied
    in x / in y (pairs tied in both count in neither C nor D); NaN if either side is constant."""
    n = len(x)
    c = d = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            tx += sx == 0
            ty += sy == 0
            if sx * sy > 0:
                c += 1
            elif sx * sy < 0:
                d += 1
    n0 = n * (n - 1) // 2
    if n0 == tx or n0 == ty:
        return math.nan
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _clean(scores: Sequence[float | None]) -> tuple[list[float], int]:
    out = [UNSCORED if s is None or math.isnan(s) else float(s) for s in scores]
    return out, sum(1 for s in scores if s is None or math.isnan(s))


def judge_vs_human(human: Sequence[Sequence[int]], judge: Sequence[Sequence[float | None]],
                   five: float = 4.5) -> JudgeMetrics:
    """The table's metrics for one judge (see the module docstring for each definition).
    human[i][j] and judge[i][j] score response j of instruction i."""
    if len(human) != len(judge):
        raise ValueError(f"{len(human)} human score lists but {len(judge)} judge score lists")
    n_pairs = agree = best5 = exact = constant = unscored = 0
    rhos, taus = [], []
    for i, (h, raw) in enumerate(zip(human, judge)):
        if len(h) != len(raw):
            raise ValueError(f"instruction {i}: {len(h)} human scores but {len(raw)} judge scores")
        if len(h) < 2:
            raise ValueError(f"instruction {i}: needs at least 2 responses, got {len(h)}")
        j, bad = _clean(raw)
        unscored += bad
        for a in range(len(h)):
            for b in range(a + 1, len(h)):
                if h[a] != h[b]:
                    n_pairs += 1
                    agree += _sign(h[a] - h[b]) == _sign(j[a] - j[b])
        top = max(h)
        best5 += any(js >= five for hs, js in zip(h, j) if hs == top)
        exact += rankdata(h) == rankdata(j)
        rho, tau = spearman(h, j), kendall_tau_b(h, j)
        if math.isnan(rho) or math.isnan(tau):
            constant += 1
        else:
            rhos.append(rho)
            taus.append(tau)
    n = len(human)
    if unscored == sum(len(h) for h in human):  # a judge that scored nothing has nothing to measure
        return JudgeMetrics(math.nan, math.nan, math.nan, math.nan, math.nan, n_instructions=n, n_pairs=n_pairs,
                            n_correlated=0, n_constant=n, n_unscored=unscored)
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return JudgeMetrics(pairwise_accuracy=agree / n_pairs if n_pairs else math.nan,
                        five_best=best5 / n if n else math.nan,
                        exact_match=exact / n if n else math.nan,
                        spearman=mean(rhos), kendall_tau=mean(taus), n_instructions=n,
                        n_pairs=n_pairs, n_correlated=len(rhos), n_constant=constant,
                        n_unscored=unscored)


_ROWS = (("pairwise accuracy", "pairwise_accuracy", "{:.1f}", 100),
         ("5-best %", "five_best", "{:.1f}", 100),
         ("exact match %", "exact_match", "{:.1f}", 100),
         ("Spearman", "spearman", "{:.3f}", 1),
         ("Kendall tau", "kendall_tau", "{:.3f}", 1),
         ("instructions", "n_instructions", "{:d}", None),
         ("skipped (constant)", "n_constant", "{:d}", None),
         ("unscored responses", "n_unscored", "{:d}", None))


def format_table(rows: Mapping[str, JudgeMetrics]) -> str:
    """A markdown table with one column per judge (e.g. "SFT baseline", "M1", "M2"), the layout
    of the paper's reward-modelling table: accuracy rows in percent, correlations to 3 places."""
    names = list(rows)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, attr, fmt, scale in _ROWS:
        cells = []
        for m in rows.values():
            v = getattr(m, attr)
            cells.append("n/a" if isinstance(v, float) and math.isnan(v)
                         else fmt.format(v * scale if scale else v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running the judge

def judge_items(llm, cfg, template: str, instructions: list[str], responses: list[str],
                seed: int, mode: str | None = None) -> list[dict]:
    """One record per (instruction, response) in the loop's judge mode (LoopConfig `cfg`, or
    `mode`): the mean score (None = unscored), the K scores and the judge's texts."""
    mode = mode or cfg.judge_mode
    if mode == "expected":
        scores = judge.judge_expected(llm, instructions, responses, template=template, after=cfg.expected_after,
                                      max_tokens=cfg.judge_max_tokens, seed=seed)
        return [{"score": s, "scores": [s], "texts": []} for s in scores]
    js = judge.judge_samples(llm, instructions, responses, template=template, k=cfg.judge_samples,
                             temperature=cfg.judge_temperature, top_p=cfg.judge_top_p,
                             max_tokens=cfg.judge_max_tokens, seed=seed)
    return [{"score": j.mean, "scores": j.scores, "texts": j.texts} for j in js]


def length_rule(items: list[dict]) -> JudgeMetrics:
    """The "longer is better" rule as a judge: each response scored by its length in characters.
    A judge that does not beat it on a set could be reading length, not content. Its 5-best is
    NaN: a length is on no score scale, so "a score of at least 4.5" means nothing for it."""
    m = judge_vs_human([it["scores"] for it in items], [[len(r) for r in it["responses"]] for it in items])
    return replace(m, five_best=math.nan)


def judge_eval(llm, cfg, template: str, items: list[dict], seed: int,
               modes: tuple[str, ...] = ("sample", "expected")) -> dict:
    """A judge against the human scores of an eval set (EFT-eval items), in each of `modes`: the
    paper's reward-modelling table, the judge's score distribution and its parse rate, and the
    length rule's metrics on the same items."""
    flat_i = [it["instruction"] for it in items for _ in it["responses"]]
    flat_r = [r for it in items for r in it["responses"]]
    out = {"length_rule": length_rule(items).__dict__}
    for mode in modes:
        recs = judge_items(llm, cfg, template, flat_i, flat_r, seed, mode=mode)
        scores, k = [], 0
        for it in items:
            scores.append([recs[k + j]["score"] for j in range(len(it["responses"]))])
            k += len(it["responses"])
        raw = [s for r in recs for s in r["scores"]]
        out[mode] = {"metrics": judge_vs_human([it["scores"] for it in items], scores).__dict__,
                     "judge_scores": scores, "parse_rate": sum(s is not None for s in raw) / max(len(raw), 1),
                     "distribution": histogram(raw)}
    return out


def histogram(scores: list) -> dict[str, int]:
    """Judge scores by rounded value, and how many went unscored."""
    h = {"unscored": 0, **{str(s): 0 for s in range(6)}}
    for s in scores:
        h["unscored" if s is None else str(min(5, max(0, round(s))))] += 1
    return h


__all__ = ["JudgeMetrics", "format_table", "histogram", "judge_eval", "judge_items", "judge_vs_human",
           "kendall_tau_b", "length_rule", "rankdata", "spearman"]
