"""Checkpoints: transformers reads what we save with identical logits; the last k are kept; a
checkpoint of another model, data, seed, length or optimizer or loss setting is refused and
nothing saved is touched; one differing only in how the step is computed resumes."""
import hashlib

import pytest
import torch

from srlm_engine.config import TrainConfig
from srlm_engine.model.weights import load_model
from srlm_engine.train.checkpoint import CheckpointError, checkpoints, saved_models
from srlm_engine.train.refs import compute_reference_logps
from srlm_engine.train.trainer import train_dpo, train_sft
from trainkit import make_model_dir


def cfg(**kw):
    base = dict(max_seq_len=64, micro_batch_size=2, grad_accum=2, lr=1e-3, save_every=2, keep_last=2,
                progress=False)
    return TrainConfig(**{**base, **kw})


def digest(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_model, sft_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    for stale in [".step-00000002.h-1.ab.tmp", ".step-00000002.h-1.cd.old/x"]:  # a killed run's, to be removed
        (out / "checkpoints" / stale).mkdir(parents=True)
    return train_sft(tiny_model, sft_records, out, cfg(max_steps=7)), out


def test_transformers_reads_our_checkpoint_with_identical_logits(run, tiny_model):
    from transformers import LlamaForCausalLM
    final, out = run
    ids = torch.randint(0, 49152, (2, 17), generator=torch.Generator().manual_seed(0))
    for path in [final, checkpoints(out)[-1] / "model"]:
        ours = load_model(path)
        hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # still tied
        assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    # Training moved the weights (the logits test would pass trivially on an untouched copy).
    base, trained = load_model(tiny_model), load_model(final)
    assert not torch.equal(base.embed_tokens.weight, trained.embed_tokens.weight)


def test_keeps_last_k_complete_checkpoints(run):
    _, out = run
    assert [p.name for p in checkpoints(out)] == ["step-00000004", "step-00000006"]
    assert not list((out / "checkpoints").glob(".*"))  # no temporary directories left, ours or a killed run's
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7


def test_keep_models_keeps_every_checkpoints_weights(tiny_model, sft_records, tmp_path):
    """keep_models: a checkpoint removed past keep_last leaves its model/ in OUT/models (the loop
    picks M_{t+1} among them), without its optimizer state."""
    train_sft(tiny_model, sft_records, tmp_path, cfg(max_steps=7, keep_last=1, keep_models=True))
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000006"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["step-00000002", "step-00000004"]
    found = saved_models(tmp_path)
    assert [(s, p.relative_to(tmp_path).as_posix()) for s, p in found] == [
        (2, "models/step-00000002"), (4, "models/step-00000004"), (6, "checkpoints/step-00000006/model")]
    weights = [load_model(p).embed_tokens.weight for _, p in found]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert not list((tmp_path / "models").rglob("trainer.pt"))
    # killed between moving a pruned checkpoint's model/ and removing the rest: the moved copy counts
    (tmp_path / "models" / "step-00000004").rename(tmp_path / "models" / "x")
    (tmp_path / "checkpoints" / "step-00000004").mkdir()
    (tmp_path / "checkpoints" / "step-00000004" / "state.json").write_text("{}")
    (tmp_path / "models" / "x").rename(tmp_path / "models" / "step-00000004")
    assert [(s, p.relative_to(tmp_path).as_posix()) for s, p in saved_models(tmp_path)][1] == \
        (4, "models/step-00000004")


def test_resume_from_another_models_checkpoint_is_refused(run, tiny_model, sft_records, tmp_path):
    _, out = run
    before = digest(out)
    other = make_model_dir(tmp_path / "other", seed=5)
    with pytest.raises(CheckpointError, match="base model"):
        train_sft(other, sft_records, out, cfg(max_steps=7))
    with pytest.raises(CheckpointError, match="training data"):
        train_sft(tiny_model, sft_records[:-1], out, cfg(max_steps=7))
    with pytest.raises(CheckpointError, match="global batch"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=7, grad_accum=1))
    # The data position is rebuilt from step and seed, the schedule from the total steps: another
    # seed would train some records twice and others never, another length would jump the lr.
    with pytest.raises(CheckpointError, match=r"checkpoint's seed \(0\) differs from this run's \(7\)"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=7, seed=7))
    with pytest.raises(CheckpointError, match=r"checkpoint's total steps \(7\) differs from this run's \(10\)"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=10))
    with pytest.raises(CheckpointError, match=r"checkpoint's lr \(0.001\) differs from this run's \(0.002\)"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=7, lr=2e-3))
    with pytest.raises(CheckpointError, match=r"checkpoint's warmup_steps \(0\) differs from this run's \(2\)"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=7, warmup_steps=2))
    with pytest.raises(CheckpointError, match=r"checkpoint's weight_decay \(0.0\) differs from this run's \(0.1\)"):
        train_sft(tiny_model, sft_records, out, cfg(max_steps=7, weight_decay=0.1))
    assert digest(out) == before  # nothing saved was touched


def test_dpo_resume_refuses_another_objective(tiny_model, pair_records, tmp_path, capsys):
    pairs = compute_reference_logps(tiny_model, pair_records[:8], max_seq_len=64)
    base = dict(max_steps=3, grad_accum=1)
    train_dpo(tiny_model, pairs, tmp_path, cfg(**base))
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000002"]
    before = digest(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint's beta \(0.1\) differs from this run's \(0.2\)"):
        train_dpo(tiny_model, pairs, tmp_path, cfg(**base, beta=0.2))
    with pytest.raises(CheckpointError, match=r"loss_type \('sigmoid'\) differs from this run's \('ipo'\)"):
        train_dpo(tiny_model, pairs, tmp_path, cfg(**base, loss_type="ipo"))
    assert digest(tmp_path) == before
    # How a step is computed and what is kept may change: the same math, the same run.
    capsys.readouterr()
    train_dpo(tiny_model, pairs, tmp_path, cfg(**base, activation_checkpointing="selective", keep_last=1))
    assert "resuming at step 2" in capsys.readouterr().out
