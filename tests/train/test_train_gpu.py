"""Training on a CUDA device: the same `srlm sft|dpo --nproc 1` runs as on CPU end within rounding of
them, and bf16 trains. Marked gpu; skipped where CUDA is absent.

The runs (tiny random Llama with the real SmolLM2 vocabulary, trainkit.py; 4 AdamW steps at lr 1e-3)
start at once in separate processes, so the module costs about one run's wall time: the CPU runs
are forced to CPU with CUDA_VISIBLE_DEVICES="" (the trainer picks cuda whenever torch sees a GPU,
train/parallel.py), and each CUDA run compiles the Triton kernels into its own fresh
TRITON_CACHE_DIR, which shows that its fused log-prob and DPO loss really took the Triton path.
(Not named test_gpu.py: tests/kernels has one, and pytest cannot collect two test modules of one
basename from directories without __init__.py.)

One GPU cannot host the 2 NCCL processes that `--mixed-precision` needs (FSDP2; one process runs
unsharded and says so), so FSDP2's bf16 MixedPrecisionPolicy is run here through
train/parallel.py's parallelize() over a process group of one (worker at the bottom); the CLI
test of it needs 2 GPUs.
"""
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from srlm_engine.model.weights import load_model
from trainkit import DATA, ROOT, read_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

COMMON = ["--max-seq-len", 64, "--micro-batch-size", 2, "--grad-accum", 2, "--lr", 1e-3, "--max-steps", 4,
          "--no-progress", "--save-every", 100, "--warmup-steps", 1, "--schedule", "cosine"]
DATA_FLAGS = {"sft": ["--data", DATA / "sft_train.jsonl"], "dpo": ["--pairs", DATA / "pairs.jsonl"]}
RUNS = {  # name: (command, extra flags, device)
    "sft-cpu": ("sft", [], "cpu"),
    "sft-cuda": ("sft", [], "cuda"),
    "dpo-cpu": ("dpo", [], "cpu"),
    "dpo-cuda": ("dpo", [], "cuda"),
    "sft-cuda-bf16": ("sft", ["--dtype", "bfloat16"], "cuda"),
    "dpo-ipo-cpu": ("dpo", ["--loss-type", "ipo"], "cpu"),
    "dpo-ipo-cuda": ("dpo", ["--loss-type", "ipo"], "cuda"),  # its per-token counts on the device
}
FUSED_KERNELS = ("_fwd_kernel", "_bwd_dz_kernel")  # kernels/srlm_kernels/fused_logprob.py
DPO_KERNELS = ("_dpo_fwd_kernel", "_dpo_bwd_kernel")  # kernels/srlm_kernels/dpo_loss.py

# fp32 on both devices, yet not bit-equal: cuBLAS, SDPA and the Triton kernel sum in other orders
# than CPU torch (TF32 is off: torch.backends.cuda.matmul.allow_tf32 defaults to False, and the
# Triton kernel asks for input_precision="ieee" on fp32). AdamW divides each gradient by its own
# running RMS, which amplifies such rounding: in a CPU experiment, a 1-ulp random perturbation of
# the initial weights (a stand-in for the GPU's rounding) left the final weights of these runs
# apart by 5e-6 at most and by 5e-5 relative to a tensor's whole update (L2). The bounds allow ~100x
# that and stay 10x below a real difference (a lost gradient, a skipped or differently clipped
# step moves elements by O(lr) = 1e-3; each run moves them by ~3e-3).
WEIGHT_ATOL = 5e-4
UPDATE_RTOL = 1e-2
LOSS_RTOL = 1e-4  # per-step losses; 1e-7 apart in the 1-ulp experiment
REF_RTOL = 1e-5  # reference log-probs (sums of ~80 token log-probs, one forward): 1.4e-7 there


def _run(cmd, device, cache, timeout=120):  # a run takes ~10 s; fail fast rather than hang
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["TRITON_CACHE_DIR"] = str(cache)
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """-> {name: (out dir, CompletedProcess)} for RUNS and the mixed-precision worker ("fsdp-bf16")."""
    tmp = tmp_path_factory.mktemp("gpu_train")
    jobs = {name: ([sys.executable, "-m", "srlm_engine.cli", kind, "--model", tiny_model, *DATA_FLAGS[kind],
                    "--out", tmp / name, *COMMON, "--nproc", 1, *extra], dev)
            for name, (kind, extra, dev) in RUNS.items()}
    worker = [sys.executable, Path(__file__).resolve(), "--fsdp-bf16-worker", tiny_model, tmp / "fsdp-bf16"]
    jobs["fsdp-bf16"] = (worker, "cuda")
    with ThreadPoolExecutor(len(jobs)) as ex:
        futures = {name: ex.submit(_run, cmd, dev, tmp / "triton" / name) for name, (cmd, dev) in jobs.items()}
        return {name: (tmp / name, f.result()) for name, f in futures.items()}


