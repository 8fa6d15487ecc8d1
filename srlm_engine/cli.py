"""`srlm` subcommands. Each command is a `cmd_*` function and one `add_parser` block in `build()`;
this file parses arguments and calls into the parts that own the work, nothing more.

Flags that set a TrainConfig or LoopConfig field are made from the field (flags.py): its name,
type, help and choices. Only argparse, the standard library and config.py load before a command
runs, so `srlm --help` answers without importing torch.

Exit status: 0 done; 1 the work failed (bad input data, a missing model, a stopped loop: one line
on stderr, a traceback with SRLM_DEBUG=1); 2 the command line is wrong (a flag, or a setting in
--config); 130 interrupted (Ctrl-C), where a rerun of a run-folder command resumes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

from srlm_engine.config import (GENERATION_DTYPES, SEED_DIR, ConfigError, LoopConfig, TrainConfig, read_toml,
                                to_toml)
from srlm_engine.flags import add_setting_flags, setting_help, settings_of
from srlm_engine.launch import in_torchrun, torchrun

RESUMABLE = ("demo", "loop", "sft", "dpo")  # a rerun of the same command goes on from its output folder


class UsageError(Exception):
    """The command line is wrong: a missing argument, a bad flag value, a bad setting in --config."""


@contextmanager
def _usage():
    """A ConfigError raised inside is a usage error (exit status 2): settings come from the command line."""
    try:
        yield
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _require(args, *names: str) -> None:
    """argparse's own check, after --print-config (which needs none of them) had its turn."""
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is None]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def _launch(nproc: int, argv: list[str]) -> int:
    """This command in `nproc` processes under torchrun (launch.py). Ctrl-C stops them all there
    and reaches this process as torchrun's SignalException: here it is an interrupt like any other."""
    import signal
    from torch.distributed.elastic.multiprocessing.api import SignalException
    try:
        return torchrun(nproc, argv)
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise


# ------------------------------------------------------------------- models: pull, info, generate, chat
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


def _sampling(args, n: int = 1):
    from srlm_engine.engine import SamplingParams
    try:
        return SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    except ValueError as e:  # the values came from flags
        raise UsageError(str(e)) from None


def _open_llm(args):
    from srlm_engine.device import default_device, describe, resolve_dtype
    from srlm_engine.engine import LLM
    device = default_device()
    print(f"{args.model}: generation on {device} in {describe(args.dtype, device)}", file=sys.stderr)
    return LLM(args.model, dtype=resolve_dtype(args.dtype, device), device=str(device))


def cmd_generate(args) -> int:
    params = _sampling(args, args.n)  # a bad value fails before the model loads
    outs = _open_llm(args).generate(args.prompt, params, use_tqdm=False)
    for i, r in enumerate(outs):
        for c in r.outputs:
            if len(outs) * args.n > 1:
                print(f"--- prompt {i + 1}, completion {c.index + 1} ---")
            print(c.text)
    return 0


