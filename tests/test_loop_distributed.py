"""The loop as one SPMD job under torchrun (gloo on CPU): data-parallel generation gives the same
artifacts as one process, a killed rank's job resumes from the finished shards, and a run
folder holds one job at a time. The tiny model and seeds are test_loop.py's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srlm_engine.engine.data_parallel import balanced_shards
from srlm_engine.runlock import RunLock, RunLocked
from test_loop import SETTINGS, artifacts, seeds, tiny_model  # noqa: F401  (fixtures)


def test_shards_balance_expected_tokens_not_request_counts():
    # one long request against five short ones: 2 ranks split 100 | 5 x 20, not 3 | 3
    assert balanced_shards([20, 20, 100, 20, 20, 20], 2) == [[2], [0, 1, 3, 4, 5]]
    shards = balanced_shards(list(range(1, 12)), 3)
    assert sorted(i for s in shards for i in s) == list(range(11))  # each request once
    assert [sum(i + 1 for i in s) for s in shards] == [22, 22, 22]  # 66 tokens in 3 equal parts
    assert balanced_shards([5], 3) == [[0], [], []]  # fewer requests than ranks
    assert balanced_shards([3, 3, 3, 3], 2) == [[0, 2], [1, 3]]  # ties: deterministic, by index


def test_a_held_run_folder_is_refused_and_a_dead_jobs_lock_taken_over(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=rf"held by another job \(host .+, pid {os.getpid()},"):
            RunLock(tmp_path).acquire()
    # a job killed without releasing: its holder line stays, but the kernel dropped its flock
    (tmp_path / ".lock").write_text(json.dumps({"host": "node7", "pid": 999999, "since": "then"}))
    lock = RunLock(tmp_path).acquire()
    assert lock.previous == {"host": "node7", "pid": 999999, "since": "then"}
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_second_loop_on_a_held_folder_exits_at_once_naming_the_holder(tmp_path, capsys):
    from srlm_engine.cli import main
    model = tmp_path / "m0"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with RunLock(tmp_path / "run"):
        assert main(["loop", "--model", str(model), "--out", str(tmp_path / "run"), "--preset", "quick"]) == 1
    err = capsys.readouterr().err
    assert "is held by another job (host " in err and f"pid {os.getpid()}" in err


def _toml(path: Path, seeds: Path, **over) -> Path:
    settings = {**SETTINGS, "iterations": 1, "seed_dir": str(seeds), "prompt_pool": str(seeds / "pool.jsonl"),
                "sft": {**SETTINGS["sft"], "global_batch_size": 4, "grad_accum": None},
                "dpo": {**SETTINGS["dpo"], "global_batch_size": 4, "grad_accum": None}, **over}
    lines, tables = [], []
    for k, v in settings.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in lines if v is not None)
    for name, table in tables:
        text += f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items() if v is not None)
    path.write_text(text)
    return path


def _srlm_loop(model: Path, run: Path, cfg: Path, nproc: int, env: dict | None = None):
    cmd = [sys.executable, "-m", "srlm_engine.cli", "loop", "--model", str(model), "--out", str(run),
           "--config", str(cfg), "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.slow  # five runs of one iteration of the loop, in 1 and 2 (twice) processes, then 1 and 4: ~1 min
def test_two_and_four_processes_write_the_same_artifacts_as_one_and_resume_after_a_killed_rank(
        tmp_path, tiny_model, seeds):
    # Each rank runs one micro-batch per training step: 2 ranks x 2 sequences for SFT's global batch
    # of 4, 2 x 1 for DPO's 2. One process accumulates the same micro-batches in turn.
    cfg = _toml(tmp_path / "loop.toml", seeds, dpo={**SETTINGS["dpo"], "global_batch_size": 2, "grad_accum": None})
    one = _srlm_loop(tiny_model, tmp_path / "one", cfg, 1)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    # rank 1 is killed in the candidates phase, its shard computed but not saved, rank 0's saved
    run = tmp_path / "two"
    killed = _srlm_loop(tiny_model, run, cfg, 2, env={"SRLM_KILL_RANK": "candidates:1"})
    assert killed.returncode != 0
    shards = run / "shards" / "iter_1" / "candidates"
    assert [p.name for p in sorted(shards.iterdir())] == ["call-0000.rank-0-of-2.json"]
    assert (run / "iter_1" / "prompts.jsonl").is_file() and not (run / "iter_1" / "candidates.jsonl").exists()

    again = _srlm_loop(tiny_model, run, cfg, 2)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert "[rank 0/2] candidates: " in out and "(shard done before)" in out  # rank 0 kept its shard
    assert "[rank 1/2] candidates: " in out and "[rank 1/2] judgments: " in out  # each rank's share, logged
    assert not (run / "shards").exists() or not any((run / "shards").rglob("*.json"))  # spent shards removed

    # Every artifact byte for byte, the trained weights, the expected-mode judge scores and the
    # reference log-probs included. CPU prefill is batch-invariant (tests/engine/
    # test_batch_invariance.py), so a judge prompt's logits do not depend on which rank scored it
    # or what that rank had cached; the ranks' gradients are summed in rank order
    # (train/parallel.OrderedReduceScatter), the order in which one process accumulates the same
    # micro-batches, and the gradient norm in float64, so M1 and M2 are the same models.
    a, b = artifacts(tmp_path / "one"), artifacts(run)
    assert set(a) == set(b) and any(k.endswith(".safetensors") for k in a)
    assert [k for k in sorted(a) if a[k] != b[k]] == []

    # Four ranks of one sequence each, against one process of four micro-batches of one. Every
    # step is clipped, so the gradient norm's bits move the weights too.
    batch = {"global_batch_size": 4, "micro_batch_size": 1, "grad_accum": None, "max_grad_norm": 0.01}
    cfg4 = _toml(tmp_path / "loop4.toml", seeds, sft={**SETTINGS["sft"], **batch}, dpo={**SETTINGS["dpo"], **batch})
    one4 = _srlm_loop(tiny_model, tmp_path / "one4", cfg4, 1)
    four = _srlm_loop(tiny_model, tmp_path / "four", cfg4, 4)
    for r in (one4, four):
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[rank 3/4] judgments: " in four.stdout + four.stderr
    a, c = artifacts(tmp_path / "one4"), artifacts(tmp_path / "four")
    assert set(a) == set(c)
    assert [k for k in sorted(a) if a[k] != c[k]] == []
    for phase in ("m1", "iter_1"):  # metrics.jsonl holds wall times too: its norms are compared here
        norms = [[json.loads(x)["grad_norm"] for x in (tmp_path / run / phase / "train" / "metrics.jsonl").open()]
                 for run in ("one4", "four")]
        assert norms[0] == norms[1] and min(norms[0]) > 0.01, phase


@pytest.mark.slow  # one iteration in 1 process and in 2 (one tensor-parallel engine over both): ~1.5 min
def test_tensor_parallel_generation_in_the_loop_matches_one_process(tmp_path, tiny_model, seeds):
    # The candidates are sampled at temperature 0.2: at the default 0.7 the random model's
    # distribution is near-flat over the whole vocabulary, the inverse CDF has thousands of near-equal
    # steps, and the last-bit difference of the row-parallel sums moves a draw across one of them now
    # and then (a token in ~70 changed). Sharper distributions keep this about the engines.
    cfg = _toml(tmp_path / "loop.toml", seeds, temperature=0.2)
    one = _srlm_loop(tiny_model, tmp_path / "one", cfg, 1)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    tp = subprocess.run([sys.executable, "-m", "srlm_engine.cli", "loop", "--model", str(tiny_model), "--out",
                         str(tmp_path / "tp"), "--config", str(cfg), "--nproc", "2", "--tp", "2"],
                        capture_output=True, text=True, timeout=900)
    assert tp.returncode == 0, tp.stdout[-3000:] + tp.stderr[-3000:]
    assert "data-parallel 1 x tensor-parallel 2" in tp.stdout + tp.stderr
    a, b = artifacts(tmp_path / "one"), artifacts(tmp_path / "tp")
    assert set(a) == set(b)
    # the same tokens; the row-parallel sums add the ranks' partials in another order, so scores
    # and log-probs agree to float rounding
    for k in ("iter_1/prompts.jsonl", "iter_1/candidates.jsonl"):
        assert a[k] == b[k], k
    for k in sorted(k for k in a if k.endswith((".json", ".jsonl")) and a[k] != b[k]):
        assert _close(_json(a[k]), _json(b[k]), rel=1e-4), k


def _json(raw: bytes):
    text = raw.decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(x) for x in text.splitlines()]


def _close(x, y, rel: float = 1e-6) -> bool:
    """Equal JSON, floats within `rel` relative."""
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= rel * max(1.0, abs(x))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], rel) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v, rel) for u, v in zip(x, y))
    return x == y
