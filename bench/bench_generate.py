"""Generation throughput on a self-rewarding-shaped workload: our engine vs transformers generate.

    python bench/bench_generate.py [--prompts 64] [--n 4] [--max-tokens 128] [--judge-k 3]
                                   [--judge-tokens 32] [--hf-batch 32] [--b1-tokens 64] [--no-record]

Workload (SmolLM2-135M-Instruct; both engines in this process, same dtype, same torch threads):
  1. answer: --prompts chat prompts, --n samples each (temperature 0.7, top_p 0.9), --max-tokens
     new tokens per sample;
  2. judge: every answer under the one long judge template (srlm_engine.judge.DEFAULT_TEMPLATE,
     ~320 tokens rendered) x --judge-k samples, --judge-tokens new tokens each.
Every sequence generates exactly its max tokens on both sides (ignore_eos here, min_new_tokens for
transformers), so both do the same useful work; tokens/s counts generated tokens only.
transformers runs batched with left padding, --hf-batch rows per generate call, n samples by
num_return_sequences. Batch 1: one short prompt, --b1-tokens greedy tokens, tokens/s of the whole call.
`pytest bench --benchmark-only` runs a small version through pytest-benchmark.

Device: CPU by default (fp32, our C++ paged attention); `--device cuda` runs both engines on the
GPU (bf16 by default; ours with the Triton paged attention and CUDA graphs for decode, or
--enforce-eager; transformers with its default SDPA attention). `--model DIR` benchmarks another
checkpoint than the pulled SmolLM2 (e.g. random weights of the same shape where the real ones
cannot be fetched: the row then says so).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin at barriers take the cores from the thread they wait for when the
# machine is shared (load above the core count): small-batch steps slowed 3-4x here. Must be set
# before torch loads libgomp; it applies to both engines alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name  # noqa: E402

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "glass",
          "tea", "clouds", "maps", "salt", "owls", "bridges", "paper"]
ASKS = ["Explain {} to a child.", "Write a short story about {}.", "Give three facts about {}.",
        "What would the world be like without {}?"]


def questions(n: int) -> list[str]:
    return [ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) + f" (#{i})"
            for i in range(n)]


def ours_workload(llm, qs, args):
    from srlm_engine.engine import SamplingParams
    from srlm_engine.judge import encode_prompts, render_judge_prompts

    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": q}] for q in qs],
                    SamplingParams(n=args.n, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens,
                                   ignore_eos=True, seed=0), use_tqdm=False)
    t1 = time.perf_counter()
    inst = [q for q, o in zip(qs, outs) for _ in o.outputs]
    resp = [c.text for o in outs for c in o.outputs]
    judge = encode_prompts(llm.tokenizer, render_judge_prompts(llm.tokenizer, inst, resp))
    jouts = llm.generate(judge, SamplingParams(n=args.judge_k, temperature=0.7, top_p=0.9,
                                               max_tokens=args.judge_tokens, ignore_eos=True, seed=1),
                         use_tqdm=False)
    t2 = time.perf_counter()
    toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
    jtoks = sum(len(c.token_ids) for o in jouts for c in o.outputs)
    return toks + jtoks, t2 - t0, (toks, t1 - t0, jtoks, t2 - t1), inst, resp


def hf_generate(hf, tok, prompts, n, max_tokens, batch, do_sample=True):
    """Generated-token count of transformers generate over string prompts, left-padded batches."""
    total = 0
    pad = tok.eos_token_ids[0]
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    per = max(1, batch // n)
    for i in range(0, len(enc), per):
        chunk = enc[i:i + per]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(e)) + e for e in chunk], device=hf.device)
        mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in chunk], device=hf.device)
        # top_k=0: no top-k, as ours (transformers' default of 50 would sample another distribution,
        # and its top-p sort runs ~3x faster on a vocabulary already cut to 50)
        kw = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0) if do_sample else dict(do_sample=False)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          num_return_sequences=n, pad_token_id=pad, **kw)
        total += (out.shape[1] - L) * out.shape[0]
    _sync(hf.device)
    return total


def hf_workload(hf, tok, qs, inst, resp, args):
    from srlm_engine.judge import render_judge_prompts

    chats = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    t0 = time.perf_counter()
    toks = hf_generate(hf, tok, chats, args.n, args.max_tokens, args.hf_batch)
    t1 = time.perf_counter()
    # judge the same answers as ours (the texts only shape the prompt lengths)
    judge = render_judge_prompts(tok, inst, resp)
    jtoks = hf_generate(hf, tok, judge, args.judge_k, args.judge_tokens, args.hf_batch)
    t2 = time.perf_counter()
    return toks + jtoks, t2 - t0, (toks, t1 - t0, jtoks, t2 - t1)


def batch1(llm, hf, tokens):
    from srlm_engine.engine import SamplingParams

    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about owls."}])
    ids = llm.tokenizer.encode(chat, add_special_tokens=False)  # the template holds any BOS, as for HF
    p = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    # the warm-up (and the workload's system prompt) left the prompt's full blocks in the prefix
    # cache: drop them, so that ours prefills the whole prompt as transformers does
    llm.pool.forget_prefixes()
    t = time.perf_counter()
    llm.generate([ids], p, use_tqdm=False)
    _sync(llm.device)
    ours = tokens / (time.perf_counter() - t)
    hf_generate(hf, llm.tokenizer, [chat], 1, 4, 1, do_sample=False)
    t = time.perf_counter()
    hf_generate(hf, llm.tokenizer, [chat], 1, tokens, 1, do_sample=False)
    _sync(llm.device)
    return ours, tokens / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(args):
    from transformers import LlamaForCausalLM

    from srlm_engine.engine import LLM
    from srlm_engine.model.pull import pull

    path = args.model or pull()
    dtype = DTYPES[args.dtype]
    llm = LLM(path, dtype=dtype, device=args.device, kv_cache_tokens=args.kv_tokens,
              max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager)
    try:
        hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return llm, hf.to(args.device).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--judge-k", type=int, default=3)
    ap.add_argument("--judge-tokens", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--b1-tokens", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=32768)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for our decode steps")
    ap.add_argument("--model", help="checkpoint directory (default: the pulled SmolLM2)")
    ap.add_argument("--weights-note", default="", help="said in the recorded row, e.g. 'random weights'")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    llm, hf = load(args)
    qs = questions(args.prompts)
    with torch.inference_mode():
        from srlm_engine.engine import SamplingParams
        llm.generate([[9, 8, 7]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-ups
        hf_generate(hf, llm.tokenizer, ["Hi"], 1, 2, 1)
        ours_toks, ours_s, ours_parts, inst, resp = ours_workload(llm, qs, args)
        stats = llm.stats()
        hf_toks, hf_s, hf_parts = hf_workload(hf, llm.tokenizer, qs, inst, resp, args)
        b1_ours, b1_hf = batch1(llm, hf, args.b1_tokens)
    size = (f"{args.prompts} prompts x n={args.n} x {args.max_tokens} tok; judge x{args.judge_k} "
            f"x {args.judge_tokens} tok; {args.dtype}"
            + (f", CUDA graphs {stats['cuda_graph_steps']} of {stats['steps']} steps" if args.device == "cuda" else "")
            + (f"; {args.weights_note}" if args.weights_note else ""))
    dev = device_name(args.device)
    rows = [
        ("engine", f"{ours_toks / ours_s:.1f}", f"answer {ours_parts[0] / ours_parts[1]:.1f}, "
         f"judge {ours_parts[2] / ours_parts[3]:.1f}"),
        ("transformers", f"{hf_toks / hf_s:.1f}", f"answer {hf_parts[0] / hf_parts[1]:.1f}, "
         f"judge {hf_parts[2] / hf_parts[3]:.1f}"),
    ]
    ratio = (ours_toks / ours_s) / (hf_toks / hf_s)
    print(f"workload: {size}; {dev}; attention backend {stats['backend']}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print("| impl | tokens/s | phases (tokens/s) |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"ratio engine/transformers: {ratio:.2f}x (goal on the GPU: 5x)")
    print(f"prefix-cache hit rate: {stats['prefix_hit_rate']:.1%} of {stats['prefix_queried_tokens']} "
          f"prompt tokens; preemptions {stats['preemptions']}")
    print(f"batch 1 decode: engine {b1_ours:.1f} tok/s, transformers {b1_hf:.1f} tok/s, "
          f"{b1_ours / b1_hf:.2f}x (goal 1.5x)")
    if not args.no_record:
        append_rows("bench_generate", dev, [
            (f"workload ({size})", f"engine {ours_toks / ours_s:.1f} tok/s vs transformers "
             f"{hf_toks / hf_s:.1f} tok/s = {ratio:.2f}x; prefix hits {stats['prefix_hit_rate']:.0%}"),
            (f"batch 1, {args.b1_tokens} greedy tok", f"engine {b1_ours:.1f} tok/s vs transformers "
             f"{b1_hf:.1f} tok/s = {b1_ours / b1_hf:.2f}x"),
        ])


# ------------------------------------------------------------- pytest-benchmark (small size)
def _small():
    cuda = torch.cuda.is_available()
    return argparse.Namespace(prompts=2, n=2, max_tokens=8, judge_k=2, judge_tokens=4, hf_batch=8,
                              kv_tokens=8192, max_num_seqs=64, model=None, device="cuda" if cuda else "cpu",
                              dtype="bf16" if cuda else "fp32", enforce_eager=False)


def test_generate_workload_ours(benchmark):
    args = _small()
    llm, _ = load(args)
    benchmark.pedantic(lambda: ours_workload(llm, questions(args.prompts), args), rounds=2)


def test_generate_workload_transformers(benchmark):
    args = _small()
    llm, hf = load(args)
    qs = questions(args.prompts)
    _, _, _, inst, resp = ours_workload(llm, qs, args)
    with torch.inference_mode():
        benchmark.pedantic(lambda: hf_workload(hf, llm.tokenizer, qs, inst, resp, args), rounds=2)


def test_generate_batch1(benchmark):
    llm, hf = load(_small())
    benchmark.pedantic(lambda: batch1(llm, hf, 8), rounds=2)


if __name__ == "__main__":
    main()
