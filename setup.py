"""Build of fastntxent: the Python package plus the compiled extension `fastntxent._C`.

The extension always holds the fused C++ CPU kernels. Environment switches:
  FASTNTXENT_SKIP_CUDA=1    never build CUDA kernels
  FASTNTXENT_FORCE_CUDA=1   build CUDA kernels even where torch sees no GPU
  FASTNTXENT_CUDA_ARCHS     ";"-separated compute capabilities (default "80;90")
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home():
    """Set CUDA_HOME when it is not set: torch guesses it from the directory of `nvcc` on PATH,
    which is wrong for a link or wrapper script such as /usr/local/bin/nvcc (it would look for
    the CUDA headers in /usr/local/include)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:  # nvcc may also be a wrapper script
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()  # before torch.utils.cpp_extension reads it at import

from torch.utils import cpp_extension  # noqa: E402


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    if os.environ.get("FASTNTXENT_SKIP_CUDA") == "1":
        return False
    if not _sources("csrc/cuda/*.cu"):
        return False
    if os.environ.get("FASTNTXENT_FORCE_CUDA") == "1":
        return True
    import torch

    # Needs nvcc and a torch built with CUDA (a CPU-only torch cannot link CUDA code);
    # no GPU is needed to compile.
    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    cxx_flags = ["-O3", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "fastntxent._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    archs = [a.strip() for a in os.environ.get("FASTNTXENT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = sorted({a for a in archs if a}, key=int)
    # Machine code for each listed GPU, plus PTX of the newest one so that later GPUs
    # (sm_100, sm_120, ...) JIT-compile it; the list is recorded in the module
    # (fastntxent._C.cuda_sass / cuda_ptx) for backend="cuda" to refuse a GPU it has no code for.
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    arch_macros = [("FASTNTXENT_CUDA_SASS", "_".join(archs)), ("FASTNTXENT_CUDA_PTX", archs[-1])]
    import torch

    include_dirs = []
    # The pip CUDA wheels ship headers (cusparse.h, ...) that torch's headers include.
    nvidia_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(nvidia_inc):
        include_dirs.append(os.path.abspath(nvidia_inc))
    return cpp_extension.CUDAExtension(
        "fastntxent._C",
        sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("FASTNTXENT_WITH_CUDA", "1"), *arch_macros],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", *gencode]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["fastntxent", "fastntxent.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
