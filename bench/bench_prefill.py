"""The cost of batch-invariant CPU prefill: LLM.next_token_logprobs as it is (engine/attention.py's
invariant_attention, linear layers on at least model_runner.MIN_ROWS rows) against per-sequence
SDPA, generate()'s prefill (a causal SDPA call when nothing is cached, a masked one over the cached prefix otherwise, linear
layers on the step's rows alone), in the same process, rounds interleaved.

    python bench/bench_prefill.py [--model DIR] [--dtype auto|float32|bfloat16] [--items 12] [--rounds 3] [--no-record]

Workloads, next-token log-probs (prefill only):
- judge: the expected-score judge over eft_eval items (instruction x response in the judge
  template, ~300-700 tokens; the template's head comes from the prefix cache after the first);
- short: 64 chat-rendered IFT instructions (~20-60 tokens).
The prefix cache is emptied before each timed call. Prints seconds per workload and variant and
the ratio invariant / SDPA; appends the rows to RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name  # noqa: E402

from srlm_engine.engine import attention, model_runner  # noqa: E402


def sdpa_prefill(self, q, k, v, kc, vc, seq: int):
    """Per-sequence SDPA: over the new tokens when nothing is cached, else over the gathered context."""
    n, ctx = q.shape[0], self.meta.ctx_lens[seq]
    mask = None
    if ctx > n:
        bt = self.meta.block_tables[seq, :-(-ctx // kc.shape[1])].long()
        k, v = kc[bt].flatten(0, 1)[:ctx], vc[bt].flatten(0, 1)[:ctx]
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
    return o[0].transpose(0, 1)


class Variant:
    """Swaps the prefill in for the duration of a `with`."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = attention.PagedAttention._prefill, model_runner.MIN_ROWS
        if self.name == "sdpa":
            attention.PagedAttention._prefill, model_runner.MIN_ROWS = sdpa_prefill, 1

    def __exit__(self, *exc):
        attention.PagedAttention._prefill, model_runner.MIN_ROWS = self.saved


def workloads(engine, items: int):
    import json

    from srlm_engine.config import SEED_DIR
    from srlm_engine.judge import judge_expected
    recs = [json.loads(line) for line in open(SEED_DIR / "eft_eval.jsonl")][:items]
    ins = [r["instruction"] for r in recs for _ in r["responses"]]
    res = [x for r in recs for x in r["responses"]]
    ift = [json.loads(line) for line in open(SEED_DIR / "ift.jsonl")][:64]
    chats = [engine.tokenizer.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"], True)
             for r in ift]
    ids = [engine.tokenizer.encode(c, add_special_tokens=False) for c in chats]
    return {"judge": lambda: judge_expected(engine, ins, res),
            "short": lambda: engine.next_token_logprobs(ids)}, len(ins), len(chats)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    from srlm_engine.device import resolve_dtype
    from srlm_engine.engine.llm import LLM
    from srlm_engine.model.pull import pull
    model = args.model or str(pull())
    dtype = resolve_dtype(args.dtype, "cpu")
    engine = LLM(model, dtype=dtype, device="cpu")
    work, n_judge, n_short = workloads(engine, args.items)
    times = {(w, v): [] for w in work for v in ("invariant", "sdpa")}
    for _ in range(args.rounds):
        for w, call in work.items():
            for v in ("invariant", "sdpa"):
                with Variant(v):
                    engine.pool.forget_prefixes()
                    t = time.perf_counter()
                    call()
                    times[w, v].append(time.perf_counter() - t)
    dev = device_name("cpu") + f", {str(dtype).removeprefix('torch.')}"
    rows = []
    for w, size in (("judge", f"{n_judge} judge prompts, expected mode"), ("short", f"{n_short} chat prompts")):
        inv, ref = statistics.median(times[w, "invariant"]), statistics.median(times[w, "sdpa"])
        print(f"{w}: invariant {inv:.2f} s, sdpa {ref:.2f} s, ratio {inv / ref:.2f}x ({args.rounds} rounds)")
        rows.append((f"{size}, median of {args.rounds} interleaved rounds",
                     f"invariant {inv:.2f} s vs per-sequence SDPA {ref:.2f} s = {inv / ref:.2f}x the time"))
    if not args.no_record:
        append_rows("bench_prefill", dev, rows)


if __name__ == "__main__":
    main()
