"""The self-rewarding loop (Yuan et al., 2024), step by step.

    M1 = SFT(M0, IFT + EFT)
    for t in 1..T:
        (1) self-instruction creation with M_t: new prompts, N candidates each, K judgments each,
            (best, worst) pairs with ties dropped  -> AIFT(M_t)
        (2) DPO from M_t (also the reference) on AIFT(M_t)  -> M_{t+1}; with select_checkpoints,
            M_{t+1} is the best of the DPO run's checkpoints (each against the best so far, on
            validation prompts, by the fixed evaluation judge), else its final weights

Every step writes its artifact into the run folder, whole or not at all, before the next step
starts; a rerun of the same command skips what exists and resumes at the first missing artifact
(DPO resumes from its own last checkpoint). RUN/manifest.json pins the config and the input
hashes: a run folder made with another config is refused.

    RUN/manifest.json
    RUN/m1/model/                                  M1 (and m1/train/: its checkpoints, metrics)
    RUN/eval/judge_m{t}.json                       M_t's judge against the human EFT-eval scores
    RUN/iter_{t}/prompts.jsonl candidates.jsonl judgments.jsonl pairs.jsonl pairs.ref.jsonl
    RUN/iter_{t}/model/                            M_{t+1}
    RUN/iter_{t}/selection.json, selection/        checkpoint selection: every round, every answer
    RUN/iter_{t}/metrics.json                      counts, lengths, win rate of M_{t+1} over M_t
    RUN/iter_{t}/timings.json                      seconds per stage
    RUN/report.md, RUN/plots/*.png
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from srlm_engine import data, judge, pairs as pairing, selfinstruct
from srlm_engine.config import LoopConfig
from srlm_engine.device import default_device, describe, resolve_dtype
from srlm_engine.engine import LLM, SamplingParams
from srlm_engine.evaluate import judge_vs_human
from srlm_engine.io import DataError, file_sha256, read_json, read_jsonl, write_json, write_jsonl
from srlm_engine.train.checkpoint import saved_models
from srlm_engine.train.refs import compute_reference_logps, policy_dtype
from srlm_engine.train.trainer import train_dpo, train_sft


class LoopStop(RuntimeError):
    """The loop cannot go on (no prompts survived the filters, no pairs after ties); the
    artifacts written so far are kept, and the message says what happened."""


class Run:
    """The run folder: the manifest check, and artifacts made once."""

    def __init__(self, root: Path, cfg: LoopConfig, model_dir: Path, log: Callable[[str], None]):
        self.root, self.cfg, self.log = root, cfg, log
        seed_dir = Path(cfg.seed_dir)
        inputs = {f"seed/{n}": file_sha256(seed_dir / n) for n in ("ift.jsonl", "eft_train.jsonl", "eft_eval.jsonl")}
        inputs["model/config.json"] = file_sha256(model_dir / "config.json")
        for w in sorted(model_dir.glob("model*.safetensors")):  # ~2 s for SmolLM2's 538 MB
            inputs[f"model/{w.name}"] = file_sha256(w)
        if cfg.judge_template:
            inputs["judge_template"] = file_sha256(Path(cfg.judge_template))
        manifest = {"config": json.loads(json.dumps(cfg.to_dict())), "model": str(model_dir), "inputs": inputs}
        path = root / "manifest.json"
        if path.is_file():
            old = read_json(path)
            diff = [k for k in ("config", "inputs") if old.get(k) != manifest[k]]
            if diff:
                keys = _changed(old.get("config", {}), manifest["config"]) if "config" in diff else []
                keys += [f"input {k}" for k in manifest["inputs"] if old.get("inputs", {}).get(k) != manifest["inputs"][k]]
                raise LoopStop(f"{root} was made with another config or inputs (changed: {', '.join(keys)}); "
                               f"use a new --out folder, or rerun with the settings of that run")
        else:
            write_json(path, manifest)

    def step(self, path: Path, make: Callable[[], object], stage: str, timings_file: Path | None = None):
        """Return the artifact at `path`, making it with `make()` (which writes it) if absent."""
        if path.exists():
            self.log(f"[{stage}] done before: {path.relative_to(self.root)}")
        else:
            self.log(f"[{stage}] running")
            t0 = time.perf_counter()
            make()
            dt = time.perf_counter() - t0
            if timings_file is not None:
                t = read_json(timings_file) if timings_file.is_file() else {}
                t[stage] = round(dt, 3)
                write_json(timings_file, t)
            self.log(f"[{stage}] {dt:.1f}s -> {path.relative_to(self.root)}")
        return path


def _changed(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _changed(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def open_engine(model_dir: Path, cfg: LoopConfig) -> LLM:
    """The generation engine every phase of the loop (and `srlm judge-eval`) uses: cfg's dtype
    ('auto': bf16 where the device computes it natively), on the GPU where there is one (the
    trainer's choice too), else on the CPU."""
    device = default_device()
    return LLM(str(model_dir), dtype=resolve_dtype(cfg.dtype, device), device=str(device),
               kv_cache_tokens=cfg.kv_cache_tokens, max_num_seqs=cfg.max_num_seqs)


def _free() -> None:
    """Reclaim the engines callers have let go of. The caller drops its own reference first (`del
    llm`, or `llm = None` where a closure shares the variable): an engine anyone still refers to
    stays alive, weights and KV pool with it. Engines hold reference cycles, so only the collector
    frees them; the CUDA cache then goes back to the device before the next engine or the trainer
    allocates."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _judge(llm, cfg: LoopConfig, template: str, instructions: list[str], responses: list[str],
           seed: int, mode: str | None = None) -> list[dict]:
    """One record per (instruction, response): the mean score (None = unscored) and the texts."""
    mode = mode or cfg.judge_mode
    if mode == "expected":
        scores = judge.judge_expected(llm, instructions, responses, template=template, after=cfg.expected_after,
                                      max_tokens=cfg.judge_max_tokens, seed=seed)
        return [{"score": s, "scores": [s], "texts": []} for s in scores]
    js = judge.judge_samples(llm, instructions, responses, template=template, k=cfg.judge_samples,
                             temperature=cfg.judge_temperature, top_p=cfg.judge_top_p,
                             max_tokens=cfg.judge_max_tokens, seed=seed)
    return [{"score": j.mean, "scores": j.scores, "texts": j.texts} for j in js]


def judge_eval(llm, cfg: LoopConfig, template: str, items: list[dict], seed: int) -> dict:
    """M_t's judge against the human scores of the EFT-eval set, in both modes: the paper's
    reward-modelling table, the judge's score distribution and its parse rate."""
    flat_i = [it["instruction"] for it in items for _ in it["responses"]]
    flat_r = [r for it in items for r in it["responses"]]
    out = {}
    for mode in ("sample", "expected"):
        recs = _judge(llm, cfg, template, flat_i, flat_r, seed, mode=mode)
        scores, k = [], 0
        for it in items:
            scores.append([recs[k + j]["score"] for j in range(len(it["responses"]))])
            k += len(it["responses"])
        raw = [s for r in recs for s in r["scores"]]
        out[mode] = {"metrics": judge_vs_human([it["scores"] for it in items], scores).__dict__,
                     "judge_scores": scores, "parse_rate": sum(s is not None for s in raw) / max(len(raw), 1),
                     "distribution": _histogram(raw)}
    return out


def _histogram(scores: list) -> dict[str, int]:
    h = {"unscored": 0, **{str(s): 0 for s in range(6)}}
    for s in scores:
        h["unscored" if s is None else str(min(5, max(0, round(s))))] += 1
    return h


def candidate_params(cfg: LoopConfig, count: int, seed: int) -> list[SamplingParams]:
    """Sampling of the N candidates of each of `count` prompts: a seed per prompt, mixed from the
    iteration's (one for the whole call gave candidate j of every prompt the same uniforms)."""
    return [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                           seed=judge.item_seed(seed, i)) for i in range(count)]


