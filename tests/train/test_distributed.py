"""2 processes (FSDP2 over gloo on localhost, started by `srlm ... --nproc 2`) against 1 process
with the same global batch: the same gradients and the same weights after several AdamW steps.
Slow: each run starts fresh Python processes (torch import, process group, FSDP2 setup), about
10 s each on 2 cores."""
import json

import pytest
import torch

from srlm_engine.model.weights import load_model
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.losses import TokenLogprobs, sft_loss
from trainkit import DATA, read_jsonl, srlm

COMMON = ["--max-seq-len", 64, "--micro-batch-size", 2, "--lr", 1e-3, "--max-steps", 4, "--no-progress",
          "--save-every", 100, "--warmup-steps", 1, "--schedule", "cosine"]


def max_diff(a, b):
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def moved(model_dir, trained):
    sa, sb = load_model(model_dir).state_dict(), load_model(trained).state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def losses(out, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def plain_first_grad_norm(model_dir, global_batch):
    """Norm of the gradient of the mean NLL over all trained tokens of step 1's global batch, in
    one go (float64): what step 1 must compute however the batch is cut into micro-batches and
    ranks (the trainer's default seed 0)."""
    enc = batches.encode_sft(Tokenizer.from_pretrained(model_dir), read_jsonl(DATA / "sft_train.jsonl"), 64)
    ids, tgt = batches.collate(enc, batches.sample_order(len(enc), 0, global_batch, 0), 0, False)
    model = load_model(model_dir).double()
    sft_loss(TokenLogprobs(model)(ids, tgt), tgt)[0].backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


@pytest.mark.slow
@pytest.mark.parametrize("kind,data,extra", [
    ("sft", ["--data", DATA / "sft_train.jsonl"], []),
    # Selective activation checkpointing recomputes the same ops on the same inputs: the same numbers.
    ("dpo", ["--pairs", DATA / "pairs.jsonl"], ["--activation-checkpointing", "selective"])])
def test_two_processes_equal_one_with_the_same_global_batch(kind, data, extra, tiny_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Global batch 8 both ways: 1 x 2 x 4 and 2 x 2 x 2.
    srlm(kind, "--model", tiny_model, *data, "--out", one, *COMMON, "--grad-accum", 4)
    r = srlm(kind, "--model", tiny_model, *data, "--out", two, *COMMON, "--grad-accum", 2, "--nproc", 2, *extra)
    assert "2 process(es), global batch 8" in r.stdout
    assert moved(tiny_model, one / "model") > 1e-3  # the runs trained: lr 1e-3 over 4 steps
    # Summation order differs (gradients reduce-scattered across ranks), so not bit-exact.
    assert max_diff(one / "model", two / "model") < 1e-6
    assert losses(one) == pytest.approx(losses(two), rel=1e-6, abs=1e-6)
    # The gradients before clipping, not only the weights (AdamW hides a gradient's scale). The
    # logged norm is summed in fp32 over 1.6M entries (per shard on 2 ranks): runs agree to ~3e-5.
    assert losses(one, "grad_norm") == pytest.approx(losses(two, "grad_norm"), rel=1e-4)
    if kind == "sft":  # 22 / 23 trained tokens per micro-batch: a mean of their means is 2e-3 off
        plain = plain_first_grad_norm(tiny_model, 8)
        assert losses(one, "grad_norm")[0] == pytest.approx(plain, rel=1e-4)
        assert losses(two, "grad_norm")[0] == pytest.approx(plain, rel=1e-4)
    if kind == "dpo":  # TRL's DPO metrics: sums over both ranks' pairs and tokens, then means
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected"):
            assert losses(one, key) == pytest.approx(losses(two, key), rel=1e-5, abs=1e-6), key
        refs = [json.loads(x) for x in (two / "pairs.ref.jsonl").read_text().splitlines()]
        assert len(refs) == 24 and all(r["ref_chosen_logp"] < 0 for r in refs)
        # Resume under FSDP2: a checkpoint at step 2 (gathered to rank 0), then the same command
        # again: it resumes there (optimizer state scattered back to the shards), redoes steps
        # 3-4, and ends where the uninterrupted 2-process run ended.
        three = tmp_path / "three"
        args = (kind, "--model", tiny_model, *data, "--out", three, *COMMON, "--grad-accum", 2, "--nproc", 2,
                *extra, "--save-every", 2)
        srlm(*args)
        first = load_model(three / "model").state_dict()
        r = srlm(*args)
        assert "resuming at step 2" in r.stdout
        again = load_model(three / "model").state_dict()
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert max_diff(two / "model", three / "model") == 0.0


@pytest.mark.slow
def test_mixed_precision_two_processes(tiny_model, tmp_path):
    """bf16 compute, fp32 reduction: the first loss agrees with fp32 to bf16 precision, the run
    trains, and the saved weights are the fp32 master copy."""
    data = ["--data", DATA / "sft_train.jsonl"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    srlm("sft", "--model", tiny_model, *data, "--out", fp32, *COMMON, "--grad-accum", 2, "--nproc", 2)
    srlm("sft", "--model", tiny_model, *data, "--out", bf16, *COMMON, "--grad-accum", 2, "--nproc", 2,
         "--mixed-precision")
    assert losses(bf16)[0] == pytest.approx(losses(fp32)[0], rel=1e-2)
    assert losses(bf16)[-1] < losses(bf16)[0]
    assert load_model(bf16 / "model").embed_tokens.weight.dtype == torch.float32
    assert json.loads((bf16 / "model" / "config.json").read_text())["torch_dtype"] == "float32"
    assert 1e-3 < moved(tiny_model, bf16 / "model")
