"""The self-rewarding loop (Yuan et al., 2024), step by step.

    M1 = SFT(M0, IFT + EFT)
    for t in 1..T:
        (1) self-instruction creation with M_t: new prompts, N candidates each, K judgments each,
            (best, worst) pairs with ties dropped  -> AIFT(M_t)
        (2) DPO from M_t (also the reference) on AIFT(M_t)  -> M_{t+1}; with select_checkpoints,
            M_{t+1} is the best of the DPO run's checkpoints (each against the best so far, on
            validation prompts, by the fixed evaluation judge), else its final weights

Each step writes its artifact into the run folder before the next starts, and a rerun of the same
command resumes at the first missing one (runfolder.py; DPO resumes from its own checkpoint).

    RUN/manifest.json                              the config and input hashes the folder is pinned to
    RUN/.lock                                      the job that holds the folder (runlock.py)
    RUN/m1/model/                                  M1 (and m1/train/: its checkpoints, metrics)
    RUN/eval/judge_m{t}.json                       M_t's judge against the human EFT-eval scores
    RUN/iter_{t}/prompts.jsonl candidates.jsonl judgments.jsonl pairs.jsonl pairs.ref.jsonl
    RUN/iter_{t}/model/                            M_{t+1}
    RUN/iter_{t}/selection.json, selection/        checkpoint selection: every round, every answer
    RUN/iter_{t}/metrics.json                      counts, lengths, win rate of M_{t+1} over M_t
    RUN/iter_{t}/timings.json                      seconds per stage
    RUN/report.md, RUN/plots/*.png

Under torchrun (`srlm loop --nproc N`, or torchrun across nodes) every rank runs this same
sequence over the same inputs (runtime.py): each generation call is split over the
data-parallel ranks and gathered back in request order, training is FSDP2 over all ranks, and
rank 0 alone writes the files, which the others read after a barrier. A request's seed depends
on the request alone, so the artifacts do not depend on the number of processes (but for the last
digits of expected judge scores, where one rank reuses a cached prompt prefix that another
computes afresh). A rank's finished shard of a generation step waits in RUN/shards/ until the
step's artifact is written, so a job killed mid-step resumes without computing it again.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from srlm_engine import augment, data, judge, pairs as pairing, selfinstruct
from srlm_engine.config import LoopConfig
from srlm_engine.device import describe
from srlm_engine.engine import SamplingParams
from srlm_engine.evaluate import histogram, judge_eval, judge_items
from srlm_engine.io import DataError, read_json, read_jsonl
from srlm_engine.runfolder import LoopStop, RunFolder
from srlm_engine.runlock import RunLock, RunLocked
from srlm_engine.runtime import Runtime
from srlm_engine.selection import chat_fitting, head_to_head, mean_words, select_checkpoint
from srlm_engine.train.refs import compute_reference_logps, policy_dtype
from srlm_engine.train.trainer import train_dpo, train_sft

__all__ = ["LoopStop", "run"]

LENGTHFREE = "eft_eval_lengthfree.jsonl"


@dataclass
class Inputs:
    """The seed data, checked, and the prompt sets drawn from it."""
    template: str
    ift: list[dict]
    eft: list[dict]          # the EFT seed, cfg.eft_extra's and those derived from IFT (cfg.eft_augment)
    eft_eval: list[dict]
    lengthfree: list[dict] | None  # a second judge eval set where length says nothing, where the seeds have one
    seed_prompts: list[str]  # each IFT record's user turn
    held_out: list[str]      # the head-to-head's prompts: from the EFT-eval trees, never trained on
    validation: list[str]    # checkpoint selection's: seed prompts, which self-instruction filters out

    @classmethod
    def load(cls, cfg: LoopConfig) -> "Inputs":
        seed_dir = Path(cfg.seed_dir)
        ift = data.load_ift(seed_dir / "ift.jsonl")
        eft_eval = data.load_eft_eval(seed_dir / "eft_eval.jsonl")
        lengthfree = seed_dir / LENGTHFREE
        seed_prompts = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in ift]
        eft = data.load_eft_train(seed_dir / "eft_train.jsonl")
        if cfg.eft_extra:
            eft += data.load_eft_train(seed_dir / cfg.eft_extra)  # an absolute path stays itself
        if cfg.eft_augment:
            eft += augment.eft_augment(ift, seed=cfg.seed, per_record=cfg.eft_augment)
        return cls(judge.load_template(cfg.judge_template) if cfg.judge_template else judge.DEFAULT_TEMPLATE,
                   ift, eft, eft_eval,
                   data.load_eft_eval(lengthfree) if lengthfree.is_file() else None, seed_prompts,
                   [it["instruction"] for it in eft_eval][: cfg.eval_prompts], seed_prompts[: cfg.select_prompts])


def run(model_dir: str | Path, out: str | Path, cfg: LoopConfig, log: Callable[[str], None] = print,
        tp: int = 1) -> Path:
    """Run (or resume) the loop; returns the path of the final model. Under torchrun every rank
    calls this; `tp` is the tensor-parallel size of each generation engine."""
    model_dir, root = Path(model_dir).expanduser(), Path(out)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a model directory (no config.json)")
    rt = Runtime.start(tp)
    for tcfg in (cfg.sft, cfg.dpo):  # a batch that the ranks do not divide fails here, not hours into the run
        tcfg.accum_steps(rt.world)
    inputs = Inputs.load(cfg)  # only checked inputs pin the folder: fixing a bad line is no new run
    lock = RunLock(root)
    refused = ""
    if rt.main:
        try:
            lock.acquire()
        except RunLocked as e:
            refused = str(e)
    rt.agree(not refused, refused)  # every rank stops when rank 0 could not take the folder
    try:
        if lock.previous:
            log(f"{root}: taking over from a job that ended without releasing it (host {lock.previous.get('host')}, "
                f"pid {lock.previous.get('pid')})")
        folder = RunFolder(root, cfg, model_dir, log if rt.main else (lambda *_: None), rt, rank_log=log)
        folder.log(f"{rt.world} process(es): data-parallel {rt.dp} x tensor-parallel {rt.tp}; generation on "
                   f"{rt.device} in {describe(cfg.dtype, rt.device)}")
        return _iterate(folder, model_dir, inputs)
    finally:
        lock.release()


def _iterate(folder: RunFolder, m0: Path, inputs: Inputs) -> Path:
    cfg, root = folder.cfg, folder.root
    m1 = train_m1(folder, m0, inputs)
    for name, m in (("m0", m0), ("m1", m1)):  # the judge before and after EFT
        evaluate_judge(folder, name, m, inputs)
    model, judge_dir = m1, Path(cfg.eval_judge) if cfg.eval_judge else m1
    for t in range(1, cfg.iterations + 1):
        it, seed = root / f"iter_{t}", cfg.seed * 1000 + t
        # (1) Self-instruction creation with M_t.
        with folder.engine(model) as llm:
            prompts = create_prompts(folder, it, t, llm, inputs, seed)
            cands = sample_candidates(folder, it, t, llm, prompts, seed)
            judged = judge_candidates(folder, it, t, llm, cands, inputs.template, seed)
        build_pairs(folder, it, t, judged)
        # (2) Instruction-following training: DPO from M_t, with M_t as the reference.
        new = train_dpo_iteration(folder, it, t, model, judge_dir, inputs, seed)
        evaluate_iteration(folder, it, t, new, model, judge_dir, inputs, cands, judged, seed)
        evaluate_judge(folder, f"m{t + 1}", new, inputs)
        model = new
    if folder.rt.main:
        from srlm_engine.report import write_report
        folder.log(f"report: {write_report(root, cfg)}")
    folder.rt.barrier()
    return model


# ---------------------------------------------------------------------- the steps

def train_m1(folder: RunFolder, m0: Path, inputs: Inputs) -> Path:
    """M1: SFT on instruction following (IFT) and evaluation fine-tuning (EFT) together."""
    m1 = folder.root / "m1" / "model"
    records = m1_records(inputs, folder.cfg)
    folder.step(m1, lambda: folder.move(train("sft", m0, records, folder.root / "m1" / "train", folder.cfg.sft), m1),
                f"M1 = SFT(M0, {folder.cfg.m1_data})", folder.root / "m1" / "timings.json")
    return m1


def m1_records(inputs: Inputs, cfg: LoopConfig) -> list[dict]:
    """M1's SFT records: the IFT seed, or as many of its records (drawn with cfg.seed) as make
    EFT `cfg.eft_share` of the whole, at least one below a share of 1 and none at 1
    (cfg.m1_data), then the EFT examples in the form `cfg.eft_target`."""
    eft = data.eft_to_sft(inputs.eft, inputs.template, cfg.eft_target)
    ift = inputs.ift
    if cfg.eft_share is not None:
        want = len(eft) * (1 - cfg.eft_share) / cfg.eft_share
        keep = min(len(ift), max(round(want), 1) if cfg.eft_share < 1 else 0)
        ift = [ift[i] for i in sorted(random.Random(cfg.seed).sample(range(len(ift)), keep))]
    return ift + eft


def evaluate_judge(folder: RunFolder, name: str, model: Path, inputs: Inputs) -> None:
    """eval/judge_{name}.json: the model's judge against the human scores of the EFT-eval set, and
    of the length-free set under "lengthfree" (report.py)."""
    out = folder.root / "eval" / f"judge_{name}.json"
    cfg = folder.cfg

    modes = ("sample", "expected") if cfg.judge_eval_modes == "both" else (cfg.judge_mode,)

    def make():
        with folder.engine(model) as llm:
            result = judge_eval(llm(), cfg, inputs.template, inputs.eft_eval, cfg.seed, modes)
            if inputs.lengthfree:
                result["lengthfree"] = judge_eval(llm(), cfg, inputs.template, inputs.lengthfree, cfg.seed, modes)
        folder.write_json(out, result)
    folder.step(out, make, f"judge eval {name.upper()}", out.parent / "timings.json")


def create_prompts(folder: RunFolder, it: Path, t: int, llm, inputs: Inputs, seed: int) -> list[str]:
    """prompts.jsonl: new prompts, written few-shot by M_t (or cfg.prompt_writer), or drawn from
    cfg.prompt_pool, filtered against the seeds and every earlier iteration's prompts."""
    cfg = folder.cfg

    def make():
        flt = prompt_filter(inputs.seed_prompts, folder.root, t)
        if cfg.prompt_pool:
            prompts, stats = draw_prompts(Path(cfg.prompt_pool), flt, cfg.prompts, seed)
        else:
            def write(writer):
                return selfinstruct.generate_prompts(writer, inputs.seed_prompts, cfg.prompts, seed=seed,
                                                     temperature=cfg.prompt_temperature, top_p=cfg.prompt_top_p,
                                                     prompt_filter=flt)
            if cfg.prompt_writer:
                with folder.engine(Path(cfg.prompt_writer)) as writer:
                    prompts, stats = write(writer())
            else:
                prompts, stats = write(llm())
        folder.write_json(it / "prompt_stats.json", stats)
        if not prompts:
            raise LoopStop(f"iteration {t}: no new prompt survived the filters ({stats}); "
                           f"nothing was written for this iteration, earlier artifacts are intact")
        folder.write_jsonl(it / "prompts.jsonl", [{"prompt": p} for p in prompts])
    folder.step(it / "prompts.jsonl", make, f"iter {t}: prompts", it / "timings.json")
    return [r["prompt"] for r in read_jsonl(it / "prompts.jsonl")]


