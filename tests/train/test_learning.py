"""A real learning signal on the pulled SmolLM2-135M-Instruct: SFT on 40 seed-style examples
lowers the loss on 12 held-out ones of the same kinds, and DPO raises reward accuracy on its
pairs. Slow: the real 135M model, forward and backward on CPU (a few seconds a step on 2 idle
cores). The learning rates are far above the paper's (5.5e-6 / 1e-6 for 70B over thousands of
examples) so that two or three steps show the effect."""
import pytest
import torch

from srlm_engine.config import TrainConfig
from srlm_engine.model.pull import pull
from srlm_engine.model.weights import load_model
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.losses import TokenLogprobs, sft_loss
from srlm_engine.train.refs import compute_reference_logps
from srlm_engine.train.trainer import train_dpo, train_sft
from trainkit import DATA, read_jsonl


@torch.no_grad()
def heldout_loss(model_dir, records):
    tok = Tokenizer.from_pretrained(model_dir)
    enc = batches.encode_sft(tok, records, 128)
    ids, tgt = batches.collate(enc, list(range(len(records))), pad_id=2, dpo=False)
    return float(sft_loss(TokenLogprobs(load_model(model_dir)).eval()(ids, tgt), tgt)[0])


@pytest.mark.slow
def test_sft_lowers_heldout_loss(sft_records, tmp_path):
    base = pull()
    held = read_jsonl(DATA / "sft_heldout.jsonl")
    before = heldout_loss(base, held)
    cfg = TrainConfig(max_seq_len=128, micro_batch_size=8, grad_accum=1, max_steps=2, lr=5e-5, progress=False)
    after = heldout_loss(train_sft(base, sft_records, tmp_path, cfg), held)
    # Measured here: 0.537 -> about 0.2 (the held-out answers share the training answers' form,
    # "The capital of X is Y.", which the model did not use before).
    assert after < 0.6 * before, (before, after)


@pytest.mark.slow
def test_dpo_raises_reward_accuracy(pair_records, tmp_path):
    base = pull()
    pairs = compute_reference_logps(base, pair_records[::2] + pair_records[1::2][:4], max_seq_len=96)  # 16 pairs
    cfg = TrainConfig(max_seq_len=96, micro_batch_size=8, grad_accum=1, max_steps=2, lr=2e-5, beta=0.1,
                      progress=False)
    out = train_dpo(base, pairs, tmp_path, cfg)
    # Reward accuracy after training: the trained policy's log-probs against the stored reference.
    policy = compute_reference_logps(out, [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs],
                                     max_seq_len=96)
    margins = torch.tensor([(q["ref_chosen_logp"] - p["ref_chosen_logp"]) - (q["ref_rejected_logp"] - p["ref_rejected_logp"])
                            for p, q in zip(pairs, policy)])
    # Before training every margin is 0 (policy == reference): accuracy 0.
    assert float((margins > 0).float().mean()) >= 0.8, margins
    assert float(margins.mean()) > 0
