"""`srlm` subcommands. Each command is a `cmd_*` function and one `add_parser` block in `build()`;
this file parses arguments and calls into the parts that own the work, nothing more."""
from __future__ import annotations

import argparse
import os
import sys
import time

from jinja2.exceptions import TemplateError

from srlm_engine.config import SEED_DIR
from srlm_engine.launch import in_torchrun, torchrun


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
    """The main job on the embedded model: pull SmolLM2, run the `quick` self-rewarding loop."""
    from srlm_engine.model.pull import pull
    args.model = str(pull())
    return cmd_loop(args)


def cmd_loop(args) -> int:
    from pathlib import Path
    from srlm_engine import loop
    from srlm_engine.config import ConfigError, LoopConfig
    from srlm_engine.report import summary_table
    from srlm_engine.train.parallel import teardown
    toml = None
    if args.config:
        import tomllib
        try:
            with open(args.config, "rb") as fh:
                toml = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise ConfigError(f"{args.config}: {e}") from None
    cfg = LoopConfig.build(args.preset, toml, iterations=args.iterations, prompts=args.prompts, n=args.n,
                           judge_samples=args.judge_samples, judge_mode=args.judge_mode,
                           eval_judge=args.eval_judge, prompt_writer=args.prompt_writer, seed=args.seed)
    nproc = args.nproc or 1
    for tcfg in (cfg.sft, cfg.dpo):  # a batch that nproc does not divide, now rather than hours into the run
        tcfg.accum_steps(int(os.environ.get("WORLD_SIZE", nproc)))
    if nproc > 1 and not in_torchrun():
        if nproc % args.tp:
            raise ConfigError(f"--tp {args.tp} must divide --nproc {nproc}")
        return torchrun(nproc, args.argv)
    t0 = time.perf_counter()
    try:
        final = loop.run(args.model, args.out, cfg, tp=args.tp)
    except loop.LoopStop as e:
        print(f"srlm loop: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        teardown()
    if int(os.environ.get("RANK", "0")):
        return 0  # rank 0 prints the summary
    print("\n" + summary_table(Path(args.out)))
    print(f"final model: {final}\nreport: {Path(args.out) / 'report.md'}  ({time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_judge_eval(args) -> int:
    from srlm_engine import data, judge
    from srlm_engine.config import LoopConfig
    from srlm_engine.device import default_device, describe
    from srlm_engine.evaluate import JudgeMetrics, format_table, judge_eval, length_rule
    from srlm_engine.runtime import open_engine
    cfg = LoopConfig.build(None, None, judge_samples=args.judge_samples, seed=args.seed, dtype=args.dtype)
    sets = {"EFT-eval": data.load_eft_eval(args.data)}
    if args.lengthfree and os.path.isfile(args.lengthfree):
        sets["length-free"] = data.load_eft_eval(args.lengthfree)
    print(f"generation on {default_device()} in {describe(cfg.dtype, default_device())}")
    template = judge.load_template(args.template) if args.template else judge.DEFAULT_TEMPLATE
    t0 = time.perf_counter()
    llm = open_engine(args.model, cfg)
    for name, items in sets.items():
        rule = length_rule(items)
        for mode, r in judge_eval(llm, cfg, template, items, args.seed).items():
            if mode == "length_rule":
                continue
            m = JudgeMetrics(**r["metrics"])
            print(f"\n{name}, {mode} mode: parse rate {100 * r['parse_rate']:.1f}%, scores {r['distribution']}")
            print(format_table({args.model: m, "longer is better": rule}))
            beats = m.pairwise_accuracy > rule.pairwise_accuracy  # False for n/a (NaN)
            print(f"the judge {'beats' if beats else 'does not beat'} the length rule on {name} "
                  f"({_pct(m.pairwise_accuracy)} against {_pct(rule.pairwise_accuracy)} pairwise)")
    print(f"({', '.join(f'{len(v)} {k} instructions' for k, v in sets.items())}, {time.perf_counter() - t0:.0f}s)")
    return 0


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def cmd_data_eft_augment(args) -> int:
    from srlm_engine.augment import write_eft_augment
    counts = write_eft_augment(args.file, args.out, seed=args.seed, per_record=args.per_record)
    print(f"{sum(counts.values())} EFT records -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_data_oasst(args) -> int:
    from srlm_engine.data import convert_oasst
    counts = convert_oasst(args.file, args.out, eval_share=args.eval_share)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


# ------------------------------------------------------------------- training (sft, dpo)
def _none_or(kind):
    """An argparse type for a field that may be None: 'none' gives None (e.g. --max-grad-norm none)."""
    def parse(s: str):
        return None if s.lower() == "none" else kind(s)
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


_TRAIN_TYPES = {"max_steps": _none_or(int), "lr": _none_or(float), "min_lr": _none_or(float),
                "max_grad_norm": _none_or(float), "grad_accum": _none_or(int), "global_batch_size": _none_or(int)}


def _add_train_flags(q) -> None:
    """--model/--out/--nproc/--config and one flag per TrainConfig field; a flag left out stays
    out of the namespace, so the TOML file (or the default) decides it."""
    from dataclasses import fields
    from srlm_engine.config import MIXED_PRECISION, TrainConfig
    q.add_argument("--model", required=True, help="input model directory (HF layout)")
    q.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/")
    q.add_argument("--nproc", type=int, default=None,
                   help="start N local processes through torch.distributed.run (FSDP2)")
    q.add_argument("--config", default=None, help="TOML file of training settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "mixed_precision":  # a bare --mixed-precision is bf16, as when it was a switch
            q.add_argument(flag, dest=f.name, nargs="?", const="bf16", choices=MIXED_PRECISION,
                           default=argparse.SUPPRESS)
            q.add_argument("--no-mixed-precision", dest=f.name, action="store_const", const="none",
                           default=argparse.SUPPRESS)
        elif isinstance(f.default, bool):
            q.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif f.name == "adam_betas":
            q.add_argument(flag, dest=f.name, type=float, nargs=2, default=argparse.SUPPRESS)
        else:
            q.add_argument(flag, dest=f.name, type=_TRAIN_TYPES.get(f.name, type(f.default)),
                           choices=f.metadata.get("choices"), help=f.metadata.get("help"), default=argparse.SUPPRESS)


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
        if "train" in d:  # the settings are either all in a [train] table or all at the top level
            if not isinstance(d["train"], dict):
                raise ConfigError(f"{args.config}: train must be a table of training settings")
            if len(d) > 1:
                raise ConfigError(f"{args.config}: put every training setting in the [train] table or none: "
                                  f"found [train] beside {sorted(k for k in d if k != 'train')}")
            d = d["train"]
    d = TrainConfig.layer(d, {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    return TrainConfig.from_dict(d, source=args.config or "flags")


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
    if args.nproc and args.nproc > 1 and not in_torchrun():
        return torchrun(args.nproc, args.argv)
    from srlm_engine.train.parallel import teardown
    from srlm_engine.train.trainer import train_sft
    try:
        print(train_sft(args.model, _load_records(args.data, "sft"), args.out, cfg))
    finally:
        teardown()
    return 0


def cmd_dpo(args) -> int:
    cfg = _train_config(args)
    if args.nproc and args.nproc > 1 and not in_torchrun():
        return torchrun(args.nproc, args.argv)
    from pathlib import Path
    from srlm_engine.train.parallel import teardown
    from srlm_engine.train.refs import cached_reference_logps, policy_dtype
    from srlm_engine.train.trainer import train_dpo
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        pairs = cached_reference_logps(args.model, _load_records(args.pairs, "dpo"),
                                       Path(args.out) / "pairs.ref.jsonl", cfg.max_seq_len, cfg.ref_batch_size,
                                       dtype=policy_dtype(cfg, world))
        print(train_dpo(args.model, pairs, args.out, cfg))
    finally:
        teardown()
    return 0


def _add_loop_flags(q, preset: str | None, out: str | None) -> None:
    q.add_argument("--out", required=out is None, default=out, help="run folder (resumed if it exists)")
    q.add_argument("--config", default=None, help="TOML file of loop settings ([sft] and [dpo] tables too)")
    q.add_argument("--preset", choices=["quick", "paper"], default=preset)
    q.add_argument("--iterations", type=int)
    q.add_argument("--prompts", type=int, help="new prompts per iteration")
    q.add_argument("--n", type=int, help="candidates per prompt")
    q.add_argument("--judge-samples", type=int, help="K judgments per candidate")
    q.add_argument("--judge-mode", choices=["sample", "expected"])
    q.add_argument("--eval-judge", help="fixed judge model for the head-to-head (default: M1)")
    q.add_argument("--prompt-writer", help="model that writes new prompts (default: M_t)")
    q.add_argument("--seed", type=int)
    q.add_argument("--nproc", type=int, default=1,
                   help="local processes, one SPMD job under torchrun: generation data-parallel (tensor-parallel "
                        "with --tp), training FSDP2")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each generation engine (divides "
                   "the number of processes)")


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

    q = sub.add_parser("demo", help="pull SmolLM2-135M-Instruct and run the quick self-rewarding loop on it")
    _add_loop_flags(q, preset="quick", out="runs/demo")
    q.set_defaults(fn=cmd_demo)
    q = sub.add_parser("loop", help="the self-rewarding loop: M1 = SFT, then T iterations of judge + DPO")
    q.add_argument("--model", required=True, help="M0: a Hugging Face Llama directory")
    _add_loop_flags(q, preset=None, out=None)
    q.set_defaults(fn=cmd_loop)
    q = sub.add_parser("judge-eval", help="a model's judge against human scores (EFT-eval), both modes")
    q.add_argument("--model", required=True)
    q.add_argument("--data", default=str(SEED_DIR / "eft_eval.jsonl"))
    q.add_argument("--lengthfree", default=str(SEED_DIR / "eft_eval_lengthfree.jsonl"),
                   help="a second set, where the longer answer is not the better one; skipped if absent")
    q.add_argument("--template", default=None, help="judge template file with {instruction} and {response}")
    q.add_argument("--judge-samples", type=int, default=3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="generation dtype (default: the loop's, auto: bf16 where the device computes it natively), "
                        "so the figures match the loop's eval/judge_m*.json")
    q.set_defaults(fn=cmd_judge_eval)
    q = sub.add_parser("data", help="convert public data sets")
    dsub = q.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("oasst", help="Open Assistant trees JSONL -> ift.jsonl + eft_eval.jsonl")
    q.add_argument("file")
    q.add_argument("--out", required=True)
    q.add_argument("--eval-share", type=float, default=0.15,
                   help="share of the trees that go to eft_eval.jsonl instead of ift.jsonl (each tree goes to one "
                        "file only): 0 for the train export, 1 for the validation export")
    q.set_defaults(fn=cmd_data_oasst)
    q = dsub.add_parser("eft-augment", help="graded EFT examples derived from IFT records (rules: srlm_engine/augment.py)")
    q.add_argument("file", help="IFT JSONL: the first user turn and the assistant reply after it")
    q.add_argument("--out", required=True, help="EFT JSONL to write")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--per-record", type=int, default=4, help="graded variants kept per IFT record")
    q.set_defaults(fn=cmd_data_eft_augment)

    q = sub.add_parser("sft", help="supervised fine-tuning on chat records (loss on assistant turns)")
    q.add_argument("--data", required=True, help='JSONL of {"messages": [{"role", "content"}, ...]} or TRL\'s '
                   '{"prompt", "completion"} (strings or message lists)')
    _add_train_flags(q)
    q.set_defaults(fn=cmd_sft)
    q = sub.add_parser("dpo", help="DPO on preference pairs; reference log-probs computed once first")
    q.add_argument("--pairs", required=True, help='JSONL of {"prompt", "chosen", "rejected"}: strings or TRL\'s '
                   'message lists (srlm_engine/data.py)')
    _add_train_flags(q)
    q.set_defaults(fn=cmd_dpo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build().parse_args(argv)
    args.argv = argv  # `--nproc N` runs this same command line under torchrun (launch.py)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError, OSError, TemplateError) as e:  # a template's raise_exception
        print(f"srlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
