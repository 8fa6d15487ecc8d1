#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200 with its own torch and triton, no package index, no
# model hub): the gpu-marked tests, then the benches' CUDA cases, which append to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh   (from the repository root; OUT=dir keeps RESULTS.md and each part's log there)
#
# Nothing is installed: the checkout runs from PYTHONPATH (the root for srlm_engine, kernels/ for
# srlm_kernels); the C++ extension is not built (its ops are CPU-only). Optional
# inputs, present only when the caller carried them:
#   .whl/*.whl      wheels to install into /tmp/site (Liger-Kernel, the fused-CE baseline);
#   .gpu/smollm2/   SmolLM2-135M-Instruct's config and tokenizer files. The real weights cannot
#                   travel (no hub there), so a checkpoint of that exact shape with random weights
#                   is written where `pull()` looks (SRLM_CACHE): throughput figures hold for the
#                   shape; greedy-vs-transformers token equality is tested on tiny models instead.
# Prepare them here: `mkdir -p .gpu/smollm2 && cp ~/.cache/srlm/models/smollm2-135m-instruct/*.json
# .gpu/smollm2/` and `pip download --no-deps liger-kernel -d .whl` (both folders git-ignored).
# Each part has its own time limit and the script goes on after a failure; it exits non-zero if
# any part failed. Not covered: multi-GPU FSDP.
# Part times on an H100 80GB HBM3 (torch 2.11, triton 3.6; 449 s in all; bench/RESULTS.md, gpu_check.sh):
# gpu tests 92 s, tune 31, bench_train 41, paged attention 16, bench_train bf16 35, loop 26. Limits
# of 70, 40 and 80 s cut bench_fused_logprob (its big shape takes ~52 s alone), bench_dpo_loss (each
# case starts two worker processes of ~10 s) and bench_generate. The limits below are set from
# these times.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

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
part() {  # part SECONDS NAME COMMAND...: run one part under a time limit, note a failure
    local limit=$1 name=$2; shift 2
    echo; echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    local log=/dev/null
    [ -n "${OUT:-}" ] && log="$OUT/$(echo "$name" | tr -c 'a-zA-Z0-9_\n' '_').log"  # the whole output, kept
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"; local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
    [ $rc -eq 0 ] || status=1
    if [ -n "${OUT:-}" ]; then cp bench/RESULTS.md "$OUT/RESULTS.md"; fi  # kept even if a later part hangs
}
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
