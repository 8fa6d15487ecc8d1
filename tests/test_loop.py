"""The self-rewarding loop end to end on a tiny random model: artifacts, resume, bad input.

The tiny model carries SmolLM2's tokenizer (vocab 49152, hidden 32) so the chat template and the
judge's score digits are real; its answers are noise, which is what these tests need: the
mechanics, not the quality. Judging uses the expected-score mode, which never leaves a
candidate unscored, so pairs exist."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from srlm_engine import loop, runfolder, runtime, selection
from srlm_engine.config import SEED_DIR, ConfigError, LoopConfig, ModelConfig
from srlm_engine.io import DataError, read_jsonl, write_jsonl
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import load_model, save_model

POOL = [  # varied enough that ROUGE-L keeps them all apart
    "Why do cats purr when they are content?",
    "Suggest a name for a bakery that sells only bread made with rye.",
    "How many minutes are there in three and a half hours?",
    "Write one sentence persuading a friend to try rock climbing.",
    "What causes the seasons on Earth?",
    "List four vegetables that grow well in shade.",
    "Translate 'the library opens at nine' into French.",
    "Give me a tip for remembering people's names at parties.",
    "Describe the smell of rain to someone who has never noticed it.",
    "Is a tomato botanically a fruit or a vegetable, and why?",
    "Draft a two-line apology for missing a team meeting.",
    "Which planet has the shortest year in our solar system?",
]

# top_p = 1: a random model's flat distribution sends every top-p row to the full-vocabulary sort,
# which is most of these tests' time and none of what they check.
SETTINGS = dict(top_p=1.0, judge_top_p=1.0, iterations=2, prompts=3, n=3, judge_samples=2, judge_mode="expected", max_new_tokens=8,
                judge_max_tokens=8, eval_prompts=3, eval_max_tokens=6, kv_cache_tokens=4096, max_num_seqs=16,
                sft=dict(max_steps=2, micro_batch_size=2, grad_accum=1, max_seq_len=256, save_every=1,
                         progress=False),
                dpo=dict(max_steps=2, micro_batch_size=1, grad_accum=1, max_seq_len=128, save_every=1,
                         progress=False))


def write_tiny_smollm2(d: Path, smollm2_dir: Path, max_position_embeddings: int = 1024) -> Path:
    """A tiny random Llama beside SmolLM2's tokenizer and chat template, in `d`."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    save_model(Llama(cfg).init_weights(0), d)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return write_tiny_smollm2(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A small slice of the shipped seed data, and a prompt pool."""
    d = tmp_path_factory.mktemp("seed")
    for name, n in (("ift.jsonl", 8), ("eft_train.jsonl", 6), ("eft_eval.jsonl", 3), ("eft_eval_lengthfree.jsonl", 2)):
        lines = (SEED_DIR / name).read_text().splitlines()[:n]
        (d / name).write_text("\n".join(lines) + "\n")
    (d / "pool.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in POOL))
    return d


def config(seeds: Path, **over) -> LoopConfig:
    return LoopConfig.build(None, {**SETTINGS, "seed_dir": str(seeds), "prompt_pool": str(seeds / "pool.jsonl")},
                            **over)


def artifacts(run: Path) -> dict[str, bytes]:
    """Every artifact of a run, by relative path, except wall-clock records (timings, tokens/s)."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.is_file() and not (p.name in ("timings.json", "metrics.jsonl") or "/checkpoints/" in rel
                                or rel.startswith("plots/") or p.name == "report.md"):
            out[rel] = p.read_bytes()
    return out


def test_each_prompts_candidates_draw_from_their_own_seed(seeds):
    cfg = config(seeds)
    ps = loop.candidate_params(cfg, 5, seed=1001)
    assert [(p.n, p.temperature, p.top_p, p.max_tokens) for p in ps] == [(3, 0.7, 1.0, 8)] * 5
    assert len({p.seed for p in ps}) == 5  # one seed for the call drew the same uniforms for every prompt
    assert [p.seed for p in loop.candidate_params(cfg, 5, seed=1001)] == [p.seed for p in ps]  # reproducible
    assert not {p.seed for p in ps} & {p.seed for p in loop.candidate_params(cfg, 5, seed=1002)}  # next iteration


@pytest.mark.slow  # two full iterations (SFT, generation, judging, DPO, evaluation) in one process: ~1 min
def test_two_iterations_end_to_end(tmp_path, tiny_model, seeds):
    run = tmp_path / "run"
    logs = []
    final = loop.run(tiny_model, run, config(seeds), log=logs.append)
    assert final == run / "iter_2" / "model"
    for t in (1, 2):
        it = run / f"iter_{t}"
        prompts = [r["prompt"] for r in read_jsonl(it / "prompts.jsonl")]
        assert len(prompts) == 3 and set(prompts) <= set(POOL)
        cands = read_jsonl(it / "candidates.jsonl")
        assert [c["prompt"] for c in cands] == prompts and all(len(c["candidates"]) == 3 for c in cands)
        judged = read_jsonl(it / "judgments.jsonl")
        scores = [r["score"] for j in judged for r in j["judgments"]]
        assert len(scores) == 9 and all(0 <= s <= 5 for s in scores)
        pairs = read_jsonl(it / "pairs.jsonl")
        assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        refs = read_jsonl(it / "pairs.ref.jsonl")
        assert len(refs) == len(pairs) and all(r["ref_chosen_logp"] < 0 and r["ref_rejected_logp"] < 0 for r in refs)
        load_model(it / "model")  # loads, complete
        m = json.loads((it / "metrics.json").read_text())
        assert 0 <= m["head_to_head"]["win_rate"] <= 1 and m["pair_counts"]["pairs"] == len(pairs)
    # Prompts are never reused across iterations.
    p1 = {r["prompt"] for r in read_jsonl(run / "iter_1" / "prompts.jsonl")}
    assert not p1 & {r["prompt"] for r in read_jsonl(run / "iter_2" / "prompts.jsonl")}
    for name in ("m0", "m1", "m2", "m3"):
        e = json.loads((run / "eval" / f"judge_{name}.json").read_text())
        assert set(e) == {"sample", "expected", "length_rule", "lengthfree"} and e["expected"]["parse_rate"] == 1.0
        assert set(e["lengthfree"]) == {"sample", "expected", "length_rule"}  # the second set, judged alike
    report = (run / "report.md").read_text()
    assert "pairwise accuracy" in report and "win rate" in report
    assert "Judge vs human scores on the length-free set, expected mode" in report
    assert 'The rule "the longer answer is better" orders' in report
    assert all((run / "plots" / p).stat().st_size > 1000 for p in ("judge_vs_human.png", "iterations.png",
                                                                    "training.png"))
    assert "| M1 (SFT) |" in report and "| iteration 2 (DPO) |" in report  # the training curves' table

    # A rerun resumes at the first missing artifact: here there is none, so nothing changes.
    before = artifacts(run)
    logs.clear()
    loop.run(tiny_model, run, config(seeds), log=logs.append)
    assert artifacts(run) == before
    assert not any(line.endswith("running") for line in logs)

    # The same folder with another config is refused, naming what changed.
    with pytest.raises(loop.LoopStop, match=r"another config.*n: 3 -> 4"):
        loop.run(tiny_model, run, config(seeds, n=4))


def _loop_cmd(tiny_model: Path, run: Path, cfg_file: Path) -> list[str]:
    return [sys.executable, "-m", "srlm_engine.cli", "loop", "--model", str(tiny_model), "--out", str(run),
            "--config", str(cfg_file)]


def _write_toml(path: Path, seeds: Path) -> Path:
    small = path.parent / "seed"  # one EFT-eval item keeps the judge evaluations short
    shutil.copytree(seeds, small)
    (small / "eft_eval.jsonl").write_text((seeds / "eft_eval.jsonl").read_text().splitlines()[0] + "\n")
    seeds = small
    # One iteration; judging generates a justification first so it lasts long enough to be killed.
    path.write_text(f"""top_p = 1.0
judge_top_p = 1.0
iterations = 1
prompts = 8
n = 3
judge_mode = "expected"
expected_after = "judgment"
judge_max_tokens = 500
judge_samples = 1
judge_eval_modes = "loop"
max_new_tokens = 8
eval_prompts = 2
eval_max_tokens = 4
kv_cache_tokens = 8192
seed_dir = "{seeds}"
prompt_pool = "{seeds / 'pool.jsonl'}"
[sft]
max_steps = 2
micro_batch_size = 2
max_seq_len = 256
progress = false
[dpo]
max_steps = 6
micro_batch_size = 1
max_seq_len = 128
save_every = 1
progress = false
""")
    return path


def _run_until(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start the loop, SIGKILL it as soon as `ready()` holds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "the loop ended before the point where the test kills it"
            assert time.time() - t0 < timeout
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_a_batch_that_nproc_does_not_divide_is_refused_before_any_work(tmp_path, seeds, capsys):
    from srlm_engine.cli import main
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "config.json").write_text("{}")
    # refused by `srlm loop --nproc 3` itself, before torchrun starts any process
    assert main(["loop", "--model", tmp_path / "m0", "--out", tmp_path / "run", "--preset", "paper",
                 "--nproc", "3"]) == 2
    assert ("global_batch_size 16 is not a multiple of processes x micro_batch_size = 3 x 4"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_choose_checkpoint_keeps_the_best_so_far():
    # 4 prompts; checkpoint 1 beats 0, 2 ties 1 (1/2 is no win), 3 loses to 1 though it beats 0
    scores = [[1, 1, 1, 1], [3, 3, 1, None], [3, 3, 1, 5], [2, 2, 2, 2]]
    best, rounds = selection.choose_checkpoint(scores)
    assert best == 1
    assert [(r["candidate"], r["against"], r["win_rate"], r["unscored"], r["best"]) for r in rounds] == [
        (1, 0, 2.5 / 3, 1, 1), (2, 1, 0.5, 1, 1), (3, 1, 1 / 3, 1, 1)]
    assert selection.choose_checkpoint([[None], [5.0]]) == (0, [dict(candidate=1, against=0, wins=0, ties=0, losses=0,
                                                                unscored=1, win_rate=None, best=0)])
    assert selection.choose_checkpoint([[2.0]]) == (0, [])


def test_m1_records_follow_eft_share_and_eft_target():
    from srlm_engine.judge import DEFAULT_TEMPLATE
    ift = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(10)]
    eft = [{"instruction": f"q{i}", "response": f"r{i}", "justification": "Fine.", "score": i % 6} for i in range(9)]
    inputs = loop.Inputs(DEFAULT_TEMPLATE, ift, eft, [], None, [], [], [])
    assert loop.m1_records(inputs, LoopConfig())[:10] == ift  # every IFT record, then the 9 EFT ones
    recs = loop.m1_records(inputs, LoopConfig(eft_share=0.75, eft_target="score"))
    assert len(recs) == 3 + 9 and all(r in ift for r in recs[:3])  # 9 EFT records are 75% of 12
    assert [r["messages"][1]["content"] for r in recs[3:]] == [f"Score: {e['score']}" for e in eft]
    assert recs == loop.m1_records(inputs, LoopConfig(eft_share=0.75, eft_target="score"))  # seeded
    assert len(loop.m1_records(inputs, LoopConfig(eft_share=1.0))) == 9  # EFT alone: cfg.m1_data says so
    assert len(loop.m1_records(inputs, LoopConfig(eft_share=0.99))) == 1 + 9  # below 1, some IFT
    assert (LoopConfig(eft_share=1.0).m1_data, LoopConfig(eft_share=0.99).m1_data) == ("EFT alone", "IFT + EFT")
    with pytest.raises(ConfigError, match="eft_share"):
        LoopConfig(eft_share=0.0)


def test_eft_extra_adds_its_examples_from_the_seed_folder(tmp_path):
    seeds = tmp_path / "seed"
    shutil.copytree(SEED_DIR, seeds)
    base = loop.Inputs.load(LoopConfig(seed_dir=str(seeds)))
    extra = [{"instruction": "q", "response": "r", "justification": "Fine.", "score": 3}]
    write_jsonl(seeds / "more.jsonl", extra)
    for name in ("more.jsonl", str(seeds / "more.jsonl")):  # a name in the seed folder, or a path
        assert loop.Inputs.load(LoopConfig(seed_dir=str(seeds), eft_extra=name)).eft == base.eft + extra
    shipped = loop.Inputs.load(LoopConfig(eft_extra="eft_near_topic.jsonl")).eft
    assert len(shipped) == len(base.eft) + 336
    (seeds / "bad.jsonl").write_text(json.dumps(extra[0]) + "\n" + json.dumps({**extra[0], "score": 9}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):  # the file and line of a bad example
        loop.Inputs.load(LoopConfig(seed_dir=str(seeds), eft_extra="bad.jsonl"))
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        loop.Inputs.load(LoopConfig(seed_dir=str(seeds), eft_extra="missing.jsonl"))


@pytest.mark.slow  # one iteration whose DPO keeps 3 checkpoints' weights and scores each: ~40 s
def test_checkpoint_selection_picks_m2_among_the_dpo_checkpoints(tmp_path, tiny_model, seeds):
    cfg = config(seeds, iterations=1, select_checkpoints=True, select_prompts=3,
                 dpo={**SETTINGS["dpo"], "max_steps": 3, "keep_last": 1})
    run = tmp_path / "run"
    logs = []
    final = loop.run(tiny_model, run, cfg, log=logs.append)
    it = run / "iter_1"
    sel = json.loads((it / "selection.json").read_text())
    assert [c["step"] for c in sel["candidates"]] == [1, 2, 3] and sel["prompts"] == 3
    assert [(r["candidate"], r["against"]) for r in sel["rounds"]] == [(2, 1), (3, sel["rounds"][0]["best"])]
    answers = {c["step"]: json.loads((it / "selection" / f"step-{c['step']:08d}.json").read_text()) for c in
               sel["candidates"]}
    scores = [answers[s]["scores"] for s in (1, 2, 3)]
    assert selection.choose_checkpoint(scores)[0] + 1 == sel["chosen_step"]  # the rounds recomputed from the scores
    assert all(len(a["answers"]) == 3 for a in answers.values())
    # M2 is the chosen checkpoint's weights, moved into place; the others stay where they were
    assert final == it / "model" and not (it / sel["chosen"]).exists()
    steps_left = {c["step"] for c in sel["candidates"] if (it / c["model"]).exists()}
    assert steps_left == {1, 2, 3} - {sel["chosen_step"]}
    weights = {s: load_model(it / c["model"]).embed_tokens.weight for s, c in
               ((c["step"], c) for c in sel["candidates"]) if s in steps_left}
    chosen = load_model(final).embed_tokens.weight
    assert all(not torch.equal(chosen, w) for w in weights.values())  # it is none of the others
    assert "Checkpoint selection" in (run / "report.md").read_text()
    # a rerun finds everything done
    logs.clear()
    loop.run(tiny_model, run, cfg, log=logs.append)
    assert not any("running" in line for line in logs)


@pytest.mark.slow  # four loop runs in subprocesses, two of them killed: ~1 min
def test_killed_in_judging_and_in_dpo_resumes_to_identical_artifacts(tmp_path, tiny_model, seeds):
    cfg_file = _write_toml(tmp_path / "loop.toml", seeds)
    ref = tmp_path / "uninterrupted"
    subprocess.run(_loop_cmd(tiny_model, ref, cfg_file), check=True, capture_output=True)

    run = tmp_path / "killed"
    it = run / "iter_1"
    # Killed while judging: candidates are written, judgments are not.
    _run_until(_loop_cmd(tiny_model, run, cfg_file),
               lambda: (it / "candidates.jsonl").exists() and time.sleep(0.3) is None)
    assert (it / "candidates.jsonl").exists() and not (it / "judgments.jsonl").exists()
    # Killed during DPO, after its first checkpoint.
    _run_until(_loop_cmd(tiny_model, run, cfg_file),
               lambda: any((it / "train" / "checkpoints").glob("step-*")) if (it / "train" / "checkpoints").exists()
               else False)
    assert not (it / "model").exists()
    subprocess.run(_loop_cmd(tiny_model, run, cfg_file), check=True, capture_output=True)
    a, b = artifacts(ref), artifacts(run)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_empty_prompt_set_after_filtering_stops_clearly(tmp_path, tiny_model, seeds):
    pool = tmp_path / "pool.jsonl"  # every prompt repeats a seed prompt: the filters drop them all
    seed_prompts = [r["messages"][0]["content"] for r in read_jsonl(seeds / "ift.jsonl")]
    pool.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in seed_prompts))
    run = tmp_path / "run"
    cfg = config(seeds, prompt_pool=str(pool), iterations=1)
    with pytest.raises(loop.LoopStop, match=r"iteration 1: no new prompt survived the filters.*duplicate"):
        loop.run(tiny_model, run, cfg, log=lambda *_: None)
    assert (run / "m1" / "model" / "config.json").is_file()  # M1 is kept
    assert not (run / "iter_1" / "prompts.jsonl").exists()


def test_no_pairs_after_ties_stops_clearly(tmp_path, tiny_model, seeds):
    # Sampled judgments from a random model never end in a score line: all unscored, no pairs.
    run = tmp_path / "run"
    cfg = config(seeds, judge_mode="sample", iterations=1)
    with pytest.raises(loop.LoopStop, match=r"iteration 1: no preference pairs"):
        loop.run(tiny_model, run, cfg, log=lambda *_: None)
    judged = read_jsonl(run / "iter_1" / "judgments.jsonl")
    assert all(r["score"] is None for j in judged for r in j["judgments"])
    assert not (run / "iter_1" / "pairs.jsonl").exists()


def test_disk_full_while_writing_an_artifact(tmp_path, tiny_model, seeds, monkeypatch):
    run = tmp_path / "run"
    cfg = config(seeds, iterations=1)
    real_replace = os.replace

    def full(src, dst):  # the disk fills up exactly when candidates.jsonl is committed
        if str(dst).endswith("candidates.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=r"candidates\.jsonl: cannot write: No space left on device"):
        loop.run(tiny_model, run, cfg, log=lambda *_: None)
    it = run / "iter_1"
    assert [p.name for p in it.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert read_jsonl(it / "prompts.jsonl") and not (it / "candidates.jsonl").exists()
    monkeypatch.setattr(os, "replace", real_replace)
    before = (it / "prompts.jsonl").read_bytes()
    loop.run(tiny_model, run, cfg, log=lambda *_: None)  # space again: resumes from the candidates
    assert (it / "prompts.jsonl").read_bytes() == before and (it / "metrics.json").is_file()


def test_seed_ift_record_without_user_turn_is_a_data_error(tmp_path, seeds):
    # Each seed IFT record's first user turn is a seed prompt: a record without one is named by
    # file and line before any work starts (it was a bare StopIteration).
    bad = tmp_path / "seed"
    shutil.copytree(seeds, bad)
    with open(bad / "ift.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "system", "content": "s"},
                                         {"role": "assistant", "content": "a"}]}) + "\n")
    model = tmp_path / "m0"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"ift\.jsonl:9: messages hold no user turn"):
        loop.run(model, tmp_path / "run", config(bad, iterations=1), log=lambda *_: None)


def test_a_run_stopped_by_bad_seed_data_resumes_once_the_data_is_fixed(tmp_path, seeds):
    # The seeds are checked before the run folder is pinned to their hashes: a folder where
    # nothing was made is not refused as "made with other inputs" after the user fixes the line.
    fixed = tmp_path / "seed"
    shutil.copytree(seeds, fixed)
    good = (fixed / "eft_train.jsonl").read_text()
    (fixed / "eft_train.jsonl").write_text(good + json.dumps({"instruction": "q", "response": "r",
                                                               "justification": "j", "score": 9}) + "\n")
    model = tmp_path / "m0"
    model.mkdir()
    (model / "config.json").write_text("{}")
    run, cfg = tmp_path / "run", config(fixed, iterations=1)
    with pytest.raises(DataError, match=r"eft_train\.jsonl:7: field 'score' must be an integer"):
        loop.run(model, run, cfg, log=lambda *_: None)
    assert not (run / "manifest.json").exists()
    (fixed / "eft_train.jsonl").write_text(good)
    with pytest.raises(ConfigError, match="missing field 'vocab_size'"):  # on to M1: this stub model
        loop.run(model, run, cfg, log=lambda *_: None)


class FakeEngine:
    """Answers every prompt with "x"; a context of 100 tokens, one per character."""
    max_model_len = 100
    tokenizer = SimpleNamespace(apply_chat_template=lambda msgs: msgs[0]["content"],
                                encode=lambda text, add_special_tokens=False: [0] * len(text))

    def generate(self, ids, params, use_tqdm=True):
        return [SimpleNamespace(outputs=[SimpleNamespace(text="x")]) for _ in ids]


class FakeEngines:
    """An `engine(model_dir)` context-manager factory, as RunFolder.engine, of FakeEngines; it
    records, at each engine opened, how many are open."""

    def __init__(self):
        self.open, self.open_at_start = 0, []

    @contextlib.contextmanager
    def __call__(self, model_dir):
        self.open_at_start.append(self.open)
        self.open += 1
        try:
            yield FakeEngine
        finally:
            self.open -= 1


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_engines_run_on_the_gpu_where_there_is_one(monkeypatch, cuda):
    # as the trainer does: on a GPU machine generation runs on the GPU, not on the host's CPU
    made = []
    monkeypatch.setattr(runtime, "LLM", lambda path, **kw: made.append((path, kw)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    runtime.open_engine(Path("m1"), LoopConfig(dtype="bfloat16", kv_cache_tokens=4096, max_num_seqs=8))
    assert made == [("m1", dict(dtype=torch.bfloat16, device="cuda:0" if cuda else "cpu", kv_cache_tokens=4096,
                                max_num_seqs=8))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_iteration_on_the_gpu(tmp_path, tiny_model, seeds, monkeypatch):
    """The whole loop on a GPU machine: every engine on CUDA (Triton paged attention, CUDA-graph
    decode), SFT and DPO on CUDA (the Triton fused log-prob), each engine freed before the next."""
    devices = []

    def recording(d, cfg, *a, **kw):
        llm = real(d, cfg, *a, **kw)
        devices.append(llm.device.type)
        return llm
    real = runfolder.open_engine
    monkeypatch.setattr(runfolder, "open_engine", recording)
    run = tmp_path / "run"
    assert loop.run(tiny_model, run, config(seeds, iterations=1), log=lambda *_: None) == run / "iter_1" / "model"
    assert len(devices) >= 4 and set(devices) == {"cuda"}
    judged = read_jsonl(run / "iter_1" / "judgments.jsonl")
    assert len(judged) == 3 and all(0 <= r["score"] <= 5 for j in judged for r in j["judgments"])
    pairs = read_jsonl(run / "iter_1" / "pairs.jsonl")
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    load_model(run / "iter_1" / "model")
    for name in ("m0", "m1", "m2"):
        e = json.loads((run / "eval" / f"judge_{name}.json").read_text())
        assert e["expected"]["parse_rate"] == 1.0


def test_head_to_head_frees_each_engine_before_the_next(monkeypatch):
    engines = FakeEngines()
    monkeypatch.setattr(selection, "judge_items", lambda llm, cfg, t, i, r, seed, mode=None: [{"score": 1.0} for _ in i])
    h = selection.head_to_head(engines, LoopConfig(), "", Path("new"), Path("old"), Path("judge"), ["p", "q"], 0)
    assert engines.open_at_start == [0, 0, 0] and engines.open == 0
    assert (h["wins"], h["ties"], h["losses"], h["unscored"], h["win_rate"]) == (0, 2, 0, 0, 0.5)


def test_a_prompt_too_long_for_the_context_is_skipped_and_counted_not_fatal(monkeypatch):
    # one held-out prompt longer than the model's context: it is left out of the head-to-head as
    # unscored, and the others are compared (the engine would refuse it, stopping the iteration)
    judged = []

    def judge_items(llm, cfg, t, i, r, seed, mode=None):
        judged.extend(i)
        return [{"score": 3.0} for _ in i]
    monkeypatch.setattr(selection, "judge_items", judge_items)
    prompts = ["short", "y" * 150, "also short"]
    h = selection.head_to_head(FakeEngines(), LoopConfig(), "", Path("new"), Path("old"), Path("judge"), prompts, 0)
    assert (h["ties"], h["unscored"], h["skipped"], h["win_rate"]) == (2, 1, 1, 0.5)
    assert "y" * 150 not in judged
    assert selection.chat_fitting(FakeEngine(), prompts, None)[1] is None


def test_head_to_head_counts_unscored_apart(monkeypatch):
    # new, then old answers' scores for 4 prompts: a win, a loss, and two where the judge gave no score
    scores = iter([4.0, 1.0, None, 3.0, 2.0, 3.0, 2.0, None])
    monkeypatch.setattr(selection, "judge_items",
                        lambda llm, cfg, t, i, r, seed, mode=None: [{"score": next(scores)} for _ in i])
    h = selection.head_to_head(FakeEngines(), LoopConfig(), "", Path("new"), Path("old"), Path("judge"),
                               ["a", "b", "c", "d"], 0)
    assert (h["wins"], h["ties"], h["losses"], h["unscored"], h["win_rate"]) == (1, 0, 1, 2, 0.5)
    scores = iter([None] * 4)
    h = selection.head_to_head(FakeEngines(), LoopConfig(), "", Path("new"), Path("old"), Path("judge"), ["a", "b"], 0)
    assert (h["wins"], h["ties"], h["losses"], h["unscored"], h["win_rate"]) == (0, 0, 0, 2, None)


def test_one_engine_alive_at_a_time_in_a_run(monkeypatch, tmp_path, tiny_model, seeds):
    # The judge evaluations of M0 and M1, then M_t's engine for the iteration's generation: each
    # is freed before the next is made, and M_t's before pairs and training. An engine is given a
    # reference to itself, as real ones hold reference cycles: only the collector frees it, and only
    # once nobody refers to it any more.
    live, alive_at_start, alive_at_pairs = weakref.WeakSet(), [], []
    real_open, real_pairs = runfolder.open_engine, loop.pairing.build_pairs

    def tracked(*a, **kw):
        alive_at_start.append(len(live))
        llm = real_open(*a, **kw)
        llm.me = llm
        live.add(llm)
        return llm

    def build_pairs(*a, **kw):
        alive_at_pairs.append(len(live))
        return real_pairs(*a, **kw)
    monkeypatch.setattr(runfolder, "open_engine", tracked)
    monkeypatch.setattr(loop.pairing, "build_pairs", build_pairs)
    with pytest.raises(loop.LoopStop, match="no preference pairs"):  # sampled judging of a random model
        loop.run(tiny_model, tmp_path / "run", config(seeds, judge_mode="sample", iterations=1), log=lambda *_: None)
    assert alive_at_start == [0, 0, 0] and alive_at_pairs == [0]


def test_a_finished_training_is_not_run_again(tmp_path, monkeypatch):
    # killed after the trainer wrote train/model but before the loop moved it into place
    done = tmp_path / "train" / "model"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    monkeypatch.setattr(loop, "train_dpo", lambda *a: pytest.fail("trained again"))
    assert loop.train("dpo", tmp_path / "m", [], tmp_path / "train", None) == done


def test_new_prompts_are_filtered_against_earlier_iterations(tmp_path):
    # written (not only drawn) prompts of iteration 2 must not repeat iteration 1's
    seen = "Write a short poem about the sea at night for a child."
    (tmp_path / "iter_1").mkdir()
    (tmp_path / "iter_1" / "prompts.jsonl").write_text(json.dumps({"prompt": seen}) + "\n")
    seeds = ["Explain how a rainbow forms in simple terms please."]
    assert loop.prompt_filter(seeds, tmp_path, 1).check(seen) is None
    assert loop.prompt_filter(seeds, tmp_path, 2).check(seen) == "duplicate"
    assert loop.prompt_filter(seeds, tmp_path, 2).check(seeds[0]) == "duplicate"


def test_judge_eval_command_judges_as_the_loop_does(monkeypatch, capsys, tiny_model, seeds, tmp_path):
    # `srlm judge-eval` opened its engine in float32 while the loop judges in cfg.dtype (bfloat16):
    # its figures did not match eval/judge_m*.json
    from srlm_engine.cli import main
    dtypes, maxes, real = [], [], runtime.open_engine

    def opened(d, cfg):
        dtypes.append(cfg.dtype)
        maxes.append(cfg.judge_max_tokens)
        return real(d, cfg)
    monkeypatch.setattr(runtime, "open_engine", opened)
    lengthfree = tmp_path / "lengthfree.jsonl"  # two items of the shipped set keep it short
    lengthfree.write_text("".join((SEED_DIR / "eft_eval_lengthfree.jsonl").read_text().splitlines(True)[:2]))
    args = ["judge-eval", "--model", str(tiny_model), "--data", str(seeds / "eft_eval.jsonl"), "--judge-samples", "1",
            "--judge-max-tokens", "12", "--lengthfree", str(lengthfree)]
    assert main(args) == 0 and main(args + ["--dtype", "float32"]) == 0
    assert dtypes == [LoopConfig().dtype, "float32"] and LoopConfig().dtype == "auto"
    assert maxes == [12, 12]
    out = capsys.readouterr().out
    for name in ("EFT-eval", "length-free"):  # both sets, each beside the length rule
        assert f"{name}, sample mode: parse rate" in out and f"{name}, expected mode: parse rate" in out
        assert f"the length rule on {name} (" in out
    assert "| | " + str(tiny_model) + " | longer is better |" in out


def test_judge_samples_of_identical_items_are_drawn_independently(tiny_model):
    # Two identical (instruction, answer) items in one seeded call: with one shared seed, sample j of both would
    # draw the same random numbers and write the same judgment; with a seed per item they are independent draws.
    from srlm_engine.engine import LLM
    from srlm_engine.judge import judge_samples
    llm = LLM(tiny_model, dtype=torch.float32, device="cpu", kv_cache_tokens=4096)
    a, b = judge_samples(llm, ["Name a river."] * 2, ["The Nile."] * 2, k=2, max_tokens=12, seed=3)
    assert a.texts != b.texts
    again = judge_samples(llm, ["Name a river."] * 2, ["The Nile."] * 2, k=2, max_tokens=12, seed=3)
    assert [j.texts for j in again] == [a.texts, b.texts]  # still reproducible from the one seed
