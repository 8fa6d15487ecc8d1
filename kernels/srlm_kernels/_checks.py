"""Input checks shared by the kernels' public functions: a clear ValueError before any kernel runs."""
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_backend(backend, device):
    """'auto' -> 'triton' on CUDA tensors, 'torch' (the tiled CPU path) elsewhere."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_number(name, x, want="a finite number > 0", ok=lambda v: math.isfinite(v) and v > 0):
    """A real number (not a bool or a string) that passes `ok`, as a float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not ok(x):
        raise ValueError(f"{name} must be {want}, got {x!r}")
    return float(x)


def check_float(name, x, ndim, dtype=None, device=None):
    """Floating tensor of `ndim` dims (same dtype and device as the first one when given); made contiguous."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype} like the first input")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} like the first input")
    return x.contiguous()


def check_index(name, x, n, device, low, high, ignore_index=None, valid=None, values=True):
    """Integer tensor [n] with values in [low, high) (or == ignore_index; only at `valid` when given).

    The value check syncs the device and cannot be traced: torch.compile skips it here. A custom
    op that takes the tensor runs it inside its own body instead (values=False here), where it
    holds under torch.compile too.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    x = x.to(torch.int64).contiguous()
    if values and not torch.compiler.is_compiling():
        check_index_values(name, x, low, high, ignore_index, valid)
    return x


def check_index_values(name, x, low, high, ignore_index=None, valid=None):
    """Every value of integer tensor x in [low, high), or == ignore_index, or outside `valid`."""
    if not x.numel():
        return
    ok = (x >= low) & (x < high)
    if ignore_index is not None:
        ok |= x == ignore_index
    if valid is not None:
        ok |= ~valid
    if not bool(ok.all()):
        bad = x[~ok][0].item()
        extra = f" or == ignore_index ({ignore_index})" if ignore_index is not None else ""
        raise ValueError(f"{name} must be in [{low}, {high}){extra}; found {bad}")