def cmd_chat(args) -> int:
    """One conversation over the model's chat template: each stdin line is a user turn, each reply
    is printed; /reset starts over, /exit or end of input ends it."""
    params = _sampling(args)
    llm = _open_llm(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    tty = sys.stdin.isatty()
    if tty:
        print("/reset starts a new conversation; /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = llm.chat([messages], params, use_tqdm=False)[0].outputs[0].text
        except ValueError as e:  # the conversation outgrew the model's context
            messages.pop()
            print(f"srlm chat: {e}; /reset starts a new conversation", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0


# ------------------------------------------------------------------- the loop
def _loop_config(args) -> LoopConfig:
    """--preset < --config < flags; checked against the number of processes before any starts."""
    with _usage():
        over = settings_of(args, LoopConfig)
        for stage in ("sft", "dpo"):
            table = settings_of(args, TrainConfig, prefix=stage)
            if table:
                over[stage] = table
        cfg = LoopConfig.build(args.preset, read_toml(args.config) if args.config else None, args.config, **over)
        nproc = args.nproc or 1
        for tcfg in (cfg.sft, cfg.dpo):  # a batch that nproc does not divide: refused at the start, not hours into the run
            tcfg.accum_steps(int(os.environ.get("WORLD_SIZE", nproc)))
        if nproc > 1 and not in_torchrun() and nproc % args.tp:
            raise ConfigError(f"--tp {args.tp} must divide --nproc {nproc}")
    return cfg


def cmd_demo(args) -> int:
    """The main job on the embedded model: pull SmolLM2, run the `quick` self-rewarding loop."""
    cfg = _loop_config(args)
    if not args.print_config:
        from srlm_engine.model.pull import pull
        args.model = str(pull())
    return _run_loop(args, cfg)


def cmd_loop(args) -> int:
    return _run_loop(args, _loop_config(args))


def _run_loop(args, cfg: LoopConfig) -> int:
    from pathlib import Path
    if args.print_config:
        return _print_config(cfg)
    _require(args, "model", "out")
    if (args.nproc or 1) > 1 and not in_torchrun():
        return _launch(args.nproc, args.argv)
    from srlm_engine import loop
    from srlm_engine.report import summary_table
    from srlm_engine.train.parallel import teardown
    t0 = time.perf_counter()
    try:
        final = loop.run(args.model, args.out, cfg, tp=args.tp)
    except loop.LoopStop as e:
        print(f"srlm {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        teardown()
    if int(os.environ.get("RANK", "0")):
        return 0  # rank 0 prints the summary
    print("\n" + summary_table(Path(args.out)))
    print(f"final model: {final}\nreport: {Path(args.out) / 'report.md'}  ({time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_report(args) -> int:
    from srlm_engine.report import rebuild_report
    print(rebuild_report(args.run))
    return 0


def cmd_judge_eval(args) -> int:
    from srlm_engine import data, judge
    from srlm_engine.device import default_device, describe
    from srlm_engine.evaluate import JudgeMetrics, format_table, judge_eval, length_rule
    from srlm_engine.runtime import open_engine
    with _usage():
        cfg = LoopConfig.build(None, None, judge_samples=args.judge_samples, seed=args.seed, dtype=args.dtype,
                               judge_max_tokens=args.judge_max_tokens)
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
def _train_config(args) -> TrainConfig:
    """--config < flags. The file's settings are all in a [train] table or all at its top level."""
    d = {}
    if args.config:
        d = read_toml(args.config)
        if "train" in d:
            if not isinstance(d["train"], dict):
                raise ConfigError(f"{args.config}: train must be a table of training settings")
            if len(d) > 1:
                raise ConfigError(f"{args.config}: put every training setting in the [train] table or none: "
                                  f"found [train] beside {sorted(k for k in d if k != 'train')}")
            d = d["train"]
    d = TrainConfig.layer(d, settings_of(args, TrainConfig))
    return TrainConfig.from_dict(d, source=args.config or "flags")


def _load_records(path, kind: str) -> list:
    from srlm_engine import data
    from srlm_engine.io import DataError
    recs = data.load_sft(path) if kind == "sft" else data.load_pairs(path)
    if not recs:
        raise DataError(f"{path}: no records (the file is empty)")
    return recs


def _print_config(cfg) -> int:
    print(to_toml(cfg), end="")
    return 0


def cmd_sft(args) -> int:
    with _usage():
        cfg = _train_config(args)  # a bad setting fails here, before any process starts
    if args.print_config:
        return _print_config(cfg)
    _require(args, "model", "data", "out")
    if args.nproc and args.nproc > 1 and not in_torchrun():
        return _launch(args.nproc, args.argv)
    from srlm_engine.train.parallel import teardown
    from srlm_engine.train.trainer import train_sft
    try:
        print(train_sft(args.model, _load_records(args.data, "sft"), args.out, cfg))
    finally:
        teardown()
    return 0


def cmd_dpo(args) -> int:
    with _usage():
        cfg = _train_config(args)
    if args.print_config:
        return _print_config(cfg)
    _require(args, "model", "pairs", "out")
    if args.nproc and args.nproc > 1 and not in_torchrun():
        return _launch(args.nproc, args.argv)
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


# ------------------------------------------------------------------- the parser
PRINT_CONFIG = "print the resolved settings as TOML (a file --config reads) and exit"


def _add_train_flags(q, stage: str) -> None:
    q.add_argument("--model", help="input model directory (Hugging Face layout); required")
    q.add_argument("--out", help="output directory: checkpoints/, metrics.jsonl, model/; required; a rerun resumes")
    q.add_argument("--nproc", type=int, default=None,
                   help="start N local processes through torch.distributed.run (FSDP2)")
    q.add_argument("--config", default=None, help="TOML file of training settings (at its top level or in a "
                   "[train] table); flags override it")
    q.add_argument("--print-config", action="store_true", help=PRINT_CONFIG)
    add_setting_flags(q.add_argument_group("training settings"), TrainConfig, stage=stage)


def _add_loop_flags(q, preset: str | None, out: str | None) -> None:
    q.add_argument("--out", default=out, help=f"run folder (resumed if it exists){'; required' if out is None else ''}")
    q.add_argument("--preset", choices=LoopConfig.PRESETS, default=preset,
                   help="shipped settings: srlm_engine/configs/<preset>.toml")
    q.add_argument("--config", default=None, help="TOML file of loop settings, with [sft] and [dpo] tables, or the "
                   f"name of a shipped one ({', '.join(LoopConfig.PRESETS)}); over --preset, under flags")
    q.add_argument("--print-config", action="store_true", help=PRINT_CONFIG)
    q.add_argument("--nproc", type=int, default=1,
                   help="local processes, one SPMD job under torchrun: generation data-parallel (tensor-parallel "
                        "with --tp), training FSDP2")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel size of each generation engine (divides "
                   "the number of processes)")
    add_setting_flags(q.add_argument_group("loop settings", "Flags override --config, which overrides --preset; "
                                           "the defaults shown are those of neither. --print-config prints what a "
                                           "run would use."), LoopConfig)
    add_setting_flags(q.add_argument_group("SFT of M0 into M1 ([sft] table)"), TrainConfig, stage="sft", prefix="sft")
    add_setting_flags(q.add_argument_group("DPO of each iteration ([dpo] table)"), TrainConfig, stage="dpo",
                      prefix="dpo")


def _add_sampling_flags(q) -> None:
    q.add_argument("model", help="model directory (Hugging Face Llama layout)")
    q.add_argument("--temperature", type=float, default=LoopConfig.temperature,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    q.add_argument("--top-p", type=float, default=LoopConfig.top_p, help="nucleus sampling (default: %(default)s)")
    q.add_argument("--max-tokens", type=int, default=LoopConfig.max_new_tokens,
                   help="tokens per completion at most (default: %(default)s)")
    q.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: the engine's, 0)")
    q.add_argument("--dtype", **setting_help(LoopConfig, "dtype"), choices=GENERATION_DTYPES, default="auto")


def version() -> str:
    """The installed distribution's version, or the source tree's pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("srlm-engine")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path
        try:
            with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
                return tomllib.load(fh)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srlm", description="Self-Rewarding Language Models engine")
    p.add_argument("--version", action="version", version=f"srlm {version()}")
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

    q = sub.add_parser("generate", help="complete text prompts (no chat template) and print each completion")
    _add_sampling_flags(q)
    q.add_argument("--prompt", action="append", required=True, help="a prompt; repeat the flag for several")
    q.add_argument("--n", type=int, default=1, help="completions per prompt (default: %(default)s)")
    q.set_defaults(fn=cmd_generate)
    q = sub.add_parser("chat", help="talk to a model through its chat template: one user turn per input line",
                       description="Each input line is a user turn; /reset starts a new conversation, /exit or "
                                   "end of input ends it.")
    _add_sampling_flags(q)
    q.add_argument("--system", default=None, help="a system message that opens the conversation")
    q.set_defaults(fn=cmd_chat)

    q = sub.add_parser("demo", help="pull SmolLM2-135M-Instruct and run the quick self-rewarding loop on it")
    _add_loop_flags(q, preset="quick", out="runs/demo")
    q.set_defaults(fn=cmd_demo)
    q = sub.add_parser("loop", help="the self-rewarding loop: M1 = SFT, then T iterations of judge + DPO")
    q.add_argument("--model", help="M0: a Hugging Face Llama directory; required")
    _add_loop_flags(q, preset=None, out=None)
    q.set_defaults(fn=cmd_loop)
    q = sub.add_parser("report", help="rebuild RUN/report.md and RUN/plots/ from the files in a run folder")
    q.add_argument("run", help="the run folder (--out of srlm loop)")
    q.set_defaults(fn=cmd_report)
    q = sub.add_parser("judge-eval", help="a model's judge against human scores (EFT-eval), both modes")
    q.add_argument("--model", required=True)
    q.add_argument("--data", default=str(SEED_DIR / "eft_eval.jsonl"))
    q.add_argument("--lengthfree", default=str(SEED_DIR / "eft_eval_lengthfree.jsonl"),
                   help="a second set, where the longer answer is not the better one; skipped if absent")
    q.add_argument("--template", default=None, help="judge template file with {instruction} and {response}")
    q.add_argument("--judge-samples", type=int, default=3, help="judgments per response in sample mode")
    q.add_argument("--judge-max-tokens", type=int, default=None, metavar="N",
                   **setting_help(LoopConfig, "judge_max_tokens"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", **setting_help(LoopConfig, "dtype"), choices=GENERATION_DTYPES, default=None)
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
    q.add_argument("--data", help='JSONL of {"messages": [{"role", "content"}, ...]} or TRL\'s '
                   '{"prompt", "completion"} (strings or message lists); required')
    _add_train_flags(q, "sft")
    q.set_defaults(fn=cmd_sft)
    q = sub.add_parser("dpo", help="DPO on preference pairs; reference log-probs computed once first")
    q.add_argument("--pairs", help='JSONL of {"prompt", "chosen", "rejected"}: strings or TRL\'s '
                   'message lists (srlm_engine/data.py); required')
    _add_train_flags(q, "dpo")
    q.set_defaults(fn=cmd_dpo)
    return p


def _explained(e: Exception) -> bool:
    """An error its message explains (bad input data, a missing file, a chat template's
    raise_exception): one line, no traceback. Others are bugs and keep theirs."""
    from jinja2.exceptions import TemplateError
    return isinstance(e, (ValueError, RuntimeError, OSError, TemplateError))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build().parse_args(argv)  # a usage error exits 2 here; --help and --version exit 0
    args.argv = argv  # `--nproc N` runs this same command line under torchrun (launch.py)
    name = f"srlm {args.command}"
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if not int(os.environ.get("RANK", "0")):  # one line for the job, not one per process
            hint = "; rerun the same command to resume" if args.command in RESUMABLE else ""
            print(f"\n{name}: interrupted{hint}", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _explained(e) or os.environ.get("SRLM_DEBUG", "0") != "0":
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
