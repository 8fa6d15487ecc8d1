#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200 with its own torch and triton, no package index, no
# model hub): the gpu-marked tests, then the benches' CUDA cases, which append to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh   (from the repository root; OUT=dir keeps RESULTS.md and each part's log there)
#
# The environment, the optional inputs (.whl/, .gpu/smollm2/) and `part` are bench/gpu_env.sh's.
# Each part has its own time limit and the script goes on after a failure; it exits non-zero if
# any part failed. Not covered: multi-GPU FSDP.
# Part times on an H100 80GB HBM3 (torch 2.11, triton 3.6; 449 s in all; bench/RESULTS.md, gpu_check.sh):
# gpu tests 92 s, tune 31, bench_train 41, paged attention 16, bench_train bf16 35, loop 26. Limits
# of 70, 40 and 80 s cut bench_fused_logprob (its big shape takes ~52 s alone), bench_dpo_loss (each
# case starts two worker processes of ~10 s) and bench_generate. The limits below are set from
# these times.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
# The tests first, then the fused log-prob against Liger and its launch sweep, whose figures set
# the kernel's tiles: a call stopped at its time limit loses only the later parts.
part 130 "gpu tests" $py -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/engine/test_engine_gpu.py tests/train/test_train_gpu.py
part 110 "bench_fused_logprob (cuda)" $py bench/bench_fused_logprob.py --reps 10
part 60 "tune_fused_logprob (cuda)" $py bench/tune_fused_logprob.py
part 60 "bench_dpo_loss (cuda)" $py bench/bench_dpo_loss.py
part 100 "bench_generate (cuda)" $py bench/bench_generate.py --device cuda --hf-batch 128 --max-num-seqs 128 \
    --weights-note "$weights_note"
part 60 "bench_train (cuda)" $py bench/bench_train.py
part 25 "bench_paged_attention (cuda)" $py bench/bench_paged_attention.py --device cuda --dtype bfloat16
part 45 "bench_train (cuda, bf16)" $py bench/bench_train.py --dtype bf16
# Last, as the newest: the limits add up to 630 s, past one 600 s call, so a run where every part
# takes its whole limit loses this one first.
part 40 "loop on the gpu" $py -m pytest -q -m gpu -p no:cacheprovider tests/test_loop.py
exit $status
