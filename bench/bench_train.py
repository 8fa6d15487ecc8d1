"""One DPO training step on SmolLM2-135M: ours against a plain PyTorch DPO; tokens/s and peak memory.

    python bench/bench_train.py [--device cpu|cuda] [--dtype fp32|bf16] [--pairs 4] [--prompt-len 64]
                                [--response-len 128] [--steps 3] [--warmup 1]

ours:  one model; hidden states -> fused log-prob kernel (no [N, V] logits; prompt rows skipped on CPU)
       -> dpo_loss kernel against reference log-probs precomputed once (train/refs.py).
       "ours + ref pass" adds the cost of that one no-grad pass per pair (paid once per epoch, so
       for a single epoch this is the fair per-step figure; the headline ratio uses it).
ours-sac: ours with selective activation checkpointing (--activation-checkpointing selective:
       matmul and attention outputs kept, norms / rotary / SiLU / products recomputed).
ours-ac: ours with whole blocks checkpointed (--activation-checkpointing full).
torch: policy and a separate reference model in memory; logits [2B, T, V] materialized for both,
       log_softmax + gather, the DPO sigmoid loss written out (TRL's classic get_batch_logps path);
       the model's RMSNorm / SwiGLU / rotary run as torch's composite ops (model/fused.py's
       references), not our CPU kernels, so it is plain PyTorch throughout.
Both: float32 (or --dtype bf16: weights, Adam state and compute in bf16; the baseline's
log_softmax in fp32 as HF and TRL upcast), the same token batch (B pairs = 2B rows of prompt +
response, right-padded to T), backward, AdamW step.
CPU (the default without CUDA; 4 pairs x 128+384, the DPO preset's micro-batch of 512-token rows,
2 steps after 1 warm-up, ~25 min): peak memory: each variant in its own
process (clean peak): the peak RSS of loading and two steps (weights, reference model if any,
gradients, Adam state, activations, logits) above the RSS after importing torch. The ours variants
install srlm's caching CPU allocator after the reference pass, where `srlm dpo` does
(train/cpu_allocator.py); torch runs on glibc's malloc. Time: one process holds all four, each
with its own policy copy, and interleaves their steps, so load from other jobs on a shared machine
hits all alike; the table shows medians (p20-p80). The allocator is process-wide, so there every
variant runs on it (torch's steps took the same time on glibc, within the noise, when tried).
CUDA (the default where it is available; 8 pairs x 128+384 = 8192 tokens a step, 6 steps after 1
warm-up; well under 90 s on an H100 with model loads): one worker process; peak memory per variant
with torch.cuda.max_memory_allocated, reset before loading it, over the same loading + two steps,
the variant alone on the GPU (the previous one freed); then the interleaved timing as on CPU, each
step between torch.cuda.synchronize() calls.
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

from srlm_engine.model.fused import reference_ops  # noqa: E402
from srlm_engine.train.batches import IGNORE  # noqa: E402
from srlm_engine.train.cpu_allocator import use_caching_cpu_allocator  # noqa: E402
from srlm_engine.train.losses import TokenLogprobs, dpo_batch_loss  # noqa: E402

BETA = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Per device: pairs, prompt_len, response_len, steps, warmup.
DEFAULTS = {"cpu": (4, 128, 384, 2, 1), "cuda": (8, 128, 384, 6, 1)}


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
    logits = model(ids).float()  # (2B, T, V) materialized; .float() is a no-op in fp32
    valid = tgt != IGNORE
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * valid).sum(-1)  # (2B,)


def make_step(impl, model, ids, tgt, ref_model=None, refs=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, foreach=True)
    b = ids.shape[0] // 2
    if impl.startswith("ours"):
        root = TokenLogprobs(model)
        if impl != "ours":
            from srlm_engine.train.parallel import Dist, parallelize
            parallelize(root, model.layers, Dist(), activation_checkpointing=CHECKPOINTING[impl])

        def step():
            loss, _, _ = dpo_batch_loss(root(ids, tgt), refs[0], refs[1], BETA)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        def step():
            with reference_ops():
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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def ref_pass(model, ids, tgt):
    """The one-time reference pass of ours: summed log-probs [2] x [B]."""
    seq = TokenLogprobs(model)(ids, tgt).sum(-1)
    b = seq.shape[0] // 2
    return seq[:b].clone(), seq[b:].clone()


def _load(impl, device="cpu", dtype="fp32"):
    from srlm_engine.model.pull import pull
    from srlm_engine.model.weights import load_model
    path = pull()
    dt = DTYPES[dtype]
    model = load_model(path, dtype=dt, device=device).train()
    return model, (load_model(path, dtype=dt, device=device) if impl == "torch" else None)


IMPLS = ("torch", "ours", "ours-sac", "ours-ac")
CHECKPOINTING = {"ours-sac": "selective", "ours-ac": "full"}


def _load_and_two_steps(impl, pairs, prompt_len, resp_len, device, dtype):
    """Load `impl`'s model(s), the one-time ref pass (ours), its first two steps (Adam state exists
    from the first). -> the step closure, which holds everything."""
    model, ref_model = _load(impl, device, dtype)
    ids, tgt = (t.to(device) for t in make_batch(pairs, prompt_len, resp_len, model.config.vocab_size))
    refs = ref_pass(model, ids, tgt) if impl != "torch" else None
    if impl != "torch" and device == "cpu":
        use_caching_cpu_allocator()
    step = make_step(impl, model, ids, tgt, ref_model=ref_model, refs=refs)
    for _ in range(2):
        step()
    return step


def worker_memory(impl, pairs, prompt_len, resp_len, dtype="fp32"):
    """Peak RSS of loading + `impl`'s first two steps, MB above the RSS after importing torch."""
    gc.collect()
    base = rss_mb("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    _load_and_two_steps(impl, pairs, prompt_len, resp_len, "cpu", dtype)
    print(json.dumps({"peak_mb": rss_mb("VmHWM") - base}))


def cuda_peak_mb(impl, pairs, prompt_len, resp_len, dtype):
    """torch.cuda.max_memory_allocated over loading + `impl`'s first two steps, MB above the
    allocation before loading; everything is freed again before returning."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = _load_and_two_steps(impl, pairs, prompt_len, resp_len, "cuda", dtype)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def worker_time(pairs, prompt_len, resp_len, steps, warmup, device="cpu", dtype="fp32"):
    """All four variants in one process, their steps interleaved (torch, ours, ours-sac, ours-ac, torch, ...),
    so that a machine shared with other jobs slows them alike. Each has its own policy copy.
    On CUDA the peak memory of each variant alone is measured first, in this process."""
    peak = {i: cuda_peak_mb(i, pairs, prompt_len, resp_len, dtype) for i in IMPLS} if device == "cuda" else None
    if device == "cpu":
        use_caching_cpu_allocator()
    loaded = {i: _load(i, device, dtype) for i in IMPLS}
    ids, tgt = (t.to(device) for t in make_batch(pairs, prompt_len, resp_len,
                                                  loaded["torch"][0].config.vocab_size))
    ref_ms, refs = [], None
    for _ in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        refs = ref_pass(loaded["ours"][0], ids, tgt)
        _sync(device)
        ref_ms.append((time.perf_counter() - t0) * 1e3)
    step = {i: make_step(i, m, ids, tgt, ref_model=r, refs=refs) for i, (m, r) in loaded.items()}
    times = {i: [] for i in IMPLS}
    for k in range(warmup + steps):
        for i in IMPLS:
            _sync(device)
            t0 = time.perf_counter()
            step[i]()
            _sync(device)
            if k >= warmup:
                times[i].append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"times_ms": times, "ref_ms": stats(ref_ms[warmup:])[0], "tokens": ids.numel(),
                      "device": device_name(device), "peak_mb": peak}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--pairs", type=int, help="default: 4 on CPU, 8 on CUDA")
    p.add_argument("--prompt-len", type=int, help="default: 128")
    p.add_argument("--response-len", type=int, help="default: 384")
    p.add_argument("--steps", type=int, help="default: 2 on CPU, 6 on CUDA")
    p.add_argument("--warmup", type=int, help="default: 1 on CPU and on CUDA")
    a = p.parse_args()
    for name, v in zip(("pairs", "prompt_len", "response_len", "steps", "warmup"), DEFAULTS[a.device]):
        if getattr(a, name) is None:
            setattr(a, name, v)
    shape = [a.pairs, a.prompt_len, a.response_len]
    if a.device == "cuda":
        tm = run_worker(__file__, ["time", *shape, a.steps, a.warmup, "cuda", a.dtype], timeout=7200)
        mem = {i: {"peak_mb": mb} for i, mb in tm.get("peak_mb", {}).items()}
    else:
        mem = {i: run_worker(__file__, ["mem", i, *shape, a.dtype], timeout=7200) for i in IMPLS}
        tm = run_worker(__file__, ["time", *shape, a.steps, a.warmup, "cpu", a.dtype], timeout=7200)
    if "error" in tm or any("error" in r for r in mem.values()):
        raise SystemExit(f"a worker failed: {tm} {mem}")
    tok, ref_ms = tm["tokens"], tm["ref_ms"]
    t_med = stats(tm["times_ms"]["torch"])[0]
    mb_t = mem["torch"]["peak_mb"]
    print(f"DPO step, SmolLM2-135M {a.dtype}, {a.pairs} pairs x {a.prompt_len}+{a.response_len} tokens "
          f"({tok} tokens/step), fwd+bwd+AdamW, {a.steps} interleaved steps each, {tm['device']}")
    print(f"{'impl':>22} {'median ms':>10} {'p20':>8} {'p80':>8} {'tokens/s':>9} {'+ref pass tok/s':>15} "
          f"{'peak MB':>8} {'speed x':>8} {'mem x':>6}")
    parts, goals = [], []
    for impl in IMPLS:
        med, p20, p80 = stats(tm["times_ms"][impl])
        fair = med + (ref_ms if impl != "torch" else 0.0)  # ours pays the one-time ref pass per epoch
        mb = mem[impl]["peak_mb"]
        print(f"{impl:>22} {med:>10.0f} {p20:>8.0f} {p80:>8.0f} {tok / med * 1e3:>9.1f} {tok / fair * 1e3:>15.1f} "
              f"{mb:>8.0f} {t_med / fair:>8.2f} {mb / mb_t:>6.2f}")
        parts.append(f"{impl} {tok / fair * 1e3:.1f} tok/s" + ("" if impl == "torch" else
                     f" incl. ref pass (x{t_med / fair:.2f}; step alone {tok / med * 1e3:.1f})")
                     + f", {mb:.0f} MB" + ("" if impl == "torch" else f" (x{mb / mb_t:.2f})"))
        if impl != "torch":
            goals.append(f"{impl}: {'met' if t_med / fair >= 1.3 and mb <= 0.5 * mb_t else 'NOT met'}")
    print("goal (>= 1.3x tokens/s incl. ref pass, <= 0.5x peak memory): " + "; ".join(goals))
    append_rows("train (DPO step)", tm["device"], [(
        f"SmolLM2-135M {a.dtype}, {a.pairs} pairs x {a.prompt_len}+{a.response_len}, fwd+bwd+AdamW, "
        f"{a.steps} interleaved steps", "; ".join(parts))])


# ------------------------------------------------------------- pytest-benchmark
# A tiny random Llama with the real vocabulary (49152) and hidden 64: the lm_head / logits part
# dominates, which is what the fused path changes; seconds, not minutes.

def _tiny_step(impl):
    """-> (one step of impl, the reference model it runs once per step). Ours runs the reference
    pass inside the step, as the headline "ours + ref pass" counts it: torch's step holds one too."""
    from srlm_engine.config import ModelConfig
    from srlm_engine.model.llama import Llama
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Llama(cfg).init_weights(0).train()
    ids, tgt = make_batch(4, 32, 64, cfg.vocab_size)
    ref_model = Llama(cfg).init_weights(1)
    if impl != "ours":
        return make_step("torch", model, ids, tgt, ref_model=ref_model), ref_model
    refs = list(ref_pass(ref_model, ids, tgt))
    train = make_step("ours", model, ids, tgt, refs=refs)

    def step():
        refs[:] = ref_pass(ref_model, ids, tgt)
        return train()
    return step, ref_model


def _tiny_case(benchmark, impl):
    step, _ = _tiny_step(impl)
    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)


def test_train_dpo_step_ours(benchmark):
    _tiny_case(benchmark, "ours")


def test_train_dpo_step_torch(benchmark):
    _tiny_case(benchmark, "torch")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker" and sys.argv[2] == "mem":
        worker_memory(sys.argv[3], *map(int, sys.argv[4:7]), *sys.argv[7:8])
    elif len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_time(*map(int, sys.argv[3:8]), *sys.argv[8:10])
    else:
        main()
