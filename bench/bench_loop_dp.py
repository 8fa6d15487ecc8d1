"""The loop's generation phases in one process against N data-parallel processes, same machine.

    python bench/bench_loop_dp.py [--nproc 2] [--prompts 16] [--max-tokens 64] [--model DIR] [--no-record]

Runs `srlm loop` twice on SmolLM2-135M-Instruct (pulled; or --model), one iteration of a small
config, first with --nproc 1 (one process, all cores), then with --nproc N (N processes under
torchrun, the cores shared out: 1 thread each on a 2-core machine). Training is cut to one step
each, so what differs is generation: the judge evaluations of M0, M1 and M2 (eval/timings.json),
candidates, judgments and the head-to-head evaluation (iter_1/timings.json). Prints seconds per
phase and the ratio one / N processes, and appends one row per phase to RESULTS.md. No target: on
a CPU the ranks share the same cores, so this measures the cost of splitting the work, not a
speed-up; on a GPU node each rank has its own device.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows  # noqa: E402

from srlm_engine.config import SEED_DIR  # noqa: E402

PHASES = [("eval", "judge eval M0"), ("eval", "judge eval M1"), ("iter_1", "iter 1: candidates"),
          ("iter_1", "iter 1: judgments"), ("iter_1", "iter 1: evaluation"), ("eval", "judge eval M2")]


def config(path: Path, args) -> Path:
    seeds = path.parent / "seed"  # one copy of the seed data for both runs
    shutil.copytree(SEED_DIR, seeds)
    path.write_text(f"""seed_dir = "{seeds}"
iterations = 1
prompts = {args.prompts}
n = 4
judge_samples = 2
judge_mode = "expected"
max_new_tokens = {args.max_tokens}
judge_max_tokens = {args.max_tokens}
eval_prompts = {args.prompts}
eval_max_tokens = {args.max_tokens}
[sft]
max_steps = 1
micro_batch_size = 2
global_batch_size = 4
max_seq_len = 512
progress = false
[dpo]
max_steps = 1
micro_batch_size = 1
global_batch_size = 2
max_seq_len = 384
progress = false
""")
    return path


def run(model: str, cfg: Path, out: Path, nproc: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "srlm_engine.cli", "loop", "--model", model, "--out", str(out), "--config",
           str(cfg), "--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"srlm loop --nproc {nproc} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    t = {}
    for folder, stage in PHASES:
        t[stage] = json.loads((out / folder / "timings.json").read_text())[stage]
    return t, wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.model is None:
        from srlm_engine.model.pull import pull
        args.model = str(pull())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp) / "loop.toml", args)
        one, wall1 = run(args.model, cfg, Path(tmp) / "one", 1)
        many, wall_n = run(args.model, cfg, Path(tmp) / "many", args.nproc)
    print(f"{'phase':24s} {'1 process':>10s} {f'{args.nproc} processes':>12s} {'ratio':>7s}")
    rows = []
    for _, stage in PHASES:
        r = one[stage] / many[stage]
        print(f"{stage:24s} {one[stage]:9.1f}s {many[stage]:11.1f}s {r:6.2f}x")
        what = ("EFT-eval and length-free sets, both modes, K=2" if stage.startswith("judge eval")
                else f"{args.prompts} prompts x 4")
        rows.append((f"{stage} ({what}, {args.max_tokens} tok; SmolLM2-135M)",
                     f"1 process {one[stage]:.1f} s vs {args.nproc} processes {many[stage]:.1f} s = {r:.2f}x"))
    gen1, gen_n = sum(one.values()), sum(many.values())
    print(f"{'all generation':24s} {gen1:9.1f}s {gen_n:11.1f}s {gen1 / gen_n:6.2f}x   (whole runs: {wall1:.0f}s, "
          f"{wall_n:.0f}s)")
    rows.append((f"all generation phases of one iteration ({args.prompts} prompts; SmolLM2-135M)",
                 f"1 process {gen1:.1f} s vs {args.nproc} processes {gen_n:.1f} s = {gen1 / gen_n:.2f}x"))
    if not args.no_record:
        import torch
        from srlm_engine.device import describe
        append_rows("bench_loop_dp", f"CPU, {os.cpu_count()} cores shared by the processes, "
                    f"{describe('auto', 'cpu')} (torch {torch.__version__})", rows)


if __name__ == "__main__":
    main()
