#!/usr/bin/env bash
# GPU speed at the sizes users run, on one lent H100 or H200 (its own torch and triton, no package
# index, no model hub): bench/bench_scale.py's parts at the Llama-3.2-1B and Llama-3.1-8B shapes
# (random weights made on the GPU), the SmolLM2-shaped engine-vs-transformers workload
# (bench/bench_generate.py), and the engine's determinism at the 1B shape. Each part appends its
# row to bench/RESULTS.md; a part that misses its goal writes a profile summary to bench/profiles/.
#
#   bash bench/gpu_scale.sh   (from the repository root; OUT=dir keeps RESULTS.md, profiles/ and
#                              each part's log there)
#
# The environment is bench/gpu_env.sh's: the checkout runs from PYTHONPATH, and .gpu/smollm2/
# (SmolLM2-135M-Instruct's config and tokenizer files, carried by the caller) becomes a
# random-weight checkpoint of that shape for bench_generate. Each part runs under its own time
# limit and the script goes on after a failure or a timeout; it exits non-zero if any part failed.
# The limits add up to 460 s, inside the 8 minutes the script is given; they are estimates from
# the workloads' sizes (the 1B parts ~20-50 s each, throughput 8b ~60 s) and from gpu_check.sh's
# bench_generate (cut at 80 s there, done within 100). Where a throughput part runs out of time,
# `--requests 128` halves its workload (its row says so).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
scale="$py bench/bench_scale.py --device cuda"
part 80 "throughput 1b" $scale --shape 1b --part throughput
part 30 "decode 1b" $scale --shape 1b --part decode
part 70 "dpo 1b" $scale --shape 1b --part dpo
part 115 "throughput 8b" $scale --shape 8b --part throughput
part 40 "decode 8b" $scale --shape 8b --part decode
part 95 "bench_generate (cuda)" $py bench/bench_generate.py --device cuda --hf-batch 128 --max-num-seqs 128 \
    --weights-note "$weights_note"
part 30 "determinism 1b" $scale --shape 1b --part determinism
echo; echo "gpu_scale.sh: $((SECONDS - start))s in all, exit $status"
exit $status
