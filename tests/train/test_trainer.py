"""The loop's own rules: the schedule, the batch-size rule for the lr, TOML + flag settings,
a non-finite step skipped and logged, DPO refs checked."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from srlm_engine.cli import _train_config, build
from srlm_engine.config import ConfigError, TrainConfig
from srlm_engine.io import DataError
from srlm_engine.model.weights import load_model
from srlm_engine.train.optim import lr_factor, resolve_lr
from srlm_engine.train.refs import compute_reference_logps
from srlm_engine.train.trainer import train_dpo, train_sft
from trainkit import make_model_dir


def test_schedule_warmup_then_decay_to_floor():
    f = [lr_factor(s, total=10, warmup=2, floor=0.1, schedule="linear") for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[2] > f[3] > f[9] > 0.1
    assert f[9] == pytest.approx(0.1 + 0.9 * (1 - 7 / 8))
    c = [lr_factor(s, total=10, warmup=0, floor=0.1, schedule="cosine") for s in range(11)]
    assert c[0] == 1.0 and c[10] == pytest.approx(0.1) and c[5] == pytest.approx(0.55)


def test_lr_defaults_and_batch_rule():
    assert resolve_lr("sft", None, None, 16, 16, "none") == (5.5e-6, 1.1e-6)  # the paper's
    assert resolve_lr("dpo", None, None, 64, 16, "linear") == pytest.approx((4e-6, 4e-7))
    assert resolve_lr("dpo", None, None, 64, 16, "sqrt") == pytest.approx((2e-6, 2e-7))
    assert resolve_lr("sft", 1e-4, None, 8, 16, "none") == pytest.approx((1e-4, 1e-5))


def test_flags_override_toml(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('max_seq_len = 128\nlr = 2e-5\nadam_betas = [0.9, 0.95]\nactivation_checkpointing = true\n')
    args = build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--config", str(toml),
                               "--lr", "3e-5", "--activation-checkpointing", "selective"])
    cfg = _train_config(args)
    assert (cfg.max_seq_len, cfg.lr, cfg.adam_betas, cfg.activation_checkpointing) == (128, 3e-5, (0.9, 0.95), "selective")
    # A TOML boolean still reads: true is whole blocks.
    assert _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--config",
                                             str(toml)])).activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="activation_checkpointing must be 'none', 'selective' or 'full'"):
        _train_config(build().parse_args(["sft", "--model", "m", "--data", "d", "--out", "o",
                                          "--activation-checkpointing", "some"]))


def test_non_finite_step_is_skipped_and_logged(tmp_path, sft_records):
    model = make_model_dir(tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")  # every forward now gives NaN
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    out = train_sft(model, sft_records, tmp_path / "o", TrainConfig(max_seq_len=64, micro_batch_size=2,
                                                                  grad_accum=1, max_steps=2, lr=1e-3, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True]
    a, b = load_model(model).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # no update was applied


def test_dpo_needs_matching_refs(tiny_model, pair_records, tmp_path):
    cfg = TrainConfig(max_seq_len=64, micro_batch_size=2, grad_accum=1, max_steps=1, progress=False)
    with pytest.raises(DataError, match="pair record 0: no finite ref_chosen_logp"):
        train_dpo(tiny_model, pair_records, tmp_path / "o", cfg)
    refs = compute_reference_logps(tiny_model, pair_records[:4], max_seq_len=48, out_path=tmp_path / "r.jsonl")
    assert [r["prompt"] for r in refs] == [r["prompt"] for r in pair_records[:4]]
    with pytest.raises(DataError, match="max_seq_len=48, this run uses 64"):
        train_dpo(tiny_model, refs, tmp_path / "o", cfg)
    other = make_model_dir(tmp_path / "other", seed=3)
    with pytest.raises(DataError, match="computed with another model"):
        train_dpo(other, compute_reference_logps(tiny_model, pair_records[:4], max_seq_len=64), tmp_path / "o", cfg)
