"""Compiles the Triton kernels for an H100 (sm_90) without a GPU; prints one JSON line per kernel.

    python tests/kernels/aot_compile.py      (TRITON_INTERPRET unset: the kernels must be JIT ones)

Triton's compiler and its bundled ptxas need no device, so a CPU machine can lower the kernels
all the way to a cubin with the production launch configs and check what the interpreter cannot:
tl.dot shapes and layouts on tensor cores, loops with run-time bounds, shared memory for the
pipeline stages, registers and spills (read from the cubin by the cuobjdump that ships with
Triton). Arguments get the specialization the JIT gives them at launch: pointers and the sizes
that are multiples of 16 in the bench shapes (H = 576 or 2048, V_PER_SPLIT) marked divisible by
16. Run by test_compile_hopper.py. Uses Triton's compiler API as of 3.4 (ASTSource with a named
signature, triton.knobs); a fresh `make test` installs 3.9, the lent GPU image has 3.6.
"""
import importlib
import json
import os
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

# the modules, not the functions that srlm_kernels exports under the same names
dpo_loss = importlib.import_module("srlm_kernels.dpo_loss")
fused_logprob = importlib.import_module("srlm_kernels.fused_logprob")
paged_attention = importlib.import_module("srlm_kernels.paged_attention")

TARGET = GPUTarget("cuda", 90, 32)
DIVISIBLE = {"h_ptr", "w_ptr", "t_ptr", "m_ptr", "s_ptr", "zt_ptr", "g_ptr", "lse_ptr", "dz_ptr", "H",
             "V_PER_SPLIT", "pc_ptr", "pr_ptr", "rc_ptr", "rr_ptr", "loss_ptr", "crew_ptr", "rrew_ptr",
             "dlogits_ptr", "q_ptr", "k_ptr", "v_ptr", "bt_ptr", "lens_ptr", "out_ptr", "kc_ptr", "vc_ptr",
             "slot_ptr"}


def compile_kernel(kernel, types, constexprs, warps, stages):
    """types: every non-constexpr argument's Triton type, by name -> the CompiledKernel."""
    names = kernel.arg_names
    missing = [n for n in names if n not in types and n not in constexprs]
    if missing:
        raise KeyError(f"{kernel.__name__}: no type for arguments {missing} (signature changed?)")
    signature = {n: types.get(n, "constexpr") for n in names}
    backend = make_backend(TARGET)
    attrs = {(i,): backend.parse_attr("D") for i, n in enumerate(names) if n in DIVISIBLE}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def resource_usage(cubin):
    """Registers per thread and stack bytes (register spills) of the cubin's kernel, from the
    cuobjdump that ships with Triton: {"registers": int, "stack": int}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out!r}")
    return {"registers": int(usage[1]), "stack": int(usage[2])}


def report(name, config, compiled):
    ttgir = compiled.asm["ttgir"]
    print(json.dumps({"kernel": name, "config": config, "shared": compiled.metadata.shared,
                      "async_copies": ttgir.count("async_copy_global_to_local"),
                      "wgmma": ttgir.count("warp_group_dot ") + ttgir.count("warp_group_dot{"),
                      **resource_usage(compiled.asm["cubin"])}), flush=True)


def main():
    fl = fused_logprob
    for dt in ("bf16", "fp32"):
        common = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "t_ptr": "*i64", "N": "i32", "V": "i32", "H": "i32",
                  "inv_temp": "fp32", "ignore_index": "i32"}
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        passes = [("fused_logprob._fwd_kernel", fl._fwd_kernel, fl.gpu_blocks("fwd", torch_dtype),
                   {"m_ptr": "*fp32", "s_ptr": "*fp32", "zt_ptr": "*fp32", "V_PER_SPLIT": "i32"}),
                  ("fused_logprob._bwd_dz_kernel", fl._bwd_dz_kernel, fl.gpu_blocks("bwd", torch_dtype),
                   {"g_ptr": "*fp32", "lse_ptr": "*fp32", "dz_ptr": f"*{dt}", "v0": "i32", "V_END": "i32"})]
        for name, kernel, (bn, bv, bh, warps, stages), extra in passes:
            consts = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "UPCAST": False, "IEEE": dt == "fp32"}
            report(name, {"dtype": dt, "blocks": [bn, bv, bh], "warps": warps, "stages": stages},
                   compile_kernel(kernel, {**common, **extra}, consts, warps, stages))
    ptrs = {n: "*fp32" for n in ("pc_ptr", "pr_ptr", "rc_ptr", "rr_ptr")}
    scalars = {"B": "i32", "beta": "fp32", "ls": "fp32"}
    launch = dict(dpo_loss.LAUNCH)
    warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
    for loss, code in dpo_loss.LOSS_TYPES.items():
        for name, kernel, extra in (
                ("dpo_loss._dpo_fwd_kernel", dpo_loss._dpo_fwd_kernel,
                 {"loss_ptr": "*fp32", "crew_ptr": "*fp32", "rrew_ptr": "*fp32"}),
                ("dpo_loss._dpo_bwd_kernel", dpo_loss._dpo_bwd_kernel, {"g_ptr": "*fp32", "dlogits_ptr": "*fp32"})):
            report(name, {"loss": loss, "block": launch["BLOCK"], "warps": warps, "stages": stages},
                   compile_kernel(kernel, {**ptrs, **scalars, **extra}, {"LOSS": code, **launch}, warps, stages))

    # The engine's decode attention and cache writes at SmolLM2-135M's shape (9 heads over 3 KV
    # heads of 64, 16-token blocks), with the launch configs paged_attention.py uses on a GPU.
    pa = paged_attention
    for dt, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for name, kernel, types, launch in (
                ("paged_attention._decode_kernel", pa._decode_kernel,
                 {**{n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}, "bt_ptr": "*i32",
                  "lens_ptr": "*i32", "q_s0": "i32", "q_s1": "i32", "bt_s0": "i32", "scale": "fp32"},
                 pa.decode_launch(9, 3, 64, 16, torch_dtype, interpreter=False)),
                ("paged_attention._reshape_and_cache_kernel", pa._reshape_and_cache_kernel,
                 {**{n: f"*{dt}" for n in ("k_ptr", "v_ptr", "kc_ptr", "vc_ptr")}, "slot_ptr": "*i64",
                  "k_s0": "i32", "v_s0": "i32"}, pa.cache_launch(3, 64))):
            warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
            report(name, {"dtype": dt, "constexprs": launch, "warps": warps, "stages": stages},
                   compile_kernel(kernel, types, launch, warps, stages))

if __name__ == "__main__":
    main()