def sample_candidates(folder: RunFolder, it: Path, t: int, llm, prompts: list[str], seed: int) -> list[dict]:
    """candidates.jsonl: N sampled answers of M_t to each prompt; none for a prompt too long for
    the model's context, which is marked skipped (and makes no pair)."""
    def make():
        outs = chat_fitting(llm(), prompts, candidate_params(folder.cfg, len(prompts), seed))
        folder.write_jsonl(it / "candidates.jsonl", [
            {"prompt": p, "candidates": [], "finish_reasons": [], "skipped": "the prompt does not fit the context"}
            if o is None else
            {"prompt": p, "candidates": [c.text for c in o.outputs],
             "finish_reasons": [c.finish_reason for c in o.outputs]} for p, o in zip(prompts, outs)])
    folder.step(it / "candidates.jsonl", make, f"iter {t}: candidates", it / "timings.json")
    return read_jsonl(it / "candidates.jsonl")


def judge_candidates(folder: RunFolder, it: Path, t: int, llm, cands: list[dict], template: str,
                     seed: int) -> list[dict]:
    """judgments.jsonl: M_t's judgment of every candidate (K samples averaged, or the expected score)."""
    def make():
        flat_i = [c["prompt"] for c in cands for _ in c["candidates"]]
        flat_r = [r for c in cands for r in c["candidates"]]
        recs = iter(judge_items(llm(), folder.cfg, template, flat_i, flat_r, seed))
        folder.write_jsonl(it / "judgments.jsonl", [
            {"prompt": c["prompt"], "candidates": c["candidates"],
             "judgments": [next(recs) for _ in c["candidates"]]} for c in cands])
    folder.step(it / "judgments.jsonl", make, f"iter {t}: judgments", it / "timings.json")
    return read_jsonl(it / "judgments.jsonl")


