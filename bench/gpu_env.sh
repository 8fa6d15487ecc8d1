# Sourced by bench/gpu_check.sh and bench/gpu_scale.sh, run from the repository root on a lent GPU
# machine (its own torch and triton, no package index, no model hub): the environment, the
# SmolLM2-shaped checkpoint, and `part`, which runs one part of a script under its own time limit.
#
# Nothing is installed: the checkout runs from PYTHONPATH (the root for srlm_engine, kernels/ for
# srlm_kernels); the C++ extension is not built (its ops are CPU-only). Optional inputs, present
# only when the caller carried them:
#   .whl/*.whl      wheels to install into /tmp/site (Liger-Kernel, the fused-CE baseline);
#   .gpu/smollm2/   SmolLM2-135M-Instruct's config and tokenizer files. The real weights cannot
#                   travel (no hub there), so a checkpoint of that exact shape with random weights
#                   is written where `pull()` looks (SRLM_CACHE): throughput figures hold for the
#                   shape; greedy-vs-transformers token equality is tested on tiny models instead.
# Prepare them here: `mkdir -p .gpu/smollm2 && cp ~/.cache/srlm/models/smollm2-135m-instruct/*.json
# .gpu/smollm2/` and `pip download --no-deps liger-kernel -d .whl` (both folders git-ignored).
# OUT=dir keeps RESULTS.md, bench/profiles/ and each part's log there.
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
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
part() {  # part SECONDS NAME COMMAND...: run one part under a time limit, note a failure, go on
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
        if compgen -G "bench/profiles/*.txt" >/dev/null; then
            mkdir -p "$OUT/profiles" && cp bench/profiles/*.txt "$OUT/profiles/"
        fi
    fi
    return 0
}
