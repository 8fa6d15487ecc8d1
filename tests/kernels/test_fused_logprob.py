"""fused_linear_logprob and sequence_logprobs: Triton kernels (interpreter) and the CPU tiled path
against the float64 reference, outputs and both gradients."""
import pytest
import torch

from kernel_compare import assert_close
from srlm_kernels import fused_linear_logprob, fused_logprob, fused_logprob_torch, sequence_logprobs
from srlm_kernels.reference.fused_logprob import fused_linear_logprob_ref, sequence_logprobs_ref

# (N, H, V): one row; odd sizes that no tile divides; a V just past one tile.
SHAPES = [(1, 16, 17), (5, 123, 123), (37, 64, 1000)]
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
MIN_CHUNK_VALUES = fused_logprob.MIN_CHUNK_VALUES  # read at import, before any fixture changes them
CPU_TILES = (fused_logprob_torch.CHUNK_N, fused_logprob_torch.CHUNK_V, fused_logprob_torch.NARROW_H)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles smaller than the shapes, so every test crosses tile edges and partial tiles."""
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_N", 7)
    monkeypatch.setattr(fused_logprob_torch, "CHUNK_V", 50)
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", (16, 64, 32))
    monkeypatch.setattr(fused_logprob, "MIN_CHUNK_VALUES", 0)  # several backward vocabulary chunks
    monkeypatch.setattr(fused_logprob, "FWD_SPLITS", 3)  # the forward's vocabulary splits merged


def make_inputs(n, h, v, dtype, seed=0, logit_scale=1.0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (logit_scale / h ** 0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[1::ignore_every] = -100  # row 0 kept: the N=1 shape runs a kernel on a real row
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, targets, upstream


def check_against_reference(backend, hidden, weight, targets, upstream, temperature=1.0):
    """Forward, then backward of sum(upstream * logprobs), on both the kernel and the reference."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_logprob(h, w, targets, temperature=temperature, backend=backend)
    (out * upstream.to(out.dtype)).sum().backward()
    h64 = hidden.to(torch.float64).requires_grad_()
    w64 = weight.to(torch.float64).requires_grad_()
    ref = fused_linear_logprob_ref(h64, w64, targets, temperature=temperature)
    (ref * upstream).sum().backward()
    max_logit = (h64 @ w64.T / temperature).abs().max().item()
    assert out.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert_close(out, ref, scale=max_logit, what="logprobs")
    assert (out[targets == -100] == 0).all()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    assert_close(h.grad, h64.grad, what="d hidden")
    assert_close(w.grad, w64.grad, what="d weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    check_against_reference(backend, *make_inputs(*shape, dtype), temperature=0.7)


def test_cpu_path_float64_matches_reference():
    check_against_reference("torch", *make_inputs(37, 64, 1000, torch.float64), temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_shape(backend, monkeypatch):
    """H=576, V=49152 as in SmolLM2-135M, with production tile sizes on the CPU path. N is tiny and
    the inputs fp32 because the interpreter pays ~1 us per weight element per pass (bf16 costs a
    slow conversion on top); bf16 is covered on the small shapes."""
    for name, value in zip(("CHUNK_N", "CHUNK_V", "NARROW_H"), CPU_TILES):
        monkeypatch.setattr(fused_logprob_torch, name, value)
    # the tiles measured fastest on the bench machine: halved at SmolLM2's H, whole at Llama-3's
    assert fused_logprob_torch._tiles(576) == (1024, 2048) and fused_logprob_torch._tiles(2048) == (2048, 4096)
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", (16, 1024, 64))
    check_against_reference(backend, *make_inputs(3, 576, 49152, torch.float32, ignore_every=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    """Logits of order +-1e4: the online log-sum-exp must not overflow nor lose the target."""
    hidden, weight, targets, upstream = make_inputs(9, 32, 300, torch.float32, logit_scale=1.0)
    hidden = hidden / hidden.norm(dim=1, keepdim=True) * 1e2
    weight = weight / weight.norm(dim=1, keepdim=True) * 1e2  # |z| up to 1e4
    check_against_reference(backend, hidden, weight, targets, upstream)
    z = hidden @ weight.T
    assert z.abs().max() > 5e3


@pytest.mark.triton
@pytest.mark.parametrize("splits", [1, 2, 5, 100])
def test_forward_vocabulary_splits(splits, monkeypatch):
    """Any split count gives the same forward. V=1000 is 16 blocks of 64: 5 asked gives 4 splits of
    4 blocks, the last one short (232 columns); 100 is clamped to one block per split."""
    monkeypatch.setattr(fused_logprob, "FWD_SPLITS", splits)
    assert fused_logprob.fwd_splits(3, 1000, 64, torch.device("cpu")) == \
        {1: (1, 1024), 2: (2, 512), 5: (4, 256), 100: (16, 64)}[splits]
    hidden, weight, targets, upstream = make_inputs(37, 64, 1000, torch.float32)
    hidden[5] *= 40.0  # rows whose max lies in different splits, far apart in scale
    check_against_reference("triton", hidden, weight, targets, upstream)


@pytest.mark.triton
@pytest.mark.parametrize("config, dtype", [("GPU_FWD_BLOCKS", torch.bfloat16), ("GPU_BWD_BLOCKS", torch.bfloat16),
                                           ("GPU_FP32_BLOCKS", torch.float32)])
def test_production_gpu_tiles(config, dtype, monkeypatch):
    """The tile shapes the GPU launches, run in the interpreter: 300 rows (row blocks cut short),
    H=96 (the second 64-wide step half masked), V=1000 (no tile width divides it: backward
    vocabulary chunks of 256, 256, 256 and 232 columns). test_compile_hopper.py compiles the same
    shapes."""
    blocks = getattr(fused_logprob, config)
    monkeypatch.setattr(fused_logprob, "INTERPRETER_BLOCKS", blocks[:3])
    monkeypatch.setattr(fused_logprob, "MIN_CHUNK_VALUES", 0)
    assert fused_logprob.chunk_cols(300, 1000, 96, blocks[1]) == 256
    check_against_reference("triton", *make_inputs(300, 96, 1000, dtype, ignore_every=0))


@pytest.mark.triton
def test_bf16_d_hidden_sums_its_chunks_in_fp32(monkeypatch):
    """d hidden of bf16 inputs adds up one product per backward vocabulary chunk; the sum is kept
    in fp32 and rounded to bf16 once. 64 chunks of 64 columns, every row held to the bf16 entry
    of the tolerance table against its own largest value. A bf16 running sum, rounded after
    every chunk (this path before), failed here: row 0 off by 6.4e-3 where 2.3e-3 plus 1% of the
    value was allowed."""
    monkeypatch.setattr(fused_logprob, "chunk_cols", lambda n, v, h, block_v: 64)
    hidden, weight, targets, _ = make_inputs(16, 96, 4096, torch.bfloat16, ignore_every=0)
    h = hidden.clone().requires_grad_()
    fused_linear_logprob(h, weight, targets, backend="triton").sum().backward()
    h64 = hidden.double().requires_grad_()
    fused_linear_logprob_ref(h64, weight.double(), targets).sum().backward()
    for row in range(16):
        assert_close(h.grad[row], h64.grad[row], what=f"d hidden row {row}")


def test_backward_vocabulary_chunks_at_the_bench_shapes(monkeypatch):
    # dz [N, Vc] holds CHUNK_VALUES * N * H values, or MIN_CHUNK_VALUES when that is more; Vc a
    # multiple of the tile width, never past V rounded up to it
    fl = fused_logprob
    monkeypatch.setattr(fl, "MIN_CHUNK_VALUES", MIN_CHUNK_VALUES)  # the module's, not small_tiles'
    assert (fl.CHUNK_VALUES, fl.MIN_CHUNK_VALUES) == (2, 1 << 23)
    assert fl.chunk_cols(6144, 128256, 2048, 128) == 4096  # Llama-3 head: 2 * H columns, 32 chunks
    assert fl.chunk_cols(3072, 49152, 576, 128) == 2816  # SmolLM2: the 8M-value floor, 18 chunks
    assert fl.chunk_cols(7, 1000, 64, 256) == 1024  # few rows: the whole vocabulary in one chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    hidden, weight, _, upstream = make_inputs(6, 32, 100, torch.float32)
    targets = torch.full((6,), -100)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_logprob(h, w, targets, backend=backend)
    (out * upstream.float()).sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs(backend):
    hidden, weight, targets, _ = make_inputs(23, 48, 200, torch.float32)
    seq_ids = torch.arange(23) % 4
    seq_ids[targets == -100] = -1  # ignored tokens' ids are never read
    out = sequence_logprobs(hidden, weight, targets, seq_ids, 4, backend=backend)
    safe = torch.where(targets == -100, 0, seq_ids)
    ref = sequence_logprobs_ref(hidden.double(), weight.double(), targets, safe, 4)
    max_logit = (hidden.double() @ weight.double().T).abs().max().item()
    assert_close(out, ref, scale=max_logit * 23, what="sequence logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_gradient_of_one_input_only(backend, which):
    # a frozen lm_head (only d hidden is computed), or frozen hidden states (only d weight)
    hidden, weight, targets, upstream = make_inputs(37, 64, 1000, torch.float64 if backend == "torch" else torch.float32)
    x = (hidden if which == "hidden" else weight).clone().requires_grad_()
    args = (x, weight) if which == "hidden" else (hidden, x)
    (fused_linear_logprob(*args, targets, backend=backend).double() * upstream).sum().backward()
    r = (hidden if which == "hidden" else weight).double().clone().requires_grad_()
    rargs = (r, weight.double()) if which == "hidden" else (hidden.double(), r)
    (fused_linear_logprob_ref(*rargs, targets) * upstream).sum().backward()
    assert_close(x.grad, r.grad, what=f"d {which}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    hidden, weight, targets, _ = make_inputs(0, 16, 50, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_logprob(h, w, targets, backend=backend)
    out.sum().backward()
    assert out.shape == (0,) and h.grad.shape == (0, 16) and (w.grad == 0).all()


def test_gradcheck_cpu_path():
    hidden, weight, targets, _ = make_inputs(9, 11, 37, torch.float64)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_logprob(a, b, targets, temperature=0.9, backend="torch"), (h, w))


def test_opcheck_registrations():
    """The fake (meta) kernel, autograd registration and schema agree with the real op."""
    hidden, weight, targets, _ = make_inputs(9, 11, 37, torch.float32)
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, -100, 1.0, "torch")
    torch.library.opcheck(fused_logprob._op, args)


def test_traces_under_torch_compile():
    hidden, weight, targets, upstream = make_inputs(9, 11, 37, torch.float32)
    fn = torch.compile(lambda a, b: fused_linear_logprob(a, b, targets, backend="torch"),
                       backend="aot_eager", fullgraph=True)
    h = hidden.clone().requires_grad_()
    out = fn(h, weight)
    out.sum().backward()
    h2 = hidden.clone().requires_grad_()
    eager = fused_linear_logprob(h2, weight, targets, backend="torch")
    eager.sum().backward()
    assert torch.equal(out, eager) and torch.equal(h.grad, h2.grad)


def test_target_range_is_checked_under_torch_compile_too():
    """The compiled graph cannot run a data-dependent check, so the op checks its targets inside
    its own body: an out-of-range target is an error, compiled or not, never a number."""
    hidden, weight, targets, _ = make_inputs(9, 11, 37, torch.float32)
    fn = torch.compile(lambda a, t: fused_linear_logprob(a, weight, t, backend="torch"),
                       backend="aot_eager", fullgraph=True)
    fn(hidden, targets)  # in range: compiles and runs
    for bad in (37, -1):
        with pytest.raises(ValueError, match=rf"targets must be in \[0, 37\) or == ignore_index \(-100\); found {bad}"):
            fn(hidden, targets.clone().index_fill_(0, torch.tensor([2]), bad))


def test_non_contiguous_inputs_are_copied():
    hidden, weight, targets, _ = make_inputs(8, 16, 40, torch.float32)
    out = fused_linear_logprob(hidden.T.contiguous().T, weight.T.contiguous().T, targets)
    assert not hidden.T.contiguous().T.is_contiguous()
    assert torch.equal(out, fused_linear_logprob(hidden, weight, targets))


@pytest.mark.parametrize("case, match", [
    ("h_mismatch", "differ in H"),
    ("targets_len", "targets must have shape"),
    ("targets_high", "targets must be in"),
    ("targets_negative", "targets must be in"),
    ("targets_float", "targets must be an integer"),
    ("hidden_int", "hidden must be float32"),
    ("dtype_mismatch", "weight has dtype"),
    ("hidden_3d", "hidden must have 2 dims"),
    ("temperature", "temperature must be a finite number > 0"),
    ("backend", "backend must be"),
    ("seq_ids_range", "seq_ids must be in"),
])
def test_bad_inputs(case, match):
    hidden, weight, targets, _ = make_inputs(8, 16, 40, torch.float32, ignore_every=0)
    kw = dict(hidden=hidden, weight=weight, targets=targets)
    if case == "h_mismatch":
        kw["weight"] = weight[:, :15]
    elif case == "targets_len":
        kw["targets"] = targets[:7]
    elif case == "targets_high":
        kw["targets"] = targets.clone().index_fill_(0, torch.tensor([3]), 40)
    elif case == "targets_negative":
        kw["targets"] = targets.clone().index_fill_(0, torch.tensor([3]), -1)
    elif case == "targets_float":
        kw["targets"] = targets.float()
    elif case == "hidden_int":
        kw["hidden"] = hidden.long()
    elif case == "dtype_mismatch":
        kw["weight"] = weight.double()
    elif case == "hidden_3d":
        kw["hidden"] = hidden[None]
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "backend":
        kw["backend"] = "cuda"
    with pytest.raises(ValueError, match=match):
        if case == "seq_ids_range":
            sequence_logprobs(hidden, weight, targets, torch.full((8,), 2), 2)
        else:
            fused_linear_logprob(**kw)


def test_auto_backend_is_the_tiled_torch_path_on_cpu_and_triton_on_cuda():
    from srlm_kernels._checks import check_backend
    assert check_backend("auto", torch.device("cpu")) == "torch"
    assert check_backend("auto", torch.device("cuda")) == "triton"
    hidden, weight, targets, _ = make_inputs(9, 11, 37, torch.float32)
    assert torch.equal(fused_linear_logprob(hidden, weight, targets),  # auto on CPU is the torch path
                       fused_linear_logprob(hidden, weight, targets, backend="torch"))