def build_pairs(folder: RunFolder, it: Path, t: int, judged: list[dict]) -> None:
    """pairs.jsonl: each prompt's (best, worst) candidates, ties dropped -> AIFT(M_t)."""
    cfg = folder.cfg

    def make():
        got, counts = pairing.build_pairs([j["prompt"] for j in judged], [j["candidates"] for j in judged],
                                          [[r["score"] for r in j["judgments"]] for j in judged],
                                          length_control=cfg.length_control, min_margin=cfg.min_margin)
        folder.write_json(it / "pair_counts.json", counts)
        if not got:
            raise LoopStop(f"iteration {t}: no preference pairs ({counts}): every prompt's candidates "
                           f"tied or went unscored; the judgments are kept in {it / 'judgments.jsonl'}")
        folder.write_jsonl(it / "pairs.jsonl", got)
    folder.step(it / "pairs.jsonl", make, f"iter {t}: pairs", it / "timings.json")


def train_dpo_iteration(folder: RunFolder, it: Path, t: int, model: Path, judge_dir: Path, inputs: Inputs,
                        seed: int) -> Path:
    """M_{t+1}: DPO from M_t on AIFT(M_t), its reference log-probs scored once first; the final
    weights, or with select_checkpoints the best checkpoint (selection.py)."""
    cfg, rt, tf = folder.cfg, folder.rt, it / "timings.json"
    folder.step(it / "pairs.ref.jsonl", lambda: compute_reference_logps(
        model, data.load_pairs(it / "pairs.jsonl"), max_seq_len=cfg.dpo.max_seq_len,
        batch_size=cfg.dpo.ref_batch_size, out_path=it / "pairs.ref.jsonl",
        dtype=policy_dtype(cfg.dpo, rt.world, rt.device)), f"iter {t}: reference log-probs", tf)
    pairs = lambda: read_jsonl(it / "pairs.ref.jsonl")  # noqa: E731  read when training runs
    if not cfg.select_checkpoints:
        folder.step(it / "model", lambda: folder.move(train("dpo", model, pairs(), it / "train", cfg.dpo),
                                                      it / "model"), f"iter {t}: DPO -> M{t + 1}", tf)
        return it / "model"
    if not rt.decide((it / "model").exists()):  # every checkpoint's weights kept; the best becomes M_{t+1}
        folder.step(it / "train" / "model", lambda: train("dpo", model, pairs(), it / "train",
                                                          dataclasses.replace(cfg.dpo, keep_models=True)),
                    f"iter {t}: DPO", tf)
        folder.step(it / "selection.json", lambda: select_checkpoint(
            folder, cfg, inputs.template, it / "train", judge_dir, inputs.validation, seed, it / "selection.json"),
            f"iter {t}: checkpoint selection", tf)
    folder.step(it / "model", lambda: folder.move(it / read_json(it / "selection.json")["chosen"], it / "model"),
                f"iter {t}: chosen checkpoint -> M{t + 1}", tf)
    return it / "model"