def _chat(llm, prompts: list[str], params) -> list:
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)


def head_to_head(cfg: LoopConfig, template: str, new: Path, old: Path, judge_dir: Path,
                 prompts: list[str], seed: int) -> dict:
    """Win rate of the model in `new` over the one in `old`: each answers the held-out prompts
    greedily, the fixed judge scores both answers; a tie counts half. Prompts where the judge left
    either answer unscored are counted apart and left out of the rate (None if none is left)."""
    answers = {name: _greedy_answers(cfg, d, prompts) for name, d in (("new", new), ("old", old))}
    scores = _expected_scores(cfg, template, judge_dir, prompts * 2, answers["new"] + answers["old"], seed)
    n = len(prompts)
    return {**compare(scores[:n], scores[n:]),
            "mean_len_new": _mean_words(answers["new"]), "mean_len_old": _mean_words(answers["old"])}


def _greedy_answers(cfg: LoopConfig, model: Path, prompts: list[str]) -> list[str]:
    """`model`'s greedy answers to `prompts`; its engine is freed before this returns."""
    llm = open_engine(model, cfg)
    answers = [o.outputs[0].text for o in _chat(llm, prompts, SamplingParams(temperature=0.0,
                                                                            max_tokens=cfg.eval_max_tokens))]
    del llm
    _free()
    return answers


