"""Builds csrc/ into srlm_engine._C when it holds C++ sources; metadata lives in pyproject.toml."""
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(str(p) for p in Path("csrc").glob("*.cpp"))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("srlm_engine._C", sources, extra_compile_args=["-O3", "-fopenmp"],
                                extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
