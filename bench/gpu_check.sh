#!/usr/bin/env bash
# One script for a lent GPU machine (H100/H200, its own torch and triton): the gpu-marked tests and
# the kernel benches, which time their CUDA cases there and append to bench/RESULTS.md.
# Run from the repository root: `bash bench/gpu_check.sh`. Not yet run on a GPU (no device was lent
# to the session that wrote it). Still missing: gpu tests of the engine's flash-attn and Triton
# backends, and a CUDA case in bench_generate.py (CPU-only so far).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PWD}"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# The package from this checkout, built against the machine's own torch (no registry there).
$py -m pip install --no-build-isolation --no-deps -e . >/dev/null 2>&1 || $py setup.py build_ext --inplace
status=0
$py -m pytest -q -m gpu tests || status=1
$py bench/bench_fused_logprob.py --reps 5 || status=1
$py bench/bench_dpo_loss.py || status=1
exit $status
