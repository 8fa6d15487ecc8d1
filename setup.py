"""Builds csrc/ into srlm_engine._C when it holds C++ sources; metadata lives in pyproject.toml.

The extension compiles against the torch this process imports. An isolated build (plain
`pip install .`, `python -m build`) gets torch from pyproject's build requirements; a build with
--no-build-isolation uses the torch already installed, so the extension links against the torch
that runs it. Without torch there is nothing to compile against: the build stops and says so.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
if sources:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        sys.exit(f"srlm-engine: building its C++ extension (csrc/) needs torch, which this build cannot import "
                 f"({e}). Install torch first (pip install 'torch>=2.6'), then build against it: "
                 f"pip install --no-build-isolation .")

    # With ninja on PATH, BuildExtension compiles the sources in parallel (one job per core and
    # more); without it, one after the other. The ninja wheel keeps its binary in ninja.BIN_DIR,
    # which is not on PATH when pip runs this file from outside the environment's bin/.
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass

    ext_modules = [CppExtension("srlm_engine._C", sources, extra_compile_args=["-O3", "-fopenmp"],
                                extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
