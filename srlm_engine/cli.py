"""`srlm` subcommands. Each command is a `cmd_*` function and one `add_parser` block in `build()`;
this file parses arguments and calls into the parts that own the work, nothing more."""
from __future__ import annotations

import argparse
import sys
import time

DEMO_INSTRUCTIONS = [
    "What is the capital of France?",
    "Give three tips for staying focused while studying.",
    "Write a haiku about the sea.",
]


def cmd_model_pull(args) -> int:
    from srlm_engine.model.pull import pull
    print(pull(args.name, args.out))
    return 0


def cmd_model_info(args) -> int:
    import torch
    from srlm_engine.model.weights import load_config, load_state_dict
    cfg = load_config(args.dir)
    sd = load_state_dict(args.dir, cfg, dtype=torch.float32, device="meta")
    n = sum(t.numel() for t in sd.values())
    for k, v in cfg.to_hf().items():
        print(f"{k:28s} {v}")
    print(f"{'parameters':28s} {n:,} ({n / 1e6:.1f}M{', embeddings tied' if cfg.tie_word_embeddings else ''})")
    return 0


def cmd_demo(args) -> int:
    from srlm_engine.model.greedy import greedy_generate
    from srlm_engine.model.llama import Llama
    from srlm_engine.model.pull import pull
    from srlm_engine.tokenizer import Tokenizer
    path = pull()
    model, tok = Llama.from_pretrained(path), Tokenizer.from_pretrained(path)
    for q in DEMO_INSTRUCTIONS:
        t0 = time.perf_counter()
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        out = greedy_generate(model, ids, args.max_tokens, tok.eos_token_ids)
        dt = time.perf_counter() - t0
        print(f"\n>>> {q}\n{tok.decode(out).strip()}\n[{len(out)} tokens, {len(out) / dt:.1f} tok/s]")
    return 0


def build() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srlm", description="Self-Rewarding Language Models engine")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="pull the embedded model, inspect a model directory")
    msub = model.add_subparsers(dest="model_command", required=True)
    q = msub.add_parser("pull", help="fetch and convert an embedded model (default: SmolLM2-135M-Instruct)")
    q.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    q.add_argument("--out", default=None, help="directory to write (default: the user cache)")
    q.set_defaults(fn=cmd_model_pull)
    q = msub.add_parser("info", help="print a model directory's config and parameter count")
    q.add_argument("dir")
    q.set_defaults(fn=cmd_model_info)

    q = sub.add_parser("demo", help="pull the default model and answer three instructions")
    q.add_argument("--max-tokens", type=int, default=64)
    q.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"srlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
