"""`srlm ... --nproc N`: the same command in N local processes under torchrun.

    srlm loop --model M --out RUN --nproc 4
is
    torchrun --nproc-per-node 4 --master-addr 127.0.0.1 --master-port P \\
        -m srlm_engine.cli loop --model M --out RUN --nproc 4
with a free local port P. Inside, torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) marks
each process as a rank of one job: the command runs there instead of launching again. Across
nodes, start torchrun yourself with its rendezvous flags (README); `--nproc` is then left out.
The sft, dpo and loop commands all launch through here.
"""
from __future__ import annotations

import os
import socket
import sys


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run `srlm <argv>` in `nproc` local processes; -> 0, or 1 when a rank failed or was killed
    (torchrun then stops the others and names the failed rank)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = get_args_parser().parse_args(["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                                         "--master-port", str(port), "-m", "srlm_engine.cli"])
    # set, not parsed: torchrun's parser would take a flag of ours such as --n for an abbreviation
    # of its own (--nnodes, --nproc-per-node) and stop
    args.training_script_args = list(argv)
    try:
        run(args)
    except ChildFailedError as e:
        print(f"srlm: {e}", file=sys.stderr)
        return 1
    return 0
