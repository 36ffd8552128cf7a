"""Builds condconv_kernels._C from csrc/ with torch.utils.cpp_extension.

Environment:
  CONDCONV_SKIP_CUDA=1   build the CPU extension only, even when torch has CUDA.
  TORCH_CUDA_ARCH_LIST   CUDA architectures to compile for (e.g. "9.0" for H100/H200; "9.0a" adds
                         the wgmma form of the clustered 1x1 kernel, CONDCONV_CUDA_CLUSTER=wgmma,
                         whose code runs on H100/H200 only).
  MAX_JOBS               parallel compile jobs (honoured by torch.utils.cpp_extension).
  CONDCONV_SANITIZE      sanitizers to build with, e.g. "address,undefined": the CPU extension only
                         (no CUDA; OpenMP kept), compiled with -fsanitize=<list> -O1 -g
                         -fno-sanitize-recover=all -fno-omit-frame-pointer. Build it elsewhere than
                         in place (`make test-asan`: build_ext --build-lib build/asan/lib) and load
                         it with the sanitizer runtime preloaded
                         (LD_PRELOAD=$(gcc -print-file-name=libasan.so)).

The CUDA sources in csrc/cuda/ are added only when torch was built with CUDA and CUDA_HOME is
set; otherwise a CppExtension with OpenMP is built. Without the extension at all the package
still imports and runs its reference (and triton) backends.
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def sm90a_only():
    """Whether the build's Hopper code is for sm_90a only (TORCH_CUDA_ARCH_LIST with 9.0a and
    no plain 9.0, as torch's extension builder turns it into -gencode flags): the kernels that
    use wgmma are then compiled in (CONDCONV_SM90A)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    hopper = [f for f in _get_cuda_arch_flags() if "_90" in f]
    return bool(hopper) and all("_90a" in f for f in hopper)


def extension():
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    sanitize = os.environ.get("CONDCONV_SANITIZE", "").strip()
    cxx_flags = ["-O3", "-std=c++17"]
    if os.environ.get("CONDCONV_PORTABLE", "0") != "1":
        cxx_flags.append("-march=native")
    link_flags = []
    if sanitize:
        # -fno-sanitize-recover=all: UBSan aborts on its first report, as ASan does, so that any
        # report fails the run. -O1 (after the -O3 above, so it wins) keeps stack traces exact.
        # -fno-wrapv undoes Python's -fwrapv, under which signed overflow is defined, not checked.
        san = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"]
        cxx_flags += san + ["-fno-omit-frame-pointer", "-O1", "-g", "-fno-wrapv"]
        link_flags += san
    if sys.platform != "darwin":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("CONDCONV_SKIP_CUDA", "0") != "1"
        and bool(cuda_sources)
        and not sanitize
    )
    if with_cuda:
        defines = ["-DCONDCONV_WITH_CUDA"] + (["-DCONDCONV_SM90A"] if sm90a_only() else [])
        return CUDAExtension(
            "condconv_kernels._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + defines,
                                "nvcc": ["-O3", "-std=c++17", "-lineinfo",
                                         "--expt-relaxed-constexpr"] + defines[1:]},
            extra_link_args=link_flags,
        )
    return CppExtension("condconv_kernels._C", cpp_sources,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
