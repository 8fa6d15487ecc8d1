"""M1's SFT step on the quick preset's records: padded micro-batches against share_prefix and trainable_layers.

    python bench/bench_sft_prefix.py [--steps 4] [--rounds 2] [--layers 8] [--model DIR] [--no-record]

M1's records as `srlm demo` builds them (LoopConfig "quick": the 416 EFT seed examples with the
score line as target and 46 IFT records), trained with the preset's SFT settings on
SmolLM2-135M-Instruct (pulled; or --model) for `--steps` optimizer steps per variant:
  padded:         right-padded micro-batches, every weight trained (the default);
  share_prefix:   each micro-batch packed into one row holding its shared prompt prefix (the chat
                  template and the judge rubric, 163 of an EFT example's ~263 tokens) once;
  trainable N:    only the top N blocks and the final norm trained: backward stops above the rest;
  both.
The preset's own cache_frozen only pays from the second epoch on, past these steps, so no
variant uses it. Every variant trains on the same global batches (the same seed). The variants run one after the
other in this process, `--rounds` times, so load from other jobs falls on all alike; the first
step of each run is left out (warm-up). Reports the median seconds per step and the speed-up over
padded. The loss of the padded and share_prefix runs must agree (the same model to rounding); the
script checks that.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, default=8, help="trainable_layers of the frozen variants")
    p.add_argument("--model", help="default: SmolLM2-135M-Instruct, pulled")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to RESULTS.md")
    args = p.parse_args()

    import torch

    from srlm_engine import loop
    from srlm_engine.config import LoopConfig
    from srlm_engine.device import auto_dtype
    from srlm_engine.model.pull import pull
    from srlm_engine.train.parallel import bf16_compute
    from srlm_engine.train.trainer import train_sft

    cfg = LoopConfig.build("quick")
    records = loop.m1_records(loop.Inputs.load(cfg), cfg)
    model = Path(args.model) if args.model else pull()
    variants = {"padded": {}, "share_prefix": {"share_prefix": True},
                f"trainable {args.layers}": {"trainable_layers": args.layers},
                f"share_prefix + trainable {args.layers}": {"share_prefix": True, "trainable_layers": args.layers}}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, over in variants.items():
                out = Path(tmp) / "run"
                shutil.rmtree(out, ignore_errors=True)
                base = replace(cfg.sft, share_prefix=False, trainable_layers=None, cache_frozen=False)  # padded
                train_sft(model, records, out, replace(base, max_steps=args.steps, progress=False,
                                                       save_every=10 ** 6, **over))
                rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                seconds[name] += [r["seconds"] for r in rows[1:]]
                losses[name] = [r["loss"] for r in rows]
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(losses["padded"], losses["share_prefix"])), losses
    base = statistics.median(seconds["padded"])
    precision = "bf16 autocast" if bf16_compute(cfg.sft, torch.device("cpu")) else "fp32"
    case = (f"M1 SFT step, SmolLM2-135M, quick preset ({len(records)} records, global batch "
            f"{cfg.sft.global_batch_size}, micro-batch {cfg.sft.micro_batch_size}), {precision}, "
            f"{args.steps - 1} steps x {args.rounds} rounds")
    result = "; ".join(f"{name} {statistics.median(s):.2f} s (x{base / statistics.median(s):.2f})"
                       for name, s in seconds.items())
    print(f"{case}: {result}")
    print(f"(auto dtype here: {auto_dtype('cpu')[1]})")
    if args.record:
        append_rows("bench_sft_prefix", device_name("cpu"), [(case, result)])


if __name__ == "__main__":
    main()
