"""GPU speed at the sizes users run: Llama-3.2-1B and Llama-3.1-8B shapes, random weights, one device.

    python bench/bench_scale.py --shape 1b|8b|tiny --part throughput|decode|dpo|determinism
                                [--device cuda|cpu] [--requests N] [--profile] [--profile-dir DIR]
                                [--no-record]

bench/gpu_scale.sh runs every part on a lent GPU; tests/test_bench_scale.py runs each at the tiny
shape on the CPU, so this code runs in `make test`. The weights are random, made on the device
itself (bf16 for the engine, fp32 for training), and handed to the engine in memory: LLM loads
from a directory, so its loader is pointed at the model while it is built (`build_llm`). The
tokenizer is a word-level one of the model's vocabulary size; the prompts are token ids.

Parts (each prints one line, `name=value` figures then `#` and notes, and appends a row to
bench/RESULTS.md, section bench_scale):
  throughput   nano-vllm's public bench.py: 256 requests of random token ids (0..10000), input and
               output lengths uniform in [100, 1024], drawn with Python's random, seed 0, in its
               order; temperature 0.6, EOS ignored; output tokens / seconds of one LLM.generate
               call after a warm-up. Anchor: vLLM 0.10.2 on an A800, 12,627 output tok/s at the 1B
               shape (nano-vllm-triton issue #1), also scaled by this card's HBM bandwidth over
               the A800's 2.039 TB/s. Goals: 21,000 tok/s at 1B, 6,500 at 8B. The engine holds
               every request at once (max_num_seqs 256; KV cache for all, or what 90% of the free
               memory holds) and takes nano-vllm's 16384-token step budget.
  decode       batch 1: a 512-token prompt, then 256 greedy tokens. decode tok/s = 256 / (seconds
               of the whole call - seconds of the prompt-only call), fastest of 3 each. Share of HBM
               bandwidth = bytes read per token x tok/s / the card's bandwidth, bytes per token =
               the weights every token reads (every linear, lm_head included; of the input
               embedding one row, not counted) + the KV cache read at the mean context. Goal 60%.
  dpo          one DPO step at the 1B shape: 8 pairs of 256 + 512 tokens, fp32 weights and
               AdamW, the forward under torch.autocast(bf16) as the trainer runs one process.
               ours: fused log-prob and DPO-loss kernels, reference log-probs from one no-grad
               pass of the policy, timed apart and added to the step. torch: plain PyTorch with a
               reference model (an fp32 copy of the policy) in memory, logits materialized. The
               steps are bench/bench_train.py's. Each variant alone on the device: peak memory
               (torch.cuda.max_memory_allocated, or the RSS high-water mark on CPU) over building
               and two steps, then timed steps. Goals: MFU >= 40%, >= 1.3x torch's tokens/s at no
               more memory.
  determinism  the engine built twice from the same seed (weights and engine), the same 16
               requests (greedy and seeded sampling): identical tokens and log-probs, all finite.

Model FLOPs (MFU = FLOPs / seconds / the card's dense bf16 peak, 989 TFLOP/s on H100 and H200).
N = weights of every linear, lm_head included (`linear_params`); L layers, nh heads of hd dims. A
token attending to c keys costs 2 N + 4 L nh hd c in the forward (q.k and p.v); a causal row of T
tokens 2 N T + 2 L nh hd T^2; backward twice the forward:
  dpo step, 2B rows of T tokens:  2B (6 N T + 6 L nh hd T^2)   policy forward + backward
                                + 2B (2 N T + 2 L nh hd T^2)   reference forward
  throughput, per request:        2 N (in + out) + 2 L nh hd (in + out)^2.
A goal missed (or --profile) writes a torch.profiler summary to --profile-dir (bench/profiles):
<part>-<shape>.txt, the top 25 ops by device time (CPU time on CPU), under a line giving the wall
time and the device's busy time, which tells a host-bound step from a device-bound one.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name, reset_peak_rss, rss_mb  # noqa: E402

from srlm_engine.config import ModelConfig, RopeScaling  # noqa: E402

LLAMA3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
              rms_norm_eps=1e-5, rope_theta=500000.0, eos_token_id=1)  # eos: the word tokenizer's
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=500000.0,
                 rope_scaling=RopeScaling(8.0, 1.0, 4.0, 256), tie_word_embeddings=True, eos_token_id=1),
    "1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
               rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True),
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False),
}
FULL = dict(requests=256, in_len=(100, 1024), out_len=(100, 1024), max_id=10000, decode=(512, 256),
            dpo=(8, 256, 512), det=(16, (64, 512), 64))
WORK = {"tiny": dict(requests=12, in_len=(4, 40), out_len=(4, 24), max_id=511, decode=(32, 128), dpo=(2, 8, 16),
                     det=(4, (4, 16), 8)),
        "1b": FULL, "8b": FULL}
PARTS = ("throughput", "decode", "dpo", "determinism")
VLLM_A800_1B = 12627.0  # output tok/s, vLLM 0.10.2 on an A800, Llama-3.2-1B (nano-vllm-triton issue #1)
A800_BW = 2.039e12
GOALS = {("throughput", "1b"): 21000.0, ("throughput", "8b"): 6500.0}
HBM_GOAL, MFU_GOAL, DPO_SPEED_GOAL = 0.60, 0.40, 1.3
# (name fragment, dense bf16 FLOP/s, HBM bytes/s), first match wins
CARDS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
         ("H100", 989e12, 3.35e12))
PROFILES = Path(__file__).parent / "profiles"


def card(device: str) -> tuple[str, float, float]:
    """(name, peak dense bf16 FLOP/s, HBM bytes/s) of this device; elsewhere (a CPU) the H100 SXM's,
    so the ratios are computed alike, and the name says whose they are."""
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    for frag, flops, bw in CARDS:
        if frag in name:
            return frag, flops, bw
    return "H100 figures", 989e12, 3.35e12


def linear_params(cfg: ModelConfig) -> int:
    """N: weights of every linear layer, lm_head included (tied or not); norms and the embedding
    lookup are not matmuls."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    return cfg.num_hidden_layers * layer + cfg.vocab_size * h


