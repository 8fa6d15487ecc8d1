"""FSDP2's gradient reduce-scatter on the CPU: gloo's own against the rank-order sum the trainer uses.

    python bench/bench_reduce_scatter.py [--nproc 2] [--reps 10] [--no-record]

Starts itself under torchrun (`--nproc` gloo processes on this machine, 1 thread each) and
reduce-scatters float32 buffers of the sizes FSDP2 reduces for SmolLM2-135M: one transformer
block's gradients (3,540,096 floats) and the root's (the tied embedding and the final norm,
28,312,128 floats), each padded to a multiple of the world size as FSDP2 pads it. Per size it
alternates `dist.reduce_scatter_single` (gloo's order; ReduceOp.AVG, as FSDP2 calls it) with
train/parallel.OrderedReduceScatter (all_to_all_single, then the parts added in rank order), so
load from other jobs falls on both alike, and reports medians (p20-p80) and the ratio. It also
checks that both give the same values to float rounding. One training step of SmolLM2-135M
reduces 30 blocks and the root once per micro-batch.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, stats  # noqa: E402

SIZES = [("one block", 3_540_096), ("root (embedding + norm)", 28_312_128)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from srlm_engine.train.parallel import OrderedReduceScatter
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, w = dist.get_rank(), dist.get_world_size()
    group, ordered = dist.group.WORLD, OrderedReduceScatter()
    native = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the name FSDP2 calls
    rows = []
    for name, numel in SIZES:
        numel = -(-numel // w) * w
        inp = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        out_gloo, out_ordered = torch.empty(numel // w), torch.empty(numel // w)
        times = {"gloo": [], "ordered": []}
        for rep in range(args.reps + 1):  # the first round warms up
            for impl in ("gloo", "ordered") if rep % 2 == 0 else ("ordered", "gloo"):
                dist.barrier()
                t0 = time.perf_counter()
                if impl == "gloo":
                    native(out_gloo, inp, op=dist.ReduceOp.AVG, group=group)
                else:
                    ordered(out_ordered, inp, group, dist.ReduceOp.AVG)
                if rep:
                    times[impl].append((time.perf_counter() - t0) * 1e3)
        assert torch.allclose(out_gloo, out_ordered, rtol=1e-5, atol=1e-6), name
        g, o = stats(times["gloo"]), stats(times["ordered"])
        rows.append((f"{name}: {numel:,} fp32, {w} ranks, {args.reps} interleaved reps",
                     f"gloo {g[0]:.1f} ms ({g[1]:.1f}-{g[2]:.1f}); rank order {o[0]:.1f} ms ({o[1]:.1f}-{o[2]:.1f}), "
                     f"x{o[0] / g[0]:.2f} gloo's time"))
    if rank == 0:
        for case, result in rows:
            print(f"{case}: {result}", flush=True)
        if args.record:
            import torch
            append_rows("bench_reduce_scatter", f"CPU, gloo, 1 thread per rank (torch {torch.__version__})", rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args([a for a in sys.argv[1:] if a != "--"])
    if args.worker:
        return worker(args)
    # the worker's settings travel as its own arguments after "--": torchrun would read --nproc as its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "--", "--worker", f"--reps={args.reps}"] + ([] if args.record else ["--no-record"])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

if __name__ == "__main__":
    main()
