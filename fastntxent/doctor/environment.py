"""Versions and devices of this machine: what a bug report needs."""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import re

import torch

import fastntxent

_COMPILER_PATTERNS = (
    (rb"GCC: \([^)]*\) [0-9][0-9.]*", "gcc"),
    (rb"clang version [0-9][0-9.]*", "clang"),
    (rb"Cuda compilation tools, release [0-9.]+, V[0-9.]+", "nvcc"),
)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_driver_version() -> str:
    """The installed CUDA driver's version (cuDriverGetVersion from libcuda), or why not."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
        return "unknown (cuDriverGetVersion failed)"
    return "no CUDA driver found"


def extension_compilers() -> str:
    """The compilers named in the built extension fastntxent._C (its .comment section and
    nvcc's identification string), or why they are unknown."""
    spec = importlib.util.find_spec("fastntxent._C")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return "unknown (fastntxent._C is not built)"
    with open(spec.origin, "rb") as f:
        data = f.read()
    found = []
    for pattern, _ in _COMPILER_PATTERNS:
        match = re.search(pattern, data)
        if match:
            found.append(match.group().decode(errors="replace"))
    return "; ".join(found) if found else "unknown"


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def versions() -> dict:
    return {
        "fastntxent": fastntxent.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
        "cuda_driver": cuda_driver_version(),
        "extension_compiler": extension_compilers(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "cpu": f"{cpu_name()} ({torch.get_num_threads()} torch threads)",
    }


def cuda_devices() -> list[dict]:
    """Name, compute capability, SM count and memory of every CUDA device (empty without one)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                    "sm_count": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return out