def done(runs, name) -> Path:
    out, proc = runs[name]
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


def compiled(runs, name) -> set[str]:
    """Names of the Triton kernels that run `name` compiled (its cache holds KERNEL.json, .cubin, ...)."""
    cache = runs[name][0].parent / "triton" / name
    return {p.name.split(".")[0] for p in cache.rglob("*") if p.is_file()}


def losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


def assert_same_training(base, cpu, cuda):
    s0, sc, sg = (load_model(p).state_dict() for p in (base, cpu / "model", cuda / "model"))
    assert sc.keys() == sg.keys()
    assert max(float((sc[k] - s0[k]).abs().max()) for k in sc) > 1e-3  # it trained
    for k in sc:
        assert float((sc[k] - sg[k]).abs().max()) < WEIGHT_ATOL, k
        assert float((sc[k] - sg[k]).norm()) <= UPDATE_RTOL * float((sc[k] - s0[k]).norm()), k
    assert losses(cuda) == pytest.approx(losses(cpu), rel=LOSS_RTOL)


def test_sft_on_cuda_matches_cpu(runs, tiny_model):
    cpu, cuda = done(runs, "sft-cpu"), done(runs, "sft-cuda")
    assert set(FUSED_KERNELS) <= compiled(runs, "sft-cuda")  # its log-probs came from the Triton kernels
    assert_same_training(tiny_model, cpu, cuda)


def test_dpo_on_cuda_matches_cpu(runs, tiny_model):
    cpu, cuda = done(runs, "dpo-cpu"), done(runs, "dpo-cuda")
    assert set(FUSED_KERNELS + DPO_KERNELS) <= compiled(runs, "dpo-cuda")
    # The reference log-probs, computed once by a no-grad pass before training (train/refs.py).
    rc, rg = read_jsonl(cpu / "pairs.ref.jsonl"), read_jsonl(cuda / "pairs.ref.jsonl")
    assert len(rc) == len(rg) == 24
    for a, b in zip(rc, rg):
        assert a["ref_model"] == b["ref_model"] and a["ref_max_seq_len"] == b["ref_max_seq_len"] == 64
        assert a["ref_chosen_logp"] < 0 and a["ref_rejected_logp"] < 0
        assert b["ref_chosen_logp"] == pytest.approx(a["ref_chosen_logp"], rel=REF_RTOL)
        assert b["ref_rejected_logp"] == pytest.approx(a["ref_rejected_logp"], rel=REF_RTOL)
    assert_same_training(tiny_model, cpu, cuda)
    # Step 1: policy == reference, so every DPO margin is 0 and the sigmoid loss is log 2.
    assert losses(cuda)[0] == pytest.approx(0.6931472, abs=1e-5)


def test_ipo_on_cuda_matches_cpu(runs, tiny_model):
    """IPO averages each row's log-probs over its trained tokens (train/losses.py): the counts
    must lie on the log-probs' device (counts on the CPU beside log-probs on the GPU raise at the
    first step)."""
    cpu, cuda = done(runs, "dpo-ipo-cpu"), done(runs, "dpo-ipo-cuda")
    assert_same_training(tiny_model, cpu, cuda)
    # Step 1: policy == reference, margin 0, so the loss is (0 - 1 / (2 beta))^2 = 25 at beta 0.1.
    assert losses(cuda)[0] == pytest.approx(25.0, rel=1e-6)


