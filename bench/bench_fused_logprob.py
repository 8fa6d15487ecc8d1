"""Fused linear log-prob vs log_softmax(h @ W.T).gather: forward + backward, time and peak memory.

    python bench/bench_fused_logprob.py [--shapes 4096x576x49152,...] [--dtype fp32] [--reps 3]
                                        [--rounds 1] [--impls naive,ours,liger,liger-mean]

Each (implementation, shape) runs in its own process so its peak memory is clean: peak RSS above
the inputs on CPU (Linux /proc high-water mark, reset after setup), torch.cuda.max_memory_allocated
above the inputs on CUDA. With --rounds R each implementation runs R such processes, in turn with
the others, so a burst of load on a shared machine slows every implementation alike; their times
are pooled. Every implementation does the same work: per-token log-probs of the
same hidden, weight and targets, summed, so backward gets an upstream gradient of 1 per token, as
DPO's is per token. Baselines: the naive PyTorch expression, and on CUDA, when `liger_kernel` is
importable, Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none") (0.8.5: per-token
CE = -log-prob; its backward folds the per-token gradient in and recomputes the logits chunks, as
ours does). `liger-mean` (not run by default) is its mean-CE path, which computes the gradients
inside forward since a mean's upstream gradient is known there: less work, but a path a per-token
loss such as DPO's cannot take.
Default shapes: SmolLM2-135M (N=4096, H=576, V=49152) and Llama-3's head (H=2048 for 1B/3B,
V=128256) at N=8192, on CPU too: one naive step there takes ~110 s of 2 cores and 12 GB above the
inputs (the whole run ~12 minutes); pass --shapes 4096x576x49152,512x2048x128256 for a quick look.
`pytest bench --benchmark-only` runs the small pytest-benchmark cases at the bottom.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_rows, device_name, measure, run_worker, stats, synced  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n, h, v, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, targets


def make_step(impl, hidden, weight, targets):
    """A closure doing one forward + backward (per-token log-probs summed, so g = 1 per token)."""
    if impl == "ours":
        from srlm_kernels import fused_linear_logprob

        def loss():
            return fused_linear_logprob(hidden, weight, targets).sum()
    elif impl == "naive":
        def loss():
            logits = (hidden @ weight.T).float()  # (N, V); fp32 softmax for bf16 too, as HF does
            return torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()
    elif impl in ("liger", "liger-mean"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none" if impl == "liger" else "mean")

        def loss():  # forward(lin_weight, _input, target) -> per-token CE [N] fp32, or its mean
            out = ce(weight, hidden, targets)
            return -out.sum() if impl == "liger" else out
    else:
        raise ValueError(impl)

    def step():
        hidden.grad = weight.grad = None
        loss().backward()
    return step


def worker(impl, n, h, v, dtype, reps):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = make_inputs(n, h, v, DTYPES[dtype], device)
    step = make_step(impl, hidden, weight, targets)
    # CPU only: the CUDA peak is the allocator's, which imports do not touch, and a tiny prime there
    # would compile the kernels a second time for its sizes
    prime = make_step(impl, *make_inputs(8, 16, 32, DTYPES[dtype], device)) if device == "cpu" else None
    times, peak = measure(step, device, reps, warmup=2 if device == "cuda" else 0, prime=prime)
    print(json.dumps({"times_ms": times, "peak_mb": peak, "device": device_name(device)}))


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x576x49152,8192x2048x128256")
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=DTYPES)
    p.add_argument("--reps", type=int, default=20 if cuda else 3)
    p.add_argument("--rounds", type=int, default=1, help="worker processes per impl, run in turn "
                   "(naive, ours, naive, ours, ...); their times pooled, the peak the largest")
    p.add_argument("--impls", default="naive,ours,liger", help="naive (the baseline, always run), ours, "
                   "liger, liger-mean (the Liger ones on CUDA, when liger_kernel is importable)")
    args = p.parse_args()
    unknown = set(args.impls.split(",")) - {"naive", "ours", "liger", "liger-mean"}
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}")
    impls = ["naive"] + [i for i in ("ours", "liger", "liger-mean") if i in args.impls.split(",")]
    if any(i.startswith("liger") for i in impls):
        try:
            if not cuda:
                raise ImportError("Liger's kernels need CUDA")
            import liger_kernel  # noqa: F401
        except ImportError as e:
            print(f"Liger baselines skipped: {e}")
            impls = [i for i in impls if not i.startswith("liger")]
    device = None
    print(f"{'shape N x H x V':>22} {'impl':>10} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MB':>9} "
          f"{'time/naive':>10} {'mem/naive':>9}")
    for shape in args.shapes.split(","):
        n, h, v = map(int, shape.split("x"))
        res = {}
        for _ in range(args.rounds):  # naive, ours, ..., naive, ours: drift hits every impl alike
            for i in impls:
                r = run_worker(__file__, [i, n, h, v, args.dtype, args.reps])
                prev = res.setdefault(i, {"times_ms": [], "peak_mb": 0.0, "failed": []})
                if "error" in r:
                    prev["failed"].append(r["error"])
                    continue
                prev["times_ms"] += r["times_ms"]
                prev["peak_mb"] = max(prev["peak_mb"], r["peak_mb"])
                prev["device"] = r["device"]
        for r in res.values():  # an impl with no round left failed; one with some says how many
            if not r["times_ms"]:
                r["error"] = r["failed"][0]
        base = res["naive"]
        elt = torch.finfo(DTYPES[args.dtype]).bits // 8
        floor = (n * h + v * h) * elt / 2 ** 20  # the gradients every implementation must hold
        parts = []
        for impl, r in res.items():
            if "error" in r:
                print(f"{shape:>22} {impl:>10} failed: {r['error']}")
                parts.append(f"{impl}: failed ({r['error'][0][:80]})")
                continue
            device = r["device"]
            med, p20, p80 = stats(r["times_ms"])
            tr = mr = float("nan")
            if "error" not in base:
                tr = med / stats(base["times_ms"])[0]
                mr = r["peak_mb"] / base["peak_mb"]
            print(f"{shape:>22} {impl:>10} {med:>10.1f} {p20:>9.1f} {p80:>9.1f} {r['peak_mb']:>9.0f} {tr:>10.2f} {mr:>9.1%}", flush=True)
            lost = f" ({len(r['failed'])} of {args.rounds} rounds failed: {r['failed'][0][0][:60]})" if r["failed"] else ""
            parts.append(f"{impl} {med:.0f} ms ({p20:.0f}-{p80:.0f}), {r['peak_mb']:.0f} MB"
                         + ("" if impl == "naive" else f", time x{tr:.2f}, memory {mr:.1%} of naive") + lost)
        print(f"{'':>22} gradient floor (dh + dW) {floor:.0f} MB")
        reps = f"{args.reps} reps" + (f" x {args.rounds} interleaved rounds" if args.rounds > 1 else "")
        upcast = "" if args.dtype == "fp32" else " (naive's softmax in fp32)"
        # recorded shape by shape: a run stopped at its time limit keeps the shapes it finished
        append_rows("fused_logprob", device or ("cuda" if cuda else "cpu"),
                    [(f"fwd+bwd N={n} H={h} V={v} {args.dtype}{upcast}, {reps}",
                      "; ".join(parts) + f"; grad floor {floor:.0f} MB")])


# ------------------------------------------------------------- pytest-benchmark (small shape)

def _bench_case(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = make_inputs(512, 576, 16384, torch.float32, device)
    benchmark.pedantic(synced(make_step(impl, hidden, weight, targets), device), rounds=5, warmup_rounds=1)
    got = weight.grad.clone()
    make_step("naive", hidden, weight, targets)()
    torch.testing.assert_close(got, weight.grad, atol=1e-5, rtol=1e-4)  # what was timed is right


def test_fused_logprob_ours(benchmark):
    _bench_case(benchmark, "ours")


def test_fused_logprob_naive(benchmark):
    _bench_case(benchmark, "naive")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, n, h, v, dtype, reps = sys.argv[2:8]
        worker(impl, int(n), int(h), int(v), dtype, int(reps))
    else:
        main()
