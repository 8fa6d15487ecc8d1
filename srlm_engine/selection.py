"""Which of two models answers better, by a fixed judge: the head-to-head win rate of M_{t+1} over
M_t, and the paper's checkpoint selection (PAPER_NOTES: the best DPO checkpoint by pairwise
comparison with the previous best on 253 validation prompts).

Both answer prompts greedily and score each answer once with the judge's expected score; a prompt
is won, tied or lost by its two scores, and a tie counts half. A prompt where the judge left either
answer unscored is counted apart, never guessed into a result.

Engines come from `engine(model_dir)`, a context manager yielding a callable that returns the
engine (the run folder's: one at a time, freed when its block ends).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from srlm_engine import judge
from srlm_engine.engine import SamplingParams
from srlm_engine.evaluate import judge_items
from srlm_engine.io import read_json
from srlm_engine.train.checkpoint import saved_models


def compare(new: list, old: list) -> dict:
    """Prompt by prompt, the judge's scores of two models' answers: wins, ties, losses of `new`
    and its win rate (a tie counts half); None when no prompt has both answers scored."""
    both = [(a, b) for a, b in zip(new, old) if a is not None and b is not None]
    wins = sum(a > b for a, b in both)
    ties = sum(a == b for a, b in both)
    return {"wins": wins, "ties": ties, "losses": len(both) - wins - ties, "unscored": len(new) - len(both),
            "win_rate": (wins + 0.5 * ties) / len(both) if both else None}


def chat_fitting(llm, prompts: list[str], params) -> list:
    """llm.chat over single-turn `prompts`, one output each, None for a prompt whose rendered chat
    leaves the model's context no room for one token: it is skipped, so that one long prompt does
    not stop a whole phase (the engine refuses such a request)."""
    tok = llm.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
           for p in prompts]
    params = params if isinstance(params, list) else [params] * len(prompts)
    fit = judge.fitting(llm, ids)
    out = [None] * len(prompts)
    if fit:
        for i, o in zip(fit, llm.generate([ids[i] for i in fit], [params[i] for i in fit], use_tqdm=True)):
            out[i] = o
    return out


def greedy_answers(engine, cfg, model: Path, prompts: list[str]) -> list[str | None]:
    """`model`'s greedy answers to `prompts` (None: the prompt does not fit its context); its
    engine is freed before this returns."""
    with engine(model) as llm:
        outs = chat_fitting(llm(), prompts, SamplingParams(temperature=0.0, max_tokens=cfg.eval_max_tokens))
    return [None if o is None else o.outputs[0].text for o in outs]


def expected_scores(engine, cfg, template: str, judge_dir: Path, prompts: list[str], answers: list[str | None],
                    seed: int) -> list:
    """The fixed judge's expected score of each answer (None: unscored, and for a missing answer)."""
    keep = [i for i, a in enumerate(answers) if a is not None]
    scores = [None] * len(answers)
    with engine(judge_dir) as llm:
        recs = judge_items(llm(), cfg, template, [prompts[i] for i in keep], [answers[i] for i in keep], seed,
                           mode="expected") if keep else []
    for i, r in zip(keep, recs):
        scores[i] = r["score"]
    return scores


def head_to_head(engine, cfg, template: str, new: Path, old: Path, judge_dir: Path, prompts: list[str],
                 seed: int) -> dict:
    """Win rate of the model in `new` over the one in `old` on `prompts`, and their answers' lengths."""
    answers = {name: greedy_answers(engine, cfg, d, prompts) for name, d in (("new", new), ("old", old))}
    scores = expected_scores(engine, cfg, template, judge_dir, prompts * 2, answers["new"] + answers["old"], seed)
    n = len(prompts)
    return {**compare(scores[:n], scores[n:]),
            "mean_len_new": mean_words(answers["new"]), "mean_len_old": mean_words(answers["old"]),
            "skipped": sum(a is None or b is None for a, b in zip(answers["new"], answers["old"]))}


def choose_checkpoint(scores: list[list]) -> tuple[int, list[dict]]:
    """The paper's selection: each checkpoint (oldest first) against the best so far, which it
    replaces on a win rate above 1/2. -> (index of the chosen one, one record per round)."""
    best, rounds = 0, []
    for i in range(1, len(scores)):
        r = {"candidate": i, "against": best, **compare(scores[i], scores[best])}
        if r["win_rate"] is not None and r["win_rate"] > 0.5:
            best = i
        rounds.append({**r, "best": best})
    return best, rounds


def select_checkpoint(run_, cfg, template: str, train_dir: Path, judge_dir: Path, prompts: list[str],
                      seed: int, out: Path) -> None:
    """Write `out` (selection.json): the DPO run's saved models and final weights, each one's
    greedy answers scored once (selection/step-N.json, each a step of the run folder `run_`, so a
    rerun resumes), the rounds of choose_checkpoint, and the chosen model's path (relative to the
    iteration folder)."""
    final_step = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    found = {s: p for s, p in saved_models(train_dir) if s < final_step}
    found[final_step] = train_dir / "model"
    steps = sorted(found)
    results = []
    for s in steps:
        f = out.parent / "selection" / f"step-{s:08d}.json"

        def score(s=s, f=f):
            answers = greedy_answers(run_.engine, cfg, found[s], prompts)
            run_.write_json(f, {"step": s, "answers": answers, "scores": expected_scores(
                run_.engine, cfg, template, judge_dir, prompts, answers, seed)})
        run_.step(f, score, f"selection: step {s}")
        results.append(read_json(f))
    best, rounds = choose_checkpoint([r["scores"] for r in results])
    means = [[x for x in r["scores"] if x is not None] for r in results]
    rel = {s: os.path.relpath(found[s], out.parent) for s in steps}
    run_.write_json(out, {"prompts": len(prompts), "judge": str(judge_dir),
                          "candidates": [{"step": s, "model": rel[s], "mean_score": sum(m) / len(m) if m else None,
                                          "mean_words": mean_words(r["answers"])}
                                         for s, r, m in zip(steps, results, means)],
                          "rounds": [{**r, "candidate": steps[r["candidate"]], "against": steps[r["against"]],
                                      "best": steps[r["best"]]} for r in rounds],
                          "chosen_step": steps[best], "chosen": rel[steps[best]]})


def mean_words(texts: list[str | None]) -> float:
    texts = [t for t in texts if t is not None]
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


__all__ = ["chat_fitting", "choose_checkpoint", "compare", "expected_scores", "greedy_answers", "head_to_head",
           "mean_words", "select_checkpoint"]
