"""torch.ops.srlm_C.small_batch_linear (csrc/linear.cpp) against float64 matmul, and the engine's
use of it: every Linear swapped, parameters shared (tied embeddings stay tied), outputs unchanged."""
import copy

import pytest
import torch
from torch import nn

import srlm_engine._C  # noqa: F401  a missing extension fails here, on purpose
from srlm_engine.engine import LLM
from srlm_engine.engine.linear import MAX_ROWS, WIDE, SmallBatchLinear, chunked_linear, use_small_batch_linear

op = torch.ops.srlm_C.small_batch_linear
# |err| <= tol * (sum_k |x_k w_k| + |b|): fp32 accumulation over K terms in another order (~1e-6
# of that sum); bf16 results are rounded once to bf16 (2^-9 relative), so one bf16 step bounds them.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", range(0, 9))
@pytest.mark.parametrize("n, k, bias", [(1, 1, True), (37, 15, False), (1001, 577, True), (64, 2048, False)])
def test_matches_float64(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = op(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    size = x.double().abs() @ w.double().abs().T + (b.double().abs() if bias else 0)
    assert bool(((got.double() - want).abs() <= TOL[dtype] * (size + 1e-30)).all())


def test_non_contiguous_x_and_bad_input():
    w = torch.randn(10, 16)
    x = torch.randn(16, 3).T  # [3, 16], strided
    torch.testing.assert_close(op(x, w, None), x @ w.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="at most 8"):
        op(torch.randn(9, 16), w, None)
    with pytest.raises(RuntimeError, match="weight has K = 16 but x has K = 15"):
        op(torch.randn(2, 15), w, None)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        op(torch.randn(2, 16), w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(torch.randn(2, 16), w, torch.randn(9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(2, 16).double(), w.double(), None)


def test_module_routes_by_rows_and_shares_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Sequential(nn.Linear(8, 16, bias=False)))
    embedding = nn.Embedding(16, 8)
    model[1][0].weight = embedding.weight  # tied, as a tied lm_head
    ref = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    assert use_small_batch_linear(model) == 2
    assert type(model[0]) is SmallBatchLinear and type(model[1][0]) is SmallBatchLinear
    assert [id(p) for p in model.parameters()] == params and model[1][0].weight is embedding.weight
    with torch.no_grad():
        for rows in (1, MAX_ROWS[torch.float32], 9, 100):  # the op up to MAX_ROWS, F.linear past it
            x = torch.randn(rows, 16)
            torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
        for dtype in (torch.float16, torch.float64):  # dtypes the op lacks go to F.linear, 0 rows too
            for rows in (0, 1):
                x = torch.randn(rows, 16, dtype=dtype)
                torch.testing.assert_close(model.to(dtype)(x), ref.to(dtype)(x))


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_equals_linear(bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2500, 48, generator=g)  # 2500 columns: the last chunk is partial
    b = torch.randn(2500, generator=g) if bias else None
    for rows in (1, 9, 33):
        x = torch.randn(rows, 48, generator=g)
        want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        got = chunked_linear(x, w, b, 512)
        assert got.shape == (rows, 2500) and got.is_contiguous()
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-5)


def test_wide_layer_takes_the_chunked_path(monkeypatch):
    import srlm_engine.engine.linear as linear

    calls = []
    monkeypatch.setattr(linear, "chunked_linear", lambda *a: calls.append(a[-1]) or torch.nn.functional.linear(*a[:3]))
    layer = SmallBatchLinear.wrap(nn.Linear(8, WIDE, bias=False))
    with torch.no_grad():
        layer(torch.randn(MAX_ROWS[torch.float32] + 1, 8))  # past the small-batch op
        layer(torch.randn(2, 8))  # the small-batch op
        layer.double()(torch.randn(12, 8, dtype=torch.float64))  # float64: F.linear
    assert calls == [linear.WIDE_CHUNK]


@pytest.mark.parametrize("backend, kind", [("cpp", SmallBatchLinear), ("torch", nn.Linear)])
def test_engine_swaps_linears_with_the_extension_only(tiny_dir, backend, kind):
    llm = LLM(tiny_dir, device="cpu", kv_cache_tokens=1024, attention_backend=backend)
    assert llm.runner.backend.name == backend
    assert {type(m) for m in llm.model.modules() if isinstance(m, nn.Linear)} == {kind}