def attn_dims(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # L nh hd


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0):
    """A Llama of `cfg` with weights drawn on `device` itself (normal(0, 0.02), norms 1, as
    Llama.init_weights draws them on the CPU): an 8B model never passes through host memory."""
    from srlm_engine.model.llama import Llama
    from srlm_engine.model.weights import model_from_state_dict
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(cfg).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = torch.empty(shape, dtype=dtype, device=device)
        sd[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=g)
    return model_from_state_dict(cfg, sd, device)


def write_tokenizer(path: Path, vocab_size: int, eos: int = 1) -> None:
    """A word-level tokenizer of `vocab_size` ids ("w{i}"; id `eos` is "<eos>"), all the engine
    needs of one when prompts are token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(vocab_size)}
    del vocab[f"w{eos}"]
    vocab["<eos>"] = eos
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<eos>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": None}))


def build_llm(model, tok_dir: Path, device: str, **kw):
    """The engine over `model` as it is in memory. LLM takes a checkpoint directory and calls
    llm.load_model on it; that call returns `model` while this LLM is built (the 8B shape's 16 GB
    need not go through a disk). Nothing else of LLM changes."""
    from srlm_engine.engine import llm as llm_module
    dtype = next(model.parameters()).dtype
    calls = []

    def load(path, dtype=None, device=None):
        calls.append(path)
        return model
    with mock.patch.object(llm_module, "load_model", load):
        engine = llm_module.LLM(tok_dir, dtype=dtype, device=device, **kw)
    if len(calls) != 1:
        raise RuntimeError(f"LLM called load_model {len(calls)} times; build_llm expects once")
    return engine


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def kv_tokens(need: int, cfg: ModelConfig, dtype: torch.dtype, device: str, reserve: float = 8 * 2**30) -> int:
    """KV cache size: `need` tokens, or on CUDA what 90% of the free memory less `reserve` (the
    steps' activations and logits) holds, if less."""
    if device != "cuda":
        return need
    free = torch.cuda.mem_get_info()[0]
    return max(1, min(need, int((free - reserve) * 0.9) // kv_bytes_per_token(cfg, dtype)))


def write_profile(path: Path, fn, device: str, what: str) -> Path:
    """torch.profiler over fn(): the top 25 ops by device time (CPU time on CPU), under a header
    with the wall time and the device's busy time (the kernels' self time)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    busy = ""
    if device == "cuda":
        b = sum(e.self_device_time_total for e in ka) / 1e6  # us -> s
        busy = f"; device busy {b:.3f} s = {b / wall:.0%} of wall"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{what}\n{device_name(device)}\nwall {wall:.3f} s under the profiler{busy}\n\n"
                    + ka.table(sort_by=key, row_limit=25) + "\n")
    return path


def peak_meter(device: str) -> Callable[[], float]:
    """Starts measuring peak memory -> a function giving the peak since, MB above the start:
    torch.cuda.max_memory_allocated on CUDA; on CPU the RSS high-water mark, after glibc has
    handed freed heap memory back (else new tensors reuse it and show no growth)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        return lambda: (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass
    base = rss_mb("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    return lambda: rss_mb("VmHWM") - base


def nano_vllm_requests(n: int, in_len, out_len, max_id: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """nano-vllm bench.py's n requests: the prompts first (each one's length, then its ids), then
    the output lengths, all from one random.Random(seed) (its `seed(0)` and `randint`)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(*in_len))] for _ in range(n)]
    return prompts, [rng.randint(*out_len) for _ in range(n)]


class Outcome(NamedTuple):
    """What a part measured: its figures (the printed line), notes, the RESULTS.md case and
    result, whether a goal was missed, and a shorter run of its workload to profile (`what` it is)."""
    fig: dict
    notes: str
    case: str
    result: str
    missed: bool = False
    again: Callable | None = None
    what: str = ""


# ------------------------------------------------------------------------------------------- parts
def throughput(shape, device, args, tmp):
    from srlm_engine.engine import SamplingParams
    cfg, w = ModelConfig(**SHAPES[shape]), WORK[shape]
    n = args.requests or w["requests"]
    prompts, outs = nano_vllm_requests(w["requests"], w["in_len"], w["out_len"], w["max_id"])
    prompts, outs = prompts[:n], outs[:n]  # fewer: the first n of the whole workload's draws
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(cfg, dtype, device)
    need = sum(len(p) + o + 16 for p, o in zip(prompts, outs))  # all at once, each with a partial block
    kv = kv_tokens(need, cfg, dtype, device)
    llm = build_llm(model, tmp, device, max_num_seqs=min(256, n), max_num_batched_tokens=16384,
                    max_model_len=w["in_len"][1] + w["out_len"][1], kv_cache_tokens=kv)
    llm.generate([prompts[0][:20]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    llm.pool.forget_prefixes()
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o) for o in outs]
    res = []
    s = timed(lambda: res.extend(llm.generate(prompts, params, use_tqdm=False)), device)
    made = sum(len(o.outputs[0].token_ids) for o in res)
    if made != sum(outs):
        raise RuntimeError(f"generated {made} tokens, asked for {sum(outs)} (EOS is ignored)")
    st = llm.stats()
    tok_s = made / s
    lengths = [len(p) + o for p, o in zip(prompts, outs)]
    flops = sum(2 * linear_params(cfg) * t + 2 * attn_dims(cfg) * t * t for t in lengths)
    name, peak, bw = card(device)
    goal = GOALS.get(("throughput", shape))
    fig = {"output_tok_s": tok_s, "seconds": s, "requests": n, "output_tokens": made, "mfu": flops / s / peak}
    anchor = ""
    if shape != "8b":  # the anchor is a 1B figure (the tiny shape computes it too, to run the code)
        fig.update(vs_vllm_a800=tok_s / VLLM_A800_1B, vs_vllm_a800_bw_scaled=tok_s / (VLLM_A800_1B * bw / A800_BW))
        anchor = (f"; x{fig['vs_vllm_a800']:.3g} vLLM 0.10.2 on A800 (12,627), x{fig['vs_vllm_a800_bw_scaled']:.3g} "
                  f"of it scaled to this card's bandwidth ({name})")
    if goal:
        fig["vs_goal"] = tok_s / goal
    sub = "" if n == FULL["requests"] or shape == "tiny" else f" (the first {n} of nano-vllm's 256)"
    notes = (f"{st['steps']} steps, {st['cuda_graph_steps']} as CUDA graphs, {st['preemptions']} preemptions; "
             f"KV cache {kv} tokens ({kv * kv_bytes_per_token(cfg, dtype) / 2**30:.1f} GiB)")
    case = (f"throughput {shape}: nano-vllm workload, {n} requests{sub}, input lengths uniform in {w['in_len']}, "
            f"output in {w['out_len']}, T=0.6, ignore_eos, max_num_seqs {min(256, n)}, max_num_batched_tokens "
            f"16384, {_dt(dtype)}")
    result = (f"{tok_s:.0f} output tok/s ({made} tokens in {s:.2f} s){anchor}; MFU {fig['mfu']:.1%} of {name}"
              + (f"; x{fig['vs_goal']:.3g} goal {goal:,.0f}: {'met' if tok_s >= goal else 'NOT met'}" if goal else "")
              + f"; {notes}")
    missed = goal is not None and tok_s < goal

    def again():  # the same prompts, 48 output tokens each: prefill and full-batch decode steps
        llm.pool.forget_prefixes()
        llm.generate(prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=min(o, 48))
                               for o in outs], use_tqdm=False)
    return Outcome(fig, notes, case, result, missed, again, "the same requests, 48 output tokens each")


def decode(shape, device, args, tmp):
    from srlm_engine.engine import SamplingParams
    cfg, (plen, ntok) = ModelConfig(**SHAPES[shape]), WORK[shape]["decode"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(cfg, dtype, device)
    prompt = random.Random(1).choices(range(2, cfg.vocab_size), k=plen)
    llm = build_llm(model, tmp, device, max_num_seqs=1, max_model_len=plen + ntok + 16,
                    kv_cache_tokens=plen + ntok + 16)

    def gen(k):
        llm.pool.forget_prefixes()  # the whole prompt is computed every time
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=k, ignore_eos=True), use_tqdm=False)
    gen(8)  # warm-up
    # minima of 3: other work on the machine only ever adds time
    pre = min(timed(lambda: gen(1), device) for _ in range(3))
    full = min(timed(lambda: gen(ntok + 1), device) for _ in range(3))
    if full <= pre:
        raise RuntimeError(f"decode: {ntok} more tokens took no time ({full:.4f} s against {pre:.4f} s)")
    tok_s = ntok / (full - pre)  # the first token comes with the prompt; then ntok decode steps
    name, _, bw = card(device)
    per_tok = linear_params(cfg) * dtype.itemsize + kv_bytes_per_token(cfg, dtype) * (plen + ntok / 2)
    share = per_tok * tok_s / bw
    fig = {"decode_tok_s": tok_s, "hbm_share": share, "bytes_per_token": per_tok,
           "limit_tok_s": bw / per_tok, "prompt_s": pre, "call_s": full}
    notes = f"whole call {(ntok + 1) / full:.1f} tok/s incl. the prompt; the card's bandwidth {name}"
    case = f"decode {shape}: batch 1, {plen}-token prompt, {ntok} greedy tokens, {_dt(dtype)}, fastest of 3 calls"
    result = (f"{tok_s:.1f} tok/s; {per_tok / 1e9:.3f} GB read per token = {share:.1%} of {name} HBM "
              f"({bw / 1e12:.2f} TB/s; its limit {bw / per_tok:.0f} tok/s); goal 60%: "
              f"{'met' if share >= HBM_GOAL else 'NOT met'}; {notes}")
    return Outcome(fig, notes, case, result, shape != "tiny" and share < HBM_GOAL, lambda: gen(65),
                   f"the {plen}-token prompt and 64 decode steps")


def dpo(shape, device, args, tmp):
    import bench_train as bt
    if shape == "8b":
        raise SystemExit("dpo: the 8B shape's fp32 weights, gradients and AdamW state (128 GB) fit no one GPU")
    cfg, (pairs, plen, rlen) = ModelConfig(**SHAPES[shape]), WORK[shape]["dpo"]
    ids, tgt = (t.to(device) for t in bt.make_batch(pairs, plen, rlen, cfg.vocab_size))
    rows, T = ids.shape

    def amp():  # the trainer's one-process mixed precision: fp32 weights, bf16 compute
        return torch.autocast(device, dtype=torch.bfloat16)
    steps, peak_steps = (5, 2) if device == "cuda" else (2, 2)
    out, profile_step = {}, None
    for impl in ("torch", "ours"):
        peak_mb = peak_meter(device)
        try:
            model = random_model(cfg, torch.float32, device).train()
            ref_model = random_model(cfg, torch.float32, device) if impl == "torch" else None
            with amp():
                refs = bt.ref_pass(model, ids, tgt) if impl == "ours" else None
            step = bt.make_step(impl, model, ids, tgt, ref_model=ref_model, refs=refs)
            for _ in range(peak_steps):
                with amp():
                    step()
            sync(device)
            peak = peak_mb()
            ts, ref_s = [], []
            for _ in range(steps):
                with amp():
                    ts.append(timed(step, device))
                    if impl == "ours":
                        ref_s.append(timed(lambda: bt.ref_pass(model, ids, tgt), device))
            s = statistics.median(ts) + (statistics.median(ref_s) if ref_s else 0.0)
            out[impl] = (s, peak)
            if impl == "ours":
                def profile_step(step=step, model=model):
                    with amp():
                        bt.ref_pass(model, ids, tgt)
                        step()
        except torch.cuda.OutOfMemoryError as e:  # the baseline's logits may not fit: say so, go on
            out[impl] = (float("nan"), float("nan"))
            print(f"dpo {shape}: {impl} ran out of device memory: {str(e).splitlines()[0]}")
        finally:
            model = ref_model = step = refs = None
    name, peak_flops, _ = card(device)
    n, a = linear_params(cfg), attn_dims(cfg)
    flops = rows * (6 * n * T + 6 * a * T * T) + rows * (2 * n * T + 2 * a * T * T)
    (s_o, mb_o), (s_t, mb_t) = out["ours"], out["torch"]
    mfu = flops / s_o / peak_flops
    fig = {"ours_tok_s": rows * T / s_o, "ours_peak_mb": mb_o, "ours_mfu": mfu}
    if math.isfinite(s_t):
        fig.update(torch_tok_s=rows * T / s_t, torch_peak_mb=mb_t, torch_mfu=flops / s_t / peak_flops,
                   speed_x=s_t / s_o, memory_x=mb_o / mb_t if mb_t > 0 else float("nan"))
    met = mfu >= MFU_GOAL and fig.get("speed_x", 0) >= DPO_SPEED_GOAL and fig.get("memory_x", 2) <= 1
    torch_txt = (f"torch {fig['torch_tok_s']:.0f} tok/s, {mb_t:.0f} MB, MFU {fig['torch_mfu']:.1%}; ours "
                 f"x{fig['speed_x']:.3g} torch's tokens/s at x{fig['memory_x']:.3g} its peak memory"
                 if "speed_x" in fig else "torch ran out of device memory")
    notes = (f"{steps} timed steps each after {peak_steps}, medians; MFU against {name} "
             f"({peak_flops / 1e12:.0f} TFLOP/s)")
    case = (f"dpo {shape}: {pairs} pairs x {plen}+{rlen} tokens ({rows * T} a step), fp32 weights + AdamW, "
            f"autocast bf16, fwd+bwd+step (ours incl. its reference pass)")
    result = (f"ours {fig['ours_tok_s']:.0f} tok/s, {mb_o:.0f} MB, MFU {mfu:.1%}; {torch_txt}; goals (MFU 40%, "
              f"x1.3 speed, no more memory): {'met' if met else 'NOT met'}; {notes}")
    return Outcome(fig, notes, case, result, shape != "tiny" and not met, profile_step,
                   "one step of ours with its reference pass")


def determinism(shape, device, args, tmp):
    from srlm_engine.engine import SamplingParams
    cfg, (n, lens, ntok) = ModelConfig(**SHAPES[shape]), WORK[shape]["det"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rng = random.Random(2)
    prompts = [rng.choices(range(2, cfg.vocab_size), k=rng.randint(*lens)) for _ in range(n)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.6, max_tokens=ntok, ignore_eos=True, seed=i)
              for i in range(n)]
    runs = []
    for _ in range(2):  # each run: weights from the seed, a new engine, the requests
        llm = build_llm(random_model(cfg, dtype, device), tmp, device, max_num_seqs=n,
                        max_model_len=lens[1] + ntok + 16, kv_cache_tokens=n * (lens[1] + ntok + 16))
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(tuple(o.outputs[0].token_ids), o.outputs[0].cumulative_logprob) for o in outs])
        llm = outs = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    same = runs[0] == runs[1]
    finite = all(math.isfinite(lp) for run in runs for _, lp in run)
    digest = hashlib.sha256(repr(runs[0]).encode()).hexdigest()[:12]
    fig = {"identical": float(same), "finite": float(finite), "requests": n,
           "tokens": sum(len(t) for t, _ in runs[0])}
    notes = f"digest {digest}"
    case = (f"determinism {shape}: 2 runs (weights from seed 0, a new engine each), {n} requests of "
            f"{lens[0]}-{lens[1]} tokens, {ntok} tokens each, half greedy, half T=0.6 seeded, {_dt(dtype)}")
    result = (f"tokens and log-probs {'identical' if same else 'DIFFER'} across the runs; "
              f"{'all finite' if finite else 'NOT all finite'}; {notes}")
    return Outcome(fig, notes, case, result)


RUNS = {"throughput": throughput, "decode": decode, "dpo": dpo, "determinism": determinism}


def _shown(path: Path) -> str:
    """`path` relative to the repository where it lies inside it (bench/profiles/...)."""
    root = Path(__file__).resolve().parent.parent
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _dt(dtype):
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="1b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--part", choices=PARTS, action="append", help="default: every part, in this order")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, help="throughput: the first N of the workload's requests (default all)")
    p.add_argument("--profile", action="store_true", help="write the profile summary even where the goal is met")
    p.add_argument("--profile-dir", type=Path, default=PROFILES)
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p


def main(argv=None) -> int:
    """Runs the parts asked for; exit status 1 if the determinism check fails. The tiny shape
    checks the code, not the speed: it records nothing."""
    args = parser().parse_args(argv)
    dev, failed = device_name(args.device), False
    for part in args.part or PARTS:
        if part == "dpo" and args.shape == "8b" and not args.part:
            continue  # not run by default: it does not fit (dpo() says so when asked)
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(Path(tmp), SHAPES[args.shape]["vocab_size"])
            out = RUNS[part](args.shape, args.device, args, Path(tmp))
            print(f"{part} {args.shape}: " + " ".join(f"{k}={v:.6g}" for k, v in out.fig.items())
                  + f" # {out.notes}", flush=True)
            failed |= out.fig.get("identical", 1) < 1 or out.fig.get("finite", 1) < 1
            profile = args.profile_dir / f"{part}-{args.shape}.txt"
            profiling = out.again is not None and (out.missed or args.profile)
            if not args.no_record and args.shape != "tiny":  # recorded before profiling, which may fail
                append_rows("bench_scale", dev, [(out.case, out.result + (
                    f"; profile summary: {_shown(profile)}" if profiling else ""))])
            if profiling:
                try:
                    write_profile(profile, out.again, args.device, f"{out.case}: profiled: {out.what}")
                    print(f"{part} {args.shape}: profile summary in {profile}", flush=True)
                except Exception as e:  # the measurement stands; the missing profile fails the run
                    print(f"{part} {args.shape}: profiling failed: {type(e).__name__}: {e}", flush=True)
                    failed = True
        out = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
