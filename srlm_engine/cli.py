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


# ------------------------------------------------------------------- training (sft, dpo)

_TRAIN_TYPES = {"max_steps": int, "lr": float, "min_lr": float}


def _add_train_flags(q) -> None:
    """--model/--out/--nproc/--config and one flag per TrainConfig field; a flag left out stays
    out of the namespace, so the TOML file (or the default) decides it."""
    from dataclasses import fields
    from srlm_engine.config import TrainConfig
    q.add_argument("--model", required=True, help="input model directory (HF layout)")
    q.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/")
    q.add_argument("--nproc", type=int, default=None,
                   help="start N local processes through torch.distributed.run (FSDP2)")
    q.add_argument("--config", default=None, help="TOML file of training settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            q.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif f.name == "adam_betas":
            q.add_argument(flag, dest=f.name, type=float, nargs=2, default=argparse.SUPPRESS)
        else:
            q.add_argument(flag, dest=f.name, type=_TRAIN_TYPES.get(f.name, type(f.default)),
                           default=argparse.SUPPRESS)


def _train_config(args):
    from dataclasses import fields
    from srlm_engine.config import TrainConfig
    d = {}
    if args.config:
        import tomllib
        from srlm_engine.config import ConfigError
        try:
            with open(args.config, "rb") as fh:
                d = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{args.config}: invalid TOML: {e}") from None
        d = d.get("train", d)
    d.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    return TrainConfig.from_dict(d, source=args.config or "flags")


def _relaunch(args, data_flag: str) -> int:
    """Run this same command in args.nproc local processes under torch.distributed.run."""
    import socket
    import subprocess
    from dataclasses import fields
    from srlm_engine.config import TrainConfig
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "srlm_engine.cli", args.command,
           "--model", args.model, data_flag, getattr(args, data_flag[2:]), "--out", args.out]
    if args.config:
        cmd += ["--config", args.config]
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            v, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                cmd.append(flag if v else "--no-" + f.name.replace("_", "-"))
            else:
                cmd += [flag, *map(repr, v)] if isinstance(v, (list, tuple)) else [flag, repr(v) if isinstance(v, float) else str(v)]
    return subprocess.call(cmd)


def _load_records(path, kind: str) -> list:
    from srlm_engine.io import DataError, read_jsonl
    try:
        from srlm_engine import data
        recs = data.load_sft(path) if kind == "sft" else data.load_pairs(path)
    except ImportError:
        recs = read_jsonl(path)
    if not recs:
        raise DataError(f"{path}: no records (the file is empty)")
    return recs


def cmd_sft(args) -> int:
    cfg = _train_config(args)  # a bad setting fails here, before any process starts
    if args.nproc:
        return _relaunch(args, "--data")
    from srlm_engine.train.parallel import teardown
    from srlm_engine.train.trainer import train_sft
    try:
        print(train_sft(args.model, _load_records(args.data, "sft"), args.out, cfg))
    finally:
        teardown()
    return 0


def cmd_dpo(args) -> int:
    cfg = _train_config(args)
    if args.nproc:
        return _relaunch(args, "--pairs")
    from pathlib import Path
    from srlm_engine.train.parallel import teardown
    from srlm_engine.train.refs import cached_reference_logps
    from srlm_engine.train.trainer import train_dpo
    try:
        pairs = cached_reference_logps(args.model, _load_records(args.pairs, "dpo"),
                                       Path(args.out) / "pairs.ref.jsonl", cfg.max_seq_len, cfg.ref_batch_size)
        print(train_dpo(args.model, pairs, args.out, cfg))
    finally:
        teardown()
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

    q = sub.add_parser("sft", help="supervised fine-tuning on chat records (loss on assistant turns)")
    q.add_argument("--data", required=True, help='JSONL of {"messages": [{"role", "content"}, ...]}')
    _add_train_flags(q)
    q.set_defaults(fn=cmd_sft)
    q = sub.add_parser("dpo", help="DPO on preference pairs; reference log-probs computed once first")
    q.add_argument("--pairs", required=True, help='JSONL of {"prompt", "chosen", "rejected"}')
    _add_train_flags(q)
    q.set_defaults(fn=cmd_dpo)
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
