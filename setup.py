"""Build fused_posenc: the Python package plus the C++ (always) and CUDA (when possible) extension.

Environment switches:
  FUSED_POSENC_SKIP_CUDA_BUILD=1   never build the CUDA part (CPU-only extension)
  FUSED_POSENC_SKIP_EXT_BUILD=1    build no extension at all (pure Python; backends cpu/cuda unavailable)
  FUSED_POSENC_CUDA_ARCHS="80;90"  CUDA architectures (default: 80;90)
  MAX_JOBS=N                       parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extensions():
    if _flag("FUSED_POSENC_SKIP_EXT_BUILD"):
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpu_sources:
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and not _flag("FUSED_POSENC_SKIP_CUDA_BUILD") and cpp_extension.CUDA_HOME is not None \
        and torch.version.cuda is not None
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define_macros = [("FUSED_POSENC_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        archs = os.environ.get("FUSED_POSENC_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        # no --use_fast_math: it turns cosf/sinf into __cosf/__sinf, wrong by whole units at RoPE angles of
        # thousands of radians and at TAPA phases of hundreds
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        for a in filter(None, (x.strip() for x in archs)):
            nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        ext = cpp_extension.CUDAExtension("fused_posenc._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
                                          define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                          extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("fused_posenc._C", cpu_sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fused_posenc",
    version="0.1.0",
    description="Exact attention with RoPE/HoPE/FoPE/ALiBi/TAPA fused into FlashAttention-style kernels",
    packages=find_packages(include=["fused_posenc", "fused_posenc.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "ninja", "pybind11"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "numpy", "tqdm"], "bench": ["pytest-benchmark", "matplotlib"],
                    "examples": ["tqdm"], "hf": ["transformers>=5.0,<6"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
