"""One DPO training step on SmolLM2-135M: ours against a plain PyTorch DPO; tokens/s and peak memory.

    python bench/bench_train.py [--pairs 4] [--prompt-len 64] [--response-len 128] [--steps 3]

ours:  one model; hidden states -> fused log-prob kernel (no [N, V] logits; prompt rows skipped)
       -> dpo_loss kernel against reference log-probs precomputed once (train/refs.py).
       "ours + ref pass" adds the cost of that one no-grad pass per pair (paid once per epoch, so
       for a single epoch this is the fair per-step figure; the headline ratio uses it).
torch: policy and a separate reference model in memory; logits [2B, T, V] materialized for both,
       log_softmax + gather, the DPO sigmoid loss written out (TRL's classic get_batch_logps path).
Both: float32, the same token batch (B pairs = 2B rows of prompt + response, right-padded to T),
backward, AdamW step. Each runs in its own process, so peak memory is clean: the peak RSS of the
whole step (weights, reference model if any, gradients, Adam state, activations, logits) above
the process's RSS after importing torch.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name, reset_peak_rss, rss_mb, run_worker, stats  # noqa: E402

from srlm_engine.train.batches import IGNORE  # noqa: E402
from srlm_engine.train.losses import TokenLogprobs, dpo_batch_loss  # noqa: E402

BETA = 0.1


def make_batch(pairs, prompt_len, resp_len, vocab, seed=0):
    """input_ids, targets [2B, T]: B chosen rows then B rejected; prompt positions ignored."""
    g = torch.Generator().manual_seed(seed)
    t = prompt_len + resp_len
    ids = torch.randint(0, vocab, (2 * pairs, t), generator=g)
    tgt = ids.roll(-1, 1)
    tgt[:, :prompt_len - 1] = IGNORE
    tgt[:, -1] = IGNORE
    return ids, tgt


def plain_logps(model, ids, tgt):
    logits = model(ids)  # (2B, T, V) materialized
    valid = tgt != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * valid).sum(-1)  # (2B,)


def make_step(impl, model, ids, tgt, ref_model=None, refs=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=True)
    b = ids.shape[0] // 2
    if impl == "ours":
        root = TokenLogprobs(model)

        def step():
            loss, _, _ = dpo_batch_loss(root(ids, tgt), refs[0], refs[1], BETA)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        def step():
            seq = plain_logps(model, ids, tgt)
            with torch.no_grad():
                ref = plain_logps(ref_model, ids, tgt)
            logits = (seq[:b] - ref[:b]) - (seq[b:] - ref[b:])
            loss = -F.logsigmoid(BETA * logits).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    return step


@torch.no_grad()
def ref_pass(model, ids, tgt):
    """The one-time reference pass of ours: summed log-probs [2] x [B]."""
    seq = TokenLogprobs(model)(ids, tgt).sum(-1)
    b = seq.shape[0] // 2
    return seq[:b].clone(), seq[b:].clone()


def worker(impl, pairs, prompt_len, resp_len, steps, warmup):
    from srlm_engine.model.pull import pull
    from srlm_engine.model.weights import load_model
    gc.collect()
    base = rss_mb("VmRSS")  # torch imported, nothing loaded
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    path = pull()
    model = load_model(path).train()
    ids, tgt = make_batch(pairs, prompt_len, resp_len, model.config.vocab_size)
    ref_ms = []
    if impl == "ours":
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            refs = ref_pass(model, ids, tgt)
            ref_ms.append((time.perf_counter() - t0) * 1e3)
        step = make_step(impl, model, ids, tgt, refs=refs)
    else:
        step = make_step(impl, model, ids, tgt, ref_model=load_model(path))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = rss_mb("VmHWM") - base
    print(json.dumps({"times_ms": times, "ref_ms": ref_ms[-1] if ref_ms else 0.0, "peak_mb": peak,
                      "tokens": ids.numel(), "device": device_name("cpu")}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    args = [a.pairs, a.prompt_len, a.response_len, a.steps, a.warmup]
    res = {i: run_worker(__file__, [i, *args], timeout=7200) for i in ("torch", "ours")}
    if any("error" in r for r in res.values()):
        raise SystemExit(f"a worker failed: {res}")
    tok = res["ours"]["tokens"]
    t_med = stats(res["torch"]["times_ms"])[0]
    o_med, o20, o80 = stats(res["ours"]["times_ms"])
    fair = o_med + res["ours"]["ref_ms"]
    rows = [("torch (policy + ref model, logits)", t_med, *stats(res["torch"]["times_ms"])[1:], res["torch"]["peak_mb"]),
            ("ours (training step)", o_med, o20, o80, res["ours"]["peak_mb"]),
            ("ours + ref pass", fair, float("nan"), float("nan"), res["ours"]["peak_mb"])]
    print(f"DPO step, SmolLM2-135M fp32, {a.pairs} pairs x {a.prompt_len}+{a.response_len} tokens "
          f"({tok} tokens/step), {res['ours']['device']}")
    print(f"{'impl':>36} {'median ms':>10} {'p20':>9} {'p80':>9} {'tokens/s':>9} {'peak MB':>8} {'speed x':>8} {'mem x':>6}")
    for name, med, p20, p80, mb in rows:
        print(f"{name:>36} {med:>10.0f} {p20:>9.0f} {p80:>9.0f} {tok / med * 1e3:>9.1f} {mb:>8.0f} "
              f"{t_med / med:>8.2f} {mb / res['torch']['peak_mb']:>6.2f}")
    goal = t_med / fair >= 1.3 and res["ours"]["peak_mb"] <= 0.5 * res["torch"]["peak_mb"]
    print(f"goal (>= 1.3x tokens/s incl. ref pass, <= 0.5x peak memory): {'met' if goal else 'NOT met'}")
    append_rows("train (DPO step)", res["ours"]["device"], [(
        f"SmolLM2-135M fp32, {a.pairs} pairs x {a.prompt_len}+{a.response_len}, fwd+bwd+AdamW, {a.steps} steps",
        f"torch {tok / t_med * 1e3:.1f} tok/s, {res['torch']['peak_mb']:.0f} MB; ours {tok / o_med * 1e3:.1f} tok/s "
        f"(x{t_med / o_med:.2f}), incl. ref pass {tok / fair * 1e3:.1f} tok/s (x{t_med / fair:.2f}), "
        f"{res['ours']['peak_mb']:.0f} MB (x{res['ours']['peak_mb'] / res['torch']['peak_mb']:.2f})")])


# ------------------------------------------------------------- pytest-benchmark
# A tiny random Llama with the real vocabulary (49152) and hidden 64: the lm_head / logits part
# dominates, which is what the fused path changes; seconds, not minutes.

def _tiny_case(benchmark, impl):
    from srlm_engine.config import ModelConfig
    from srlm_engine.model.llama import Llama
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Llama(cfg).init_weights(0).train()
    ids, tgt = make_batch(4, 32, 64, cfg.vocab_size)
    refs = ref_pass(Llama(cfg).init_weights(1), ids, tgt)
    if impl == "ours":
        step = make_step("ours", model, ids, tgt, refs=refs)
    else:
        step = make_step("torch", model, ids, tgt, ref_model=Llama(cfg).init_weights(1))
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)


def test_train_dpo_step_ours(benchmark):
    _tiny_case(benchmark, "ours")


def test_train_dpo_step_torch(benchmark):
    _tiny_case(benchmark, "torch")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, *rest = sys.argv[2:8]
        worker(impl, *map(int, rest))
    else:
        main()
