"""Paged KV-cache ops: the C++ ops (torch.ops.srlm_C) and the Triton kernels (interpreter on CPU)
against the plain-torch reference, on shuffled block tables, ragged lengths, GQA and several
block sizes and dtypes; the reference itself against dense attention; bad input.

TRITON_INTERPRET must be set before anything imports triton (triton 3.9 reads it when a function
is decorated, and tl.sum/tl.max are decorated when triton is first imported). This module sets it
first; when another test module imported triton earlier in the same pytest process, the
Triton tests here skip and test_triton_tests_in_fresh_process runs them in a new process.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import srlm_engine._C  # noqa: E402,F401  registers torch.ops.srlm_C; a missing extension fails here, on purpose
from srlm_kernels import paged_attention as tri  # noqa: E402
from srlm_kernels.reference import paged_attention as ref  # noqa: E402

# Both ours and triton's own helpers (decorated at triton's first import) must be interpreted.
INTERPRETED = all(isinstance(f, InterpretedFunction) for f in (tri._decode_kernel, triton.language.standard.sum))
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1; "
                                       "test_triton_tests_in_fresh_process runs these")

# Errors compared with a float64 reference on the very same input values: the bound is on the
# op's own arithmetic. |err| <= atol + rtol * |expected|, outputs are O(1) (convex sums of N(0,1) values).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),  # same math, another summation order
    # fp32: dot products of 64 terms and sums of <= 100 exponentials, eps 6e-8; the C++ op's
    # polynomial exp adds ~2 ulp per weight. 1e-5 is ~100 ulp of the outputs, far below a wrong term.
    torch.float32: (1e-5, 1e-5),
    # bf16/fp16 inputs are computed in fp32 and rounded once to the output dtype: half a step
    # (2^-9 = 2e-3 relative for bf16, 2^-12 for fp16) plus fp32 noise; bound at one full step.
    torch.bfloat16: (4e-3, 8e-3),
    torch.float16: (5e-4, 1e-3),
}


def assert_close(actual, expected64, what):
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    atol, rtol = TOLERANCES[actual.dtype]
    act = actual.to(torch.float64)
    assert torch.isfinite(act).all(), f"{what}: non-finite output"
    err = (act - expected64).abs()
    bound = atol + rtol * expected64.abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3e} (atol {atol}, rtol {rtol})"


# ---------------------------------------------------------------------------------- inputs


def make_paged(B, nh, nkv, hd, bs, lens, dtype, seed=0, q_scale=1.0, spare_blocks=3):
    """Random caches and queries; each sequence's blocks are scattered over the pool in random
    order (never contiguous, never sorted), table columns past a sequence's last block hold -1."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // bs) for L in lens]
    max_blocks = max(need) + 1  # one spare column: tables are padded in the engine too
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    q = (torch.randn(B, nh, hd, generator=g) * q_scale).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def run_decode(backend, q, k_cache, v_cache, tables, lens, scale):
    if backend == "cpp":
        return torch.ops.srlm_C.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    return tri.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)


def run_cache(backend, k, v, k_cache, v_cache, slots):
    if backend == "cpp":
        torch.ops.srlm_C.reshape_and_cache(k, v, k_cache, v_cache, slots)
    else:
        tri.reshape_and_cache(k, v, k_cache, v_cache, slots)


BACKENDS = [pytest.param("cpp", id="cpp"),
            pytest.param("triton", id="triton", marks=needs_interpreter)]

# (B, nh, nkv, hd, block_size, context lengths): lengths 1, an exact multiple of the block size,
# one that is not, and 0 (an empty sequence returns zeros).
CASES = {
    "smollm2_bs16": (5, 9, 3, 64, 16, [1, 32, 37, 0, 100]),
    "mha_bs1": (3, 4, 4, 64, 1, [1, 7, 20]),
    "gqa_bs8_hd24": (4, 6, 2, 24, 8, [8, 1, 13, 30]),  # head_dim no power of two: masked tiles
}