def evaluate_iteration(folder: RunFolder, it: Path, t: int, new: Path, old: Path, judge_dir: Path,
                       inputs: Inputs, cands: list[dict], judged: list[dict], seed: int) -> None:
    """metrics.json: the iteration's counts and lengths, and M_{t+1}'s win rate over M_t."""
    def make():
        folder.write_json(it / "metrics.json", {
            "iteration": t, "prompts": len(cands), "prompt_stats": read_json(it / "prompt_stats.json"),
            "pair_counts": read_json(it / "pair_counts.json"),
            "skipped_candidate_prompts": sum("skipped" in c for c in cands),
            "candidate_mean_words": mean_words([r for c in cands for r in c["candidates"]]),
            "judge_distribution": histogram([s for j in judged for r in j["judgments"] for s in r["scores"]]),
            "head_to_head": head_to_head(folder.engine, folder.cfg, inputs.template, new, old, judge_dir,
                                         inputs.held_out, seed)})
    folder.step(it / "metrics.json", make, f"iter {t}: evaluation", it / "timings.json")


# ---------------------------------------------------------------------- parts of the steps

def train(kind: str, model: Path, records: list[dict], out_dir: Path, tcfg) -> Path:
    """SFT or DPO on every rank of the job (FSDP2 over them when there are several). A model that
    training already finished (a run killed before moving it) is not trained again."""
    if (out_dir / "model" / "config.json").is_file():  # save_final writes it whole or not at all
        return out_dir / "model"
    return (train_sft if kind == "sft" else train_dpo)(model, records, out_dir, tcfg)


