"""DPO loss kernel vs the torch formula (the reference): forward + backward, time and peak memory.

    python bench/bench_dpo_loss.py [--batches 64,65536] [--loss-type sigmoid] [--reps 50]

On CUDA "ours" is the Triton forward and backward kernels; on CPU it is the closed-form torch
path that backend='auto' picks there. Each case runs in its own process (clean peak memory); one
timed sample is the mean of `inner` calls, since one call takes microseconds.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name, measure, run_worker, stats, synced  # noqa: E402


def make_inputs(b, device):
    g = torch.Generator(device=device).manual_seed(0)
    ref = -100 + 20 * torch.rand(2, b, generator=g, device=device)
    pol = (ref + torch.randn(2, b, generator=g, device=device)).requires_grad_()
    return pol, ref


def make_step(impl, pol, ref, loss_type):
    if impl == "ours":
        from srlm_kernels import dpo_loss as fn
    else:
        from srlm_kernels.reference.dpo_loss import dpo_loss_ref as fn
    ls = 0.1 if loss_type in ("sigmoid", "robust") else 0.0

    def step():
        pol.grad = None
        losses, _, _ = fn(pol[0], pol[1], ref[0], ref[1], beta=0.1, loss_type=loss_type, label_smoothing=ls)
        losses.mean().backward()
    return step


def worker(impl, b, loss_type, reps, inner):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pol, ref = make_inputs(b, device)
    step = make_step(impl, pol, ref, loss_type)
    # a first call's one-time work kept out of the peak, on CPU only (see bench_fused_logprob.py)
    prime = make_step(impl, *make_inputs(4, device), loss_type) if device == "cpu" else None
    times, peak = measure(step, device, reps, inner=inner, warmup=inner, prime=prime)
    print(json.dumps({"times_ms": times, "peak_mb": peak, "device": device_name(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="64,65536")
    p.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "robust", "hinge", "ipo"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--inner", type=int, default=20)
    args = p.parse_args()
    rows, device = [], "cpu"
    print(f"{'B':>8} {'impl':>10} {'median ms':>10} {'p20':>8} {'p80':>8} {'peak MB':>8} {'time/torch':>10}")
    for b in map(int, args.batches.split(",")):
        res = {i: run_worker(__file__, [i, b, args.loss_type, args.reps, args.inner]) for i in ("torch", "ours")}
        if any("error" in r for r in res.values()):
            raise SystemExit(f"a worker failed: {res}")
        base = stats(res["torch"]["times_ms"])[0]
        parts = []
        for impl, r in res.items():
            device = r["device"]
            med, p20, p80 = stats(r["times_ms"])
            print(f"{b:>8} {impl:>10} {med:>10.4f} {p20:>8.4f} {p80:>8.4f} {r['peak_mb']:>8.1f} {med / base:>10.2f}", flush=True)
            parts.append(f"{impl} {med:.4f} ms ({p20:.4f}-{p80:.4f}), {r['peak_mb']:.1f} MB"
                         + ("" if impl == "torch" else f", time x{med / base:.2f}"))
        rows.append((f"fwd+bwd B={b} {args.loss_type}, {args.reps}x{args.inner} calls", "; ".join(parts)))
    append_rows("dpo_loss", device, rows)


# ------------------------------------------------------------- pytest-benchmark

def _bench_case(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pol, ref = make_inputs(4096, device)
    benchmark.pedantic(synced(make_step(impl, pol, ref, "sigmoid"), device), rounds=20, warmup_rounds=2)
    got = pol.grad.clone()
    make_step("torch", pol, ref, "sigmoid")()
    torch.testing.assert_close(got, pol.grad)  # what was timed is right


def test_dpo_loss_ours(benchmark):
    _bench_case(benchmark, "ours")


def test_dpo_loss_torch(benchmark):
    _bench_case(benchmark, "torch")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, b, loss_type, reps, inner = sys.argv[2:7]
        worker(impl, int(b), loss_type, int(reps), int(inner))
    else:
        main()