def test_bf16_weights_train_on_cuda(runs, tiny_model):
    """--dtype bfloat16 in one process: weights, AdamW state and compute in bf16 (the fused kernel
    multiplies bf16 tiles on the tensor cores with fp32 accumulation)."""
    fp32, bf16 = done(runs, "sft-cuda"), done(runs, "sft-cuda-bf16")
    assert set(FUSED_KERNELS) <= compiled(runs, "sft-cuda-bf16")
    lb = losses(bf16)
    # The first loss is the untrained model's (same batch as fp32): bf16 rounds logits by ~2^-9
    # relative, and the loss averages a log-sum-exp over 49152 of them.
    assert lb[0] == pytest.approx(losses(fp32)[0], rel=1e-2)
    assert all(map(math.isfinite, lb))
    assert lb[-1] < lb[0]  # 10.784 -> 10.694 in this bf16 run on CPU
    assert json.loads((bf16 / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    s0, s1 = load_model(tiny_model).state_dict(), load_model(bf16 / "model").state_dict()
    assert max(float((s1[k] - s0[k]).abs().max()) for k in s0) > 1e-3


def test_fsdp2_mixed_precision_on_cuda(runs, tiny_model):
    """parallelize(mixed_precision=True): blocks compute in bf16 on the GPU, the sharded master
    weights stay fp32, one batch trained 6 steps gets a lower loss, the saved weights are fp32."""
    out = done(runs, "fsdp-bf16")
    assert set(FUSED_KERNELS) <= compiled(runs, "fsdp-bf16")
    r = json.loads((out / "result.json").read_text())
    assert r["device"] == "cuda"
    assert r["compute_dtypes"] == ["torch.bfloat16"]  # a block's matmul outputs during forward
    assert r["master_dtypes"] == ["torch.float32"]
    assert r["losses"][0] == pytest.approx(r["fp32_loss"], rel=1e-2)  # same weights, bf16 vs fp32
    assert r["losses"][-1] < r["losses"][0] - 0.01
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"
    s0, s1 = load_model(tiny_model).state_dict(), load_model(out / "model").state_dict()
    assert max(float((s1[k] - s0[k]).abs().max()) for k in s0) > 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--mixed-precision needs 2 processes, one GPU each")
def test_mixed_precision_cli_two_gpus(tiny_model, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    for out, extra in ((fp32, []), (bf16, ["--mixed-precision"])):
        cmd = [sys.executable, "-m", "srlm_engine.cli", "sft", "--model", tiny_model, *DATA_FLAGS["sft"],
               "--out", out, *COMMON, "--nproc", 2, *extra]
        proc = _run(cmd, "cuda", tmp_path / "triton")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(bf16)[0] == pytest.approx(losses(fp32)[0], rel=1e-2)
    assert losses(bf16)[-1] < losses(bf16)[0]
    assert json.loads((bf16 / "model" / "config.json").read_text())["torch_dtype"] == "float32"


# ----------------------------------------------------------------- mixed-precision worker

def fsdp_bf16_worker(model_dir: Path, out: Path, steps: int = 6) -> None:
    """FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce) over a process group of one rank on
    this machine's device (cuda:0, NCCL; CPU and gloo without CUDA): parallelize() and save_final()
    as the trainer calls them, AdamW steps on one fixed micro-batch -> OUT/result.json, OUT/model."""
    import torch.distributed as dist
    from srlm_engine.model.weights import load_config
    from srlm_engine.tokenizer import Tokenizer
    from srlm_engine.train import batches
    from srlm_engine.train.losses import TokenLogprobs, sft_loss
    from srlm_engine.train.optim import build_optimizer
    from srlm_engine.train.parallel import Dist, parallelize
    from srlm_engine.train.trainer import save_final

    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tok = Tokenizer.from_pretrained(model_dir)
        enc = batches.encode_sft(tok, read_jsonl(DATA / "sft_train.jsonl")[:4], 64)
        pad_id = tok.token_to_id(tok.pad_token or tok.eos_token or "") or 0
        ids, tgt = (t.to(dev) for t in batches.collate(enc, [0, 1, 2, 3], pad_id, dpo=False))  # (4, T)
        with torch.no_grad():
            fp32_loss = float(sft_loss(TokenLogprobs(load_model(model_dir, device=dev))(ids, tgt), tgt)[0])
        model = load_model(model_dir, device=dev)
        seen = set()
        model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
        # Dist(world=2) only makes parallelize() shard (it shards when world > 1); the default process
        # group has one rank, so each shard is a whole tensor and the collectives copy.
        d = Dist(rank=0, world=2, local_rank=0, device=dev)
        root = parallelize(TokenLogprobs(model), model.layers, d, mixed_precision=True)
        root.train()
        opt, _ = build_optimizer(root, 1e-3, 1e-3, steps, 0, "linear", 0.0, (0.9, 0.999), 1e-8)
        run_losses = []
        for _ in range(steps):
            loss, _ = sft_loss(root(ids, tgt), tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run_losses.append(float(loss.detach()))
        master = sorted({str(p.dtype) for p in root.parameters()})
        save_final(out, root, d, load_config(model_dir), model_dir)
        result = {"device": dev.type, "losses": run_losses, "fp32_loss": fp32_loss,
                  "compute_dtypes": sorted(seen), "master_dtypes": master}
        (out / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["--fsdp-bf16-worker"]:
    fsdp_bf16_worker(Path(sys.argv[2]), Path(sys.argv[3]))