def candidate_params(cfg: LoopConfig, count: int, seed: int) -> list[SamplingParams]:
    """Sampling of the N candidates of each of `count` prompts: a seed per prompt, mixed from the
    iteration's (one seed for the whole call would give candidate j of every prompt the same uniforms)."""
    return [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                           seed=judge.item_seed(seed, i)) for i in range(count)]


def prompt_filter(seed_prompts: list[str], root: Path, t: int) -> selfinstruct.PromptFilter:
    """The filters of iteration t's new prompts: against the seeds and every earlier iteration's."""
    used = [r["prompt"] for i in range(1, t) if (root / f"iter_{i}" / "prompts.jsonl").is_file()
            for r in read_jsonl(root / f"iter_{i}" / "prompts.jsonl")]
    return selfinstruct.PromptFilter(seed_prompts + used)


def draw_prompts(pool: Path, flt: selfinstruct.PromptFilter, count: int, seed: int) -> tuple[list[str], dict]:
    """Up to `count` prompts from a pool file (e.g. written by a larger model, as in the paper),
    through the same filters as written ones."""
    cands = [r["prompt"] if isinstance(r.get("prompt"), str) else "" for r in read_jsonl(pool)]
    random.Random(seed).shuffle(cands)
    kept = []
    for p in cands:
        if len(kept) == count:
            break
        if flt.offer(p):
            kept.append(p)
    return kept, {**flt.stats, "pool": len(cands), "kept": len(kept)}
