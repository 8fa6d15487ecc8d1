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
# The environment is bench/gpu_check.sh's: the checkout runs from PYTHONPATH, and .gpu/smollm2/
# (SmolLM2-135M-Instruct's config and tokenizer files, carried by the caller) becomes a
# random-weight checkpoint of that shape for bench_generate. Each part runs under its own time
# limit and the script goes on after a failure or a timeout; it exits non-zero if any part failed.
# The limits add up to 460 s, inside the 8 minutes the script is given; they are estimates from
# the workloads' sizes (the 1B parts ~20-50 s each, throughput 8b ~60 s) and from gpu_check.sh's
# bench_generate (cut at 80 s there, done within 100). Where a throughput part runs out of time,
# `--requests 128` halves its workload (its row says so).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

export SRLM_CACHE=${SRLM_CACHE:-/tmp/srlm-cache}
model="$SRLM_CACHE/models/smollm2-135m-instruct"
weights_note=""
if [ ! -f "$model/model.safetensors" ] && [ -d .gpu/smollm2 ]; then
    weights_note="random weights, SmolLM2-135M shape"
    $py - "$model" <<'EOF' || exit 1
import json, shutil, sys
from pathlib import Path
from srlm_engine.config import ModelConfig
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import save_model
dest = Path(sys.argv[1])
dest.mkdir(parents=True, exist_ok=True)
for f in Path(".gpu/smollm2").iterdir():
    shutil.copy2(f, dest / f.name)
cfg = ModelConfig.from_hf(json.loads((dest / "config.json").read_text()))
save_model(Llama(cfg).init_weights(seed=0), dest)
print("wrote a random-weight SmolLM2-shaped checkpoint to", dest)
EOF
fi

status=0
start=$SECONDS
part() {  # part SECONDS NAME COMMAND...: run one part under a time limit, note a failure
    local limit=$1 name=$2; shift 2
    echo; echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    local log=/dev/null
    [ -n "${OUT:-}" ] && log="$OUT/$(echo "$name" | tr -c 'a-zA-Z0-9_\n' '_').log"  # the whole output, kept
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"; local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s ($((SECONDS - start))s in all) ==="
    [ $rc -eq 0 ] || status=1
    if [ -n "${OUT:-}" ]; then  # kept even if a later part hangs
        cp bench/RESULTS.md "$OUT/RESULTS.md"
        [ -d bench/profiles ] && mkdir -p "$OUT/profiles" && cp bench/profiles/*.txt "$OUT/profiles/" 2>/dev/null
    fi
    return 0
}
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
