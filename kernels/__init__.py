"""srlm_kernels: Triton kernels for the training hot paths, each beside its PyTorch reference.

Depends on torch and triton only. CUDA tensors run the Triton kernels; CPU tensors run the same
tiled algorithm in torch (backend='auto'); backend='triton' on CPU needs TRITON_INTERPRET=1.
"""
if __name__ != "srlm_kernels":
    # This directory imported under its folder name: `python -m ...` from the repo root puts the root
    # on sys.path, and transformers' is_kernels_available() imports a top-level `kernels` (Hugging
    # Face's package of that name). Running the modules again would define the srlm:: custom ops a
    # second time, and torch.library then destroys the first definitions, which srlm_kernels' op
    # objects still point at: their next call reads freed dispatcher memory (a segfault or
    # std::bad_alloc). So `kernels` becomes srlm_kernels itself, submodules included (or stays an
    # empty package where srlm_kernels is not installed).
    import importlib
    import sys

    try:
        _pkg = importlib.import_module("srlm_kernels")
    except ImportError:
        _pkg = None
    if _pkg is not None:
        for _name, _mod in list(sys.modules.items()):
            if _name.startswith("srlm_kernels."):
                sys.modules.setdefault(__name__ + _name[len("srlm_kernels"):], _mod)
        sys.modules[__name__] = _pkg
else:
    from .dpo_loss import dpo_loss
    from .fused_linear_dpo import fused_linear_dpo
    from .fused_logprob import fused_linear_logprob, sequence_logprobs

    __all__ = ["dpo_loss", "fused_linear_dpo", "fused_linear_logprob", "sequence_logprobs"]