def _expected_scores(cfg: LoopConfig, template: str, judge_dir: Path, prompts: list[str], answers: list[str],
                     seed: int) -> list:
    """The fixed judge's expected score of each answer (None: unscored); its engine is freed after."""
    llm = open_engine(judge_dir, cfg)
    recs = _judge(llm, cfg, template, prompts, answers, seed, mode="expected")
    del llm
    _free()
    return [r["score"] for r in recs]


def compare(new: list, old: list) -> dict:
    """Prompt by prompt, the judge's scores of two models' answers: wins, ties, losses of `new`
    and its win rate (a tie counts half). A prompt where either answer went unscored is counted as
    such, not guessed into a result; the rate is None when no prompt is left."""
    both = [(a, b) for a, b in zip(new, old) if a is not None and b is not None]
    wins = sum(a > b for a, b in both)
    ties = sum(a == b for a, b in both)
    return {"wins": wins, "ties": ties, "losses": len(both) - wins - ties, "unscored": len(new) - len(both),
            "win_rate": (wins + 0.5 * ties) / len(both) if both else None}


def choose_checkpoint(scores: list[list]) -> tuple[int, list[dict]]:
    """The paper's checkpoint selection: each checkpoint (oldest first) against the best so far,
    which it replaces on a win rate above 1/2. -> (index of the chosen one, one record per round)."""
    best, rounds = 0, []
    for i in range(1, len(scores)):
        r = {"candidate": i, "against": best, **compare(scores[i], scores[best])}
        if r["win_rate"] is not None and r["win_rate"] > 0.5:
            best = i
        rounds.append({**r, "best": best})
    return best, rounds


def select_checkpoint(run_: "Run", cfg: LoopConfig, template: str, train_dir: Path, judge_dir: Path,
                      prompts: list[str], seed: int, out: Path) -> None:
    """Write `out` (selection.json): the DPO run's saved models and final weights, each one's
    greedy answers scored once (selection/step-N.json, kept so a rerun resumes), the rounds of
    choose_checkpoint, and the chosen model's path (relative to the iteration folder). The loop
    then moves that folder to M_{t+1}: a chosen checkpoint's model/ leaves its checkpoint, which
    no resume needs any more (training has finished)."""
    final_step = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    found = {s: p for s, p in saved_models(train_dir) if s < final_step}
    found[final_step] = train_dir / "model"
    steps = sorted(found)
    results = []
    for s in steps:
        f = out.parent / "selection" / f"step-{s:08d}.json"
        def score(s=s, f=f):
            answers = _greedy_answers(cfg, found[s], prompts)
            write_json(f, {"step": s, "answers": answers,
                           "scores": _expected_scores(cfg, template, judge_dir, prompts, answers, seed)})
        run_.step(f, score, f"selection: step {s}")
        results.append(read_json(f))
    best, rounds = choose_checkpoint([r["scores"] for r in results])
    means = [[x for x in r["scores"] if x is not None] for r in results]
    rel = {s: os.path.relpath(found[s], out.parent) for s in steps}
    write_json(out, {"prompts": len(prompts), "judge": str(judge_dir),
                     "candidates": [{"step": s, "model": rel[s],
                                     "mean_score": sum(m) / len(m) if m else None,
                                     "mean_words": _mean_words(r["answers"])}
                                    for s, r, m in zip(steps, results, means)],
                     "rounds": [{**r, "candidate": steps[r["candidate"]], "against": steps[r["against"]],
                                 "best": steps[r["best"]]} for r in rounds],
                     "chosen_step": steps[best], "chosen": rel[steps[best]]})


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def prompt_filter(seed_prompts: list[str], root: Path, t: int) -> selfinstruct.PromptFilter:
    """The filters of iteration t's new prompts: against the seeds and every earlier iteration's."""
    used = [r["prompt"] for i in range(1, t) if (root / f"iter_{i}" / "prompts.jsonl").is_file()
            for r in read_jsonl(root / f"iter_{i}" / "prompts.jsonl")]
    return selfinstruct.PromptFilter(seed_prompts + used)


