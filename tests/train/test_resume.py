"""A run killed with SIGKILL and resumed from its last checkpoint ends with the same weights as
a run never interrupted. Slow: three training subprocesses (one killed midway)."""
import json
import signal
import time

import pytest
import torch

from srlm_engine.model.weights import load_model
from trainkit import DATA, srlm

ARGS = ["--max-seq-len", 64, "--micro-batch-size", 2, "--grad-accum", 2, "--lr", 1e-3, "--max-steps", 14,
        "--save-every", 2, "--keep-last", 2, "--warmup-steps", 2, "--no-progress"]


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    data = ["--data", DATA / "sft_train.jsonl"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    srlm("sft", "--model", tiny_model, *data, "--out", full, *ARGS)

    p = srlm("sft", "--model", tiny_model, *data, "--out", killed, *ARGS, popen=True)
    target = killed / "checkpoints" / "step-00000004" / "state.json"
    deadline = time.time() + 300
    while not target.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()

    r = srlm("sft", "--model", tiny_model, *data, "--out", killed, *ARGS)
    assert "resuming at step" in r.stdout
    a, b = load_model(full / "model").state_dict(), load_model(killed / "model").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))
    losses = lambda out: [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(full) == losses(killed)
