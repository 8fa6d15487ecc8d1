"""One tolerance table and one comparison helper for every kernel test.

Results are compared with a float64 reference computed on the very same input values, so the
table bounds only the kernels' own arithmetic. It is keyed by the dtype of the result compared.
The absolute part scales with `scale`, the magnitude of the largest terms that were summed or
cancelled (by default the reference's max |value|; for log-probs, the max |logit|, since
logprob = z_t - logsumexp(z) cancels terms that size): rounding error is relative to those terms. A scale below 1 is kept as
it is (raising it to 1 let a gradient of size 0.2 be off by 5% in bf16); only an all-zero
reference falls back to an absolute bound.
"""
import torch

TOLERANCES = {
    # float64 results (CPU path only): the same math as the reference in another summation
    # order; ~1e-16 per operation over <= 1e5 terms leaves many orders of margin.
    torch.float64: (1e-10, 1e-9),
    # float32 results (fp32 inputs, and log-probs of bf16 inputs): fp32 accumulation over
    # H <= 576 products and V <= 49152 exponentials, eps 6e-8, grows to ~1e-6 of the scale;
    # 2e-5 allows the worst row of sums that size without hiding a wrong term (>= 1e-3).
    torch.float32: (2e-5, 1e-4),
    # bfloat16 results (gradients of bf16 inputs): computed in fp32, then rounded once to bf16,
    # whose spacing is 2^-8 = 4e-3 relative; 1e-2 is two to three bf16 steps.
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual, expected, scale=None, what=""):
    """|actual - expected| <= atol * scale + rtol * |expected|, elementwise; expected in float64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[actual.dtype]
    exp = expected.detach().to(torch.float64)
    act = actual.detach().to(torch.float64)
    if scale is None:
        scale = exp.abs().max().item() if exp.numel() else 1.0
    scale = float(scale) or 1.0  # all-zero expected: absolute
    err = (act - exp).abs()
    bound = atol * scale + rtol * exp.abs()
    assert torch.isfinite(act).all(), f"{what}: non-finite values"
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(f"{what}: max error {err.max().item():.3e} (atol {atol} x scale {scale:.3g}, "
                             f"rtol {rtol}); worst at flat index {i}: {act.flatten()[i].item()} vs "
                             f"{exp.flatten()[i].item()}")