def draw_prompts(pool: Path, seed_prompts: list[str], root: Path, t: int, count: int,
                 seed: int) -> tuple[list[str], dict]:
    """Up to `count` prompts from a pool file (e.g. written by a larger model, as in the paper),
    through the same filters as written ones, never reusing a prompt of an earlier iteration."""
    flt = prompt_filter(seed_prompts, root, t)
    cands = [r["prompt"] if isinstance(r.get("prompt"), str) else "" for r in read_jsonl(pool)]
    random.Random(seed).shuffle(cands)
    kept = []
    for p in cands:
        if len(kept) == count:
            break
        if flt.offer(p):
            kept.append(p)
    return kept, {**flt.stats, "pool": len(cands), "kept": len(kept)}


def train_flags(tcfg) -> list[str]:
    """`srlm sft|dpo` flags that give that command the TrainConfig `tcfg`, every field included."""
    out = []
    for f in fields(tcfg):
        v, flag = getattr(tcfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, "none" if v is None else repr(v) if isinstance(v, float) else str(v)]
    return out


def _train(kind: str, model: Path, records: list[dict], out_dir: Path, tcfg, nproc: int) -> Path:
    """SFT or DPO in this process, or in `nproc` processes (FSDP2) through `srlm sft|dpo --nproc`.
    A model that training already finished (a run killed before moving it) is not trained again."""
    if (out_dir / "model" / "config.json").is_file():  # save_final writes it whole or not at all
        return out_dir / "model"
    if nproc <= 1:
        return (train_sft if kind == "sft" else train_dpo)(model, records, out_dir, tcfg)
    data_file = out_dir.parent / f"{kind}.records.jsonl"
    write_jsonl(data_file, records)
    cmd = [sys.executable, "-m", "srlm_engine.cli", kind, "--model", str(model),
           "--data" if kind == "sft" else "--pairs", str(data_file), "--out", str(out_dir), "--nproc", str(nproc),
           *train_flags(tcfg)]
    if subprocess.call(cmd) != 0:
        raise RuntimeError(f"{kind} in {nproc} processes failed; its checkpoints in {out_dir} are kept, rerun to resume")
    return out_dir / "model"


