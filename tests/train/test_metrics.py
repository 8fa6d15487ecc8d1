"""The training log: TRL's metric names with values computed independently, and TensorBoard
only when asked for (a run without it never imports it; without the package, a clear error)."""
import importlib.util
import json
import sys
import types

import pytest
import torch

from srlm_engine.cli import main
from srlm_engine.config import ConfigError, TrainConfig
from srlm_engine.model.weights import load_model
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.metrics import MetricsLog, read_metrics
from srlm_engine.train.refs import compute_reference_logps
from srlm_engine.train.trainer import train_dpo, train_sft
from trainkit import DATA

TRL_DPO = {"loss", "grad_norm", "learning_rate", "epoch", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
CFG = dict(max_seq_len=64, micro_batch_size=2, grad_accum=2, lr=1e-3, progress=False)


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_modules():
    return [m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard")]


@pytest.fixture(scope="module")
def refs(tiny_model, pair_records):
    return compute_reference_logps(tiny_model, pair_records[:8], max_seq_len=64)


def test_dpo_metrics_have_trls_names_and_values(tiny_model, refs, tmp_path):
    train_dpo(tiny_model, refs, tmp_path, TrainConfig(max_steps=2, **CFG))
    first, second = rows(tmp_path)
    assert TRL_DPO <= set(first) and not {"lr", "margin", "reward_accuracy", "chosen_reward"} & set(first)
    assert (first["epoch"], second["epoch"]) == (0.5, 1.0)  # global batch 4 of 8 pairs
    assert first["learning_rate"] == pytest.approx(1e-3)
    # Step 1: policy == reference (fp32 both), so the rewards are 0 and the log-probs are the
    # reference's, averaged over the step's pairs.
    step1 = batches.sample_order(len(refs), 0, 4, seed=0)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert first["logps/chosen"] == pytest.approx(sum(refs[i]["ref_chosen_logp"] for i in step1) / 4, rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(sum(refs[i]["ref_rejected_logp"] for i in step1) / 4, rel=1e-5)
    # logits/*: the materialized [B, T, V] logits of the step's replies, averaged over tokens and vocabulary.
    enc = batches.encode_pairs(Tokenizer.from_pretrained(tiny_model), refs, 64)
    ids, tgt = batches.collate(enc, step1, 0, dpo=True)
    with torch.no_grad():
        logits = load_model(tiny_model)(ids)  # (8, T, V)
    trained = tgt != batches.IGNORE
    assert first["logits/chosen"] == pytest.approx(float(logits[:4][trained[:4]].mean()), rel=1e-4, abs=1e-6)
    assert first["logits/rejected"] == pytest.approx(float(logits[4:][trained[4:]].mean()), rel=1e-4, abs=1e-6)
    # Step 2 after an update: the margin is the reward gap and the accuracy a share of 4 pairs.
    gap = second["rewards/chosen"] - second["rewards/rejected"]
    assert second["rewards/margins"] == pytest.approx(gap, rel=1e-6)  # summed as float32 rewards
    assert second["rewards/accuracies"] in (0, 0.25, 0.5, 0.75, 1.0) and second["rewards/margins"] != 0


def test_a_run_without_report_to_never_imports_tensorboard(tiny_model, sft_records, tmp_path, monkeypatch):
    for m in tensorboard_modules():  # whatever another test may have loaded
        monkeypatch.delitem(sys.modules, m)
    train_sft(tiny_model, sft_records, tmp_path, TrainConfig(max_steps=1, **CFG))
    assert tensorboard_modules() == []
    assert {"loss", "grad_norm", "learning_rate", "epoch"} <= set(rows(tmp_path)[0])
    assert not (tmp_path / "tb").exists()


def test_report_to_tensorboard(tiny_model, tmp_path, capsys):
    args = ["sft", "--model", tiny_model, "--data", DATA / "sft_train.jsonl", "--out", tmp_path, "--max-steps", "1",
            "--max-seq-len", "64", "--micro-batch-size", "2", "--grad-accum", "1", "--no-progress",
            "--report-to", "tensorboard"]
    rc = main([str(a) for a in args])
    if importlib.util.find_spec("tensorboard") is not None:
        assert rc == 0 and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    else:  # one line saying what to install, before any training
        err = capsys.readouterr().err
        assert rc == 1 and "error: report_to 'tensorboard' needs the tensorboard package " \
                           "(pip install tensorboard)" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="report_to must be 'none' or 'tensorboard', got 'wandb'"):
        TrainConfig(report_to="wandb")


class FakeWriter:
    """Stands in for torch's SummaryWriter: records what the trainer hands it."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_scalar_of_every_step(tiny_model, refs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.made.clear()
    train_dpo(tiny_model, refs, tmp_path, TrainConfig(max_steps=2, report_to="tensorboard", **CFG))
    (w,) = FakeWriter.made
    assert w.log_dir == str(tmp_path / "tb") and w.purge_step is None and w.closed
    got = {(tag, step): v for tag, v, step in w.scalars}
    for r in rows(tmp_path):
        for k in TRL_DPO | {"tokens", "tokens_per_s"}:
            assert got[(f"train/{k}", r["step"])] == r[k]
    assert not any(tag in ("train/step", "train/skipped") for tag, _ in got)
    # A run resumed after step 2 purges the events a killed run wrote past it.
    MetricsLog(tmp_path, 2, "tensorboard")
    assert FakeWriter.made[-1].purge_step == 3


def test_log_is_cut_back_to_the_checkpoint_and_old_names_read(tmp_path):
    lines = [{"step": 1, "loss": 0.7, "lr": 1e-6, "margin": 0.0, "reward_accuracy": 0.0, "chosen_reward": 0.0,
              "rejected_reward": 0.0}, {"step": 2, "loss": 0.6}, {"step": 3, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # the partial line left out
    MetricsLog(tmp_path, 2).close()
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    assert got[0] == {"step": 1, "loss": 0.7, "learning_rate": 1e-6, "rewards/margins": 0.0,
                      "rewards/accuracies": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