# ------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_dense_attention(case):
    """The reference itself: contiguous K/V per sequence through SDPA (with GQA expansion) in float64."""
    B, nh, nkv, hd, bs, lens = CASES[case]
    q, kc, vc, tables, ctx = make_paged(B, nh, nkv, hd, bs, lens, torch.float64)
    out = ref.paged_decode_attention(q, kc, vc, tables, ctx, hd ** -0.5)
    for b, L in enumerate(lens):
        if L == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        blocks = tables[b, :-(-L // bs)].long()
        keys = kc[blocks].reshape(-1, nkv, hd)[:L].transpose(0, 1).repeat_interleave(nh // nkv, 0)  # (nh, L, hd)
        vals = vc[blocks].reshape(-1, nkv, hd)[:L].transpose(0, 1).repeat_interleave(nh // nkv, 0)
        want = F.scaled_dot_product_attention(q[b][:, None], keys, vals, scale=hd ** -0.5)[:, 0]  # (nh, hd)
        torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_reference(backend, dtype, case):
    B, nh, nkv, hd, bs, lens = CASES[case]
    q, kc, vc, tables, ctx = make_paged(B, nh, nkv, hd, bs, lens, dtype)
    out = run_decode(backend, q, kc, vc, tables, ctx, hd ** -0.5)
    assert out.dtype == dtype
    want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx, hd ** -0.5)
    assert_close(out, want, f"{backend} {case} {dtype}")
    assert torch.equal(out[ctx == 0], torch.zeros_like(out[ctx == 0]))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hd", [64, 128, 40])
def test_cpp_decode_work_splits(threads, hd):
    """The C++ op's paths: one kv head per item (few sequences) or whole sequences (B >= 4 x
    threads), serial below ~4k key rows or OpenMP above, head_dim 64/128 (compiled for that size)
    or any other (generic loops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, lens in [(2, [300, 1000]), (3, [1, 9, 17]), (12, [1, 16, 17, 64, 100, 250, 333, 500, 31, 2, 48, 400])]:
            q, kc, vc, tables, ctx = make_paged(B, 12, 4, hd, 16, lens, torch.float32, seed=B)
            out = torch.ops.srlm_C.paged_decode_attention(q, kc, vc, tables, ctx, hd ** -0.5)
            want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx, hd ** -0.5)
            assert_close(out, want, f"cpp B={B} hd={hd} threads={threads}")
    finally:
        torch.set_num_threads(before)


def test_cpp_decode_float64():
    """The C++ op in float64 against the float64 reference: only summation order differs."""
    B, nh, nkv, hd, bs, lens = CASES["smollm2_bs16"]
    args = make_paged(B, nh, nkv, hd, bs, lens, torch.float64, seed=3)
    out = torch.ops.srlm_C.paged_decode_attention(*args, 0.125)
    assert_close(out, ref.paged_decode_attention(*args, 0.125), "cpp float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_peaked_logits(backend):
    """Logits of a few hundred: exp overflows unless the maximum is subtracted; weights below
    e^-87 underflow to 0 in the C++ op's exp, which moves the output by less than 1e-37."""
    q, kc, vc, tables, ctx = make_paged(3, 9, 3, 64, 16, [1, 40, 333], torch.float32, seed=5, q_scale=40.0)
    out = run_decode(backend, q, kc, vc, tables, ctx, 0.125)
    want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx, 0.125)
    assert_close(out, want, f"{backend} peaked")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_strided_query(backend):
    """q as a view into a fused [B, nh + 2 nkv, hd] projection (rows not adjacent)."""
    q, kc, vc, tables, ctx = make_paged(4, 9, 3, 64, 16, [5, 16, 17, 50], torch.float32, seed=7)
    qkv = torch.randn(4, 9 + 6, 64)
    qkv[:, :9] = q
    view = qkv[:, :9]
    assert not view.is_contiguous()
    out = run_decode(backend, view, kc, vc, tables, ctx, 0.125)
    assert_close(out, ref.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx, 0.125),
                 f"{backend} strided q")


# ------------------------------------------------------------------------ cache writes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reshape_and_cache_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(11)
    num_blocks, bs, nkv, hd, n = 6, 16, 3, 64, 20
    k_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:n]
    slots[[0, 7, 19]] = -1  # padding tokens: skipped
    kv = torch.randn(n, 2 * nkv + 1, hd, generator=g).to(dtype)
    k, v = kv[:, :nkv], kv[:, nkv:2 * nkv]  # views of a fused projection, as the engine has them
    want_k, want_v = k_cache.clone(), v_cache.clone()
    ref.reshape_and_cache(k, v, want_k, want_v, slots)
    run_cache(backend, k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    written = want_k.view(-1, nkv, hd)[slots[slots >= 0]]
    assert torch.equal(written, k[slots >= 0])  # the reference wrote what it should, and only there
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    before = torch.randn(num_blocks, bs, nkv, hd, generator=torch.Generator().manual_seed(11)).to(dtype)
    assert torch.equal(want_k.view(-1, nkv, hd)[untouched], before.view(-1, nkv, hd)[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_then_decode_equals_dense(backend):
    """End to end: tokens written one sequence at a time into blocks taken from a shuffled pool,
    then decoded; the result equals dense attention over each sequence's own K and V."""
    g = torch.Generator().manual_seed(13)
    nh, nkv, hd, bs, lens = 9, 3, 64, 16, [3, 16, 40]
    free = torch.randperm(12, generator=g).tolist()
    k_cache, v_cache = torch.zeros(12, bs, nkv, hd), torch.zeros(12, bs, nkv, hd)
    tables = torch.full((len(lens), 4), -1, dtype=torch.int32)
    keys, vals = [], []
    for b, L in enumerate(lens):
        blocks = [free.pop() for _ in range(-(-L // bs))]
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(L)])
        k, v = torch.randn(L, nkv, hd, generator=g), torch.randn(L, nkv, hd, generator=g)
        run_cache(backend, k, v, k_cache, v_cache, slots)
        keys.append(k)
        vals.append(v)
    q = torch.randn(len(lens), nh, hd, generator=g)
    out = run_decode(backend, q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), hd ** -0.5)
    for b in range(len(lens)):
        kk = keys[b].transpose(0, 1).repeat_interleave(nh // nkv, 0).double()  # (nh, L, hd)
        vv = vals[b].transpose(0, 1).repeat_interleave(nh // nkv, 0).double()
        want = F.scaled_dot_product_attention(q[b][:, None].double(), kk, vv, scale=hd ** -0.5)[:, 0]
        assert_close(out[b], want, f"{backend} sequence {b}")


# --------------------------------------------------------------------------- bad input
# The checks run before any kernel launch, so the Triton wrappers are tested without the interpreter.

ERRORS = {"cpp": RuntimeError, "triton": ValueError}


def decode_inputs():
    return make_paged(2, 4, 2, 8, 4, [5, 8], torch.float32)


def bad_decode_cases():
    yield "q 2-D", lambda q, kc, vc, t, c: (q[0], kc, vc, t, c), "q must be"
    yield "k_cache 3-D", lambda q, kc, vc, t, c: (q, kc[0], vc, t, c), "k_cache must be"
    yield "v_cache shape", lambda q, kc, vc, t, c: (q, kc, vc[:-1], t, c), "v_cache"
    yield "head_dim", lambda q, kc, vc, t, c: (q[..., :4], kc, vc, t, c), "head_dim"
    yield "heads not multiple", lambda q, kc, vc, t, c: (q[:, :3], kc, vc, t, c), "multiple of num_kv_heads"
    yield "int64 block table", lambda q, kc, vc, t, c: (q, kc, vc, t.long(), c), "block_tables must be"
    yield "int64 context lens", lambda q, kc, vc, t, c: (q, kc, vc, t, c.long()), "context_lens must be"
    yield "context lens shape", lambda q, kc, vc, t, c: (q, kc, vc, t, c[:1]), "context_lens must"
    yield "block table rows", lambda q, kc, vc, t, c: (q, kc, vc, t[:1], c), "block_tables must be"
    yield "q dtype", lambda q, kc, vc, t, c: (q.double(), kc, vc, t, c), "dtype|must match"
    yield "cache dtypes", lambda q, kc, vc, t, c: (q, kc, vc.half(), t, c), "dtype|float32, bfloat16"
    yield "context too long", lambda q, kc, vc, t, c: (q, kc, vc, t, c + 100), "context_lens"
    yield "negative context", lambda q, kc, vc, t, c: (q, kc, vc, t, c - 6), "context_lens"
    yield "block id too big", lambda q, kc, vc, t, c: (q, kc, vc, t.index_fill(1, torch.tensor([0]), 99), c), \
        "block_tables\\[0, 0\\] = 99"
    yield "block id -1 in use", lambda q, kc, vc, t, c: (q, kc, vc, t.index_fill(1, torch.tensor([1]), -1), c), \
        "block_tables\\[0, 1\\] = -1"
    yield "non-contiguous cache", lambda q, kc, vc, t, c: (q, kc.transpose(0, 1).contiguous().transpose(0, 1), vc,
                                                           t, c), "contiguous"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("name,mutate,match", list(bad_decode_cases()), ids=[c[0] for c in bad_decode_cases()])
def test_decode_bad_input(backend, name, mutate, match):
    args = mutate(*decode_inputs())
    with pytest.raises(ERRORS[backend], match=match):
        run_decode(backend, *args, 0.5)


def bad_cache_cases():
    yield "k shape", lambda k, v, kc, vc, s: (k[:, :1], v, kc, vc, s), "k must"
    yield "v shape", lambda k, v, kc, vc, s: (k, v[:-1], kc, vc, s), "v "
    yield "int32 slots", lambda k, v, kc, vc, s: (k, v, kc, vc, s.int()), "slot_mapping must be"
    yield "slots shape", lambda k, v, kc, vc, s: (k, v, kc, vc, s[:2]), "slot_mapping must"
    yield "slot too big", lambda k, v, kc, vc, s: (k, v, kc, vc, s.index_fill(0, torch.tensor([1]), 64)), "64"
    yield "slot -2", lambda k, v, kc, vc, s: (k, v, kc, vc, s.index_fill(0, torch.tensor([1]), -2)), "-2"
    yield "k dtype", lambda k, v, kc, vc, s: (k.double(), v, kc, vc, s), "dtype|must be"
    yield "cache shapes", lambda k, v, kc, vc, s: (k, v, kc, vc[:1], s), "v_cache"
    yield "non-contiguous cache", lambda k, v, kc, vc, s: (k, v, kc.transpose(0, 1), vc, s), "contiguous|k_cache"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("name,mutate,match", list(bad_cache_cases()), ids=[c[0] for c in bad_cache_cases()])
def test_reshape_and_cache_bad_input(backend, name, mutate, match):
    kc, vc = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    args = mutate(k, v, kc, vc, torch.tensor([0, 5, -1]))
    before = (args[2].clone(), args[3].clone())
    with pytest.raises(ERRORS[backend], match=match):
        run_cache(backend, *args)
    assert torch.equal(args[2], before[0]) and torch.equal(args[3], before[1]), "a rejected call wrote the cache"


def test_ops_are_registered():
    schema = str(torch.ops.srlm_C.reshape_and_cache.default._schema)
    assert "Tensor(a!) k_cache" in schema and "Tensor(b!) v_cache" in schema and schema.endswith("-> ()")
    assert str(torch.ops.srlm_C.paged_decode_attention.default._schema).endswith("float scale) -> Tensor")


def test_triton_tests_in_fresh_process():
    if INTERPRETED:
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and not fresh_process",
                           str(Path(__file__).resolve())], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