def run(model_dir: str | Path, out: str | Path, cfg: LoopConfig, log: Callable[[str], None] = print,
        nproc: int = 1) -> Path:
    """Run (or resume) the loop; returns the path of the final model. `nproc` > 1 trains with
    FSDP2 over that many local processes (generation stays in this one)."""
    model_dir, root = Path(model_dir).expanduser(), Path(out)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a model directory (no config.json)")
    for tcfg in (cfg.sft, cfg.dpo):  # a batch that nproc does not divide, now rather than hours into the run
        tcfg.accum_steps(nproc)
    seed_dir = Path(cfg.seed_dir)
    template = judge.load_template(cfg.judge_template) if cfg.judge_template else judge.DEFAULT_TEMPLATE
    ift = data.load_ift(seed_dir / "ift.jsonl")  # each record holds a user turn: its seed prompt
    eft = data.load_eft_train(seed_dir / "eft_train.jsonl")
    eft_eval = data.load_eft_eval(seed_dir / "eft_eval.jsonl")
    # Only inputs that passed their checks pin the run folder: fixing a bad line is no new run.
    run_ = Run(root, cfg, model_dir, log)
    log(f"generation on {default_device()} in {describe(cfg.dtype, default_device())}")
    seed_prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in ift]
    held_out = [it["instruction"] for it in eft_eval][: cfg.eval_prompts]
    # checkpoint selection's prompts: seed prompts, never DPO's (self-instruction filters them
    # out) nor the held-out evaluation's (from the EFT eval trees)
    validation = seed_prompts[: cfg.select_prompts]
    evals = root / "eval"

    # M1: SFT on instruction following (IFT) and evaluation fine-tuning (EFT) together.
    m1 = root / "m1" / "model"
    sft_records = ift + data.eft_to_sft(eft, template)
    run_.step(m1, lambda: _move(_train("sft", model_dir, sft_records, root / "m1" / "train", cfg.sft, nproc), m1),
              "M1 = SFT(M0, IFT + EFT)", root / "m1" / "timings.json")
    # The judge before and after EFT: M0 is the pretrained model, M1 the fine-tuned one.
    for name, d in (("m0", model_dir), ("m1", m1)):
        def make(d=d, name=name):
            llm = open_engine(d, cfg)
            write_json(evals / f"judge_{name}.json", judge_eval(llm, cfg, template, eft_eval, cfg.seed))
            del llm
            _free()
        run_.step(evals / f"judge_{name}.json", make, f"judge eval {name.upper()}", evals / "timings.json")

    model = m1
    eval_judge = Path(cfg.eval_judge) if cfg.eval_judge else m1
    for t in range(1, cfg.iterations + 1):
        it = root / f"iter_{t}"
        tf = it / "timings.json"
        seed = cfg.seed * 1000 + t
        llm = None

        def engine():
            nonlocal llm
            llm = llm or open_engine(model, cfg)
            return llm

        # (1) Self-instruction creation with M_t.
        def make_prompts():
            if cfg.prompt_pool:
                prompts, stats = draw_prompts(Path(cfg.prompt_pool), seed_prompts, root, t, cfg.prompts, seed)
            else:
                writer = open_engine(Path(cfg.prompt_writer), cfg) if cfg.prompt_writer else engine()
                prompts, stats = selfinstruct.generate_prompts(
                    writer, seed_prompts, cfg.prompts, seed=seed, temperature=cfg.prompt_temperature,
                    top_p=cfg.prompt_top_p, prompt_filter=prompt_filter(seed_prompts, root, t))
                del writer  # a separate writer goes before M_t's engine is made
                _free()
            write_json(it / "prompt_stats.json", stats)
            if not prompts:
                raise LoopStop(f"iteration {t}: no new prompt survived the filters ({stats}); "
                               f"nothing was written for this iteration, earlier artifacts are intact")
            write_jsonl(it / "prompts.jsonl", [{"prompt": p} for p in prompts])
        run_.step(it / "prompts.jsonl", make_prompts, f"iter {t}: prompts", tf)
        prompts = [r["prompt"] for r in read_jsonl(it / "prompts.jsonl")]

        def make_candidates():
            outs = _chat(engine(), prompts, candidate_params(cfg, len(prompts), seed))
            write_jsonl(it / "candidates.jsonl", [
                {"prompt": p, "candidates": [c.text for c in o.outputs],
                 "finish_reasons": [c.finish_reason for c in o.outputs]} for p, o in zip(prompts, outs)])
        run_.step(it / "candidates.jsonl", make_candidates, f"iter {t}: candidates", tf)
        cands = read_jsonl(it / "candidates.jsonl")

        def make_judgments():
            flat_i = [c["prompt"] for c in cands for _ in c["candidates"]]
            flat_r = [r for c in cands for r in c["candidates"]]
            recs = iter(_judge(engine(), cfg, template, flat_i, flat_r, seed))
            write_jsonl(it / "judgments.jsonl", [
                {"prompt": c["prompt"], "candidates": c["candidates"],
                 "judgments": [next(recs) for _ in c["candidates"]]} for c in cands])
        run_.step(it / "judgments.jsonl", make_judgments, f"iter {t}: judgments", tf)
        judged = read_jsonl(it / "judgments.jsonl")
        llm = None  # M_t's engine goes before training allocates
        _free()

        def make_pairs():
            got, counts = pairing.build_pairs([j["prompt"] for j in judged], [j["candidates"] for j in judged],
                                              [[r["score"] for r in j["judgments"]] for j in judged],
                                              length_control=cfg.length_control, min_margin=cfg.min_margin)
            write_json(it / "pair_counts.json", counts)
            if not got:
                raise LoopStop(f"iteration {t}: no preference pairs ({counts}): every prompt's candidates "
                               f"tied or went unscored; the judgments are kept in {it / 'judgments.jsonl'}")
            write_jsonl(it / "pairs.jsonl", got)
        run_.step(it / "pairs.jsonl", make_pairs, f"iter {t}: pairs", tf)

        # (2) Instruction-following training: DPO from M_t, with M_t as the reference.
        run_.step(it / "pairs.ref.jsonl", lambda: compute_reference_logps(
            model, data.load_pairs(it / "pairs.jsonl"), max_seq_len=cfg.dpo.max_seq_len,
            batch_size=cfg.dpo.ref_batch_size, out_path=it / "pairs.ref.jsonl", dtype=policy_dtype(cfg.dpo, nproc, default_device())),
            f"iter {t}: reference log-probs", tf)
        if not cfg.select_checkpoints:
            run_.step(it / "model", lambda: _move(_train("dpo", model, read_jsonl(it / "pairs.ref.jsonl"),
                                                         it / "train", cfg.dpo, nproc), it / "model"),
                      f"iter {t}: DPO -> M{t + 1}", tf)
        else:  # every checkpoint's weights kept; the best of them becomes M_{t+1}
            if not (it / "model").exists():
                run_.step(it / "train" / "model", lambda: _train(
                    "dpo", model, read_jsonl(it / "pairs.ref.jsonl"), it / "train",
                    dataclasses.replace(cfg.dpo, keep_models=True), nproc), f"iter {t}: DPO", tf)
                run_.step(it / "selection.json", lambda: select_checkpoint(
                    run_, cfg, template, it / "train", eval_judge, validation, seed, it / "selection.json"),
                    f"iter {t}: checkpoint selection", tf)
            run_.step(it / "model", lambda: _move(it / read_json(it / "selection.json")["chosen"], it / "model"),
                      f"iter {t}: chosen checkpoint -> M{t + 1}", tf)

        def make_metrics():
            m = {"iteration": t, "prompts": len(prompts), "prompt_stats": read_json(it / "prompt_stats.json"),
                 "pair_counts": read_json(it / "pair_counts.json"),
                 "candidate_mean_words": _mean_words([r for c in cands for r in c["candidates"]]),
                 "judge_distribution": _histogram([s for j in judged for r in j["judgments"] for s in r["scores"]]),
                 "head_to_head": head_to_head(cfg, template, it / "model", model, eval_judge, held_out, seed)}
            write_json(it / "metrics.json", m)
        run_.step(it / "metrics.json", make_metrics, f"iter {t}: evaluation", tf)
        run_.step(evals / f"judge_m{t + 1}.json", lambda: _judge_file(it / "model", cfg, template, eft_eval,
                                                                       evals / f"judge_m{t + 1}.json"),
                  f"judge eval M{t + 1}", evals / "timings.json")
        model = it / "model"

    from srlm_engine.report import write_report
    log(f"report: {write_report(root, cfg)}")
    return model


def _judge_file(model: Path, cfg, template, items, path: Path) -> None:
    llm = open_engine(model, cfg)
    write_json(path, judge_eval(llm, cfg, template, items, cfg.seed))
    del llm
    _free()


def _move(src: Path, dst: Path) -> None:
    """Move a finished model directory into place in one rename (same filesystem)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
