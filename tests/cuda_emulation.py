"""The hand-written CUDA kernels under host emulation (csrc/emulation): build, load, run.

The kernel source csrc/cuda/self_similarity_kernels.cu, unchanged, is compiled by the host C++
compiler against csrc/emulation/cuda_host_emulation.h (csrc/emulation/self_similarity_emulated.cpp
includes it) into a small shared library with a C interface, in three variants:
  plain  -O1 -g
  tsan   -fsanitize=thread
  asan   -fsanitize=address,undefined
and loaded with ctypes. A sanitizer runtime must be the first library of the process, so the
sanitizer variants run in a child python started with LD_PRELOAD (`python tests/cuda_emulation.py
run LIB CASES OUT`), which imports numpy but not torch. Builds are cached in
build/cuda_emulation/, keyed by the sources, the flags and the compiler.

This module imports numpy only; the tests (tests/test_cuda_emulation.py) bring torch and the
float64 reference.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "csrc" / "emulation"
EMULATION_SOURCES = [EMULATION / "cuda_host_emulation.h", *sorted((EMULATION / "include").glob("*.h"))]
KERNEL_SOURCES = [
    *EMULATION_SOURCES,
    EMULATION / "self_similarity_emulated.cpp",
    ROOT / "csrc" / "cuda" / "self_similarity_kernels.cu",
    ROOT / "csrc" / "cuda" / "self_similarity_kernels.h",
    ROOT / "csrc" / "cuda" / "launch.h",
]
RULES_SOURCE = Path(__file__).resolve().parent / "cuda_emulation_rules.cpp"
BUILD_DIR = Path(os.environ.get("FASTNTXENT_EMULATION_BUILD_DIR", ROOT / "build" / "cuda_emulation"))
CXX = os.environ.get("CXX", "g++")

COMMON_FLAGS = ["-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                "-I", str(EMULATION / "include")]
SANITIZER_FLAGS = {
    "plain": [],
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
}
SANITIZER_RUNTIME = {"tsan": "libtsan.so", "asan": "libasan.so"}

# Element type codes of the C interface (self_similarity_emulated.cpp).
TYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def toolchain_problem() -> str | None:
    """None if the host compiler builds C++20 with <barrier>, else why not."""
    if shutil.which(CXX) is None:
        return f"no host C++ compiler ({CXX!r} not found)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "barrier.cpp"
        src.write_text("#include <barrier>\n#include <thread>\n"
                       "int main() { std::barrier<> b(2); std::thread t([&] { b.arrive_and_wait(); });"
                       " b.arrive_and_wait(); t.join(); }\n")
        r = subprocess.run([CXX, "-std=c++20", "-pthread", str(src), "-o", str(Path(tmp) / "barrier")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"{CXX} cannot build C++20 <barrier> (std::barrier): {r.stderr.strip()[:500]}"
    return None


@functools.lru_cache(maxsize=None)
def sanitizer_problem(variant: str) -> str | None:
    """None if the sanitizer variant can be built and preloaded here, else why not."""
    runtime = sanitizer_runtime(variant)
    if runtime is None or not Path(runtime).is_file():
        return f"{CXX} has no {SANITIZER_RUNTIME[variant]}"
    return None


def sanitizer_runtime(variant: str) -> str | None:
    name = SANITIZER_RUNTIME.get(variant)
    if name is None:
        return None
    r = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) else None


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pending: dict[Path, concurrent.futures.Future] = {}
_pending_lock = threading.Lock()


def _compile(out: Path, main: Path, flags: list[str], shared: bool) -> Path:
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    cmd = [CXX, *flags, *(["-fPIC", "-shared"] if shared else []), str(main), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"emulated build failed:\n{' '.join(cmd)}\n{r.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builders of the same key agree
    return out


def _build(kind: str, sources: list[Path], main: Path, flags: list[str], shared: bool,
           wait: bool = True) -> Path | None:
    h = hashlib.sha256()
    for s in sources:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    h.update(json.dumps([flags, shared, _compiler_id()]).encode())
    out = BUILD_DIR / f"{kind}-{h.hexdigest()[:16]}{'.so' if shared else ''}"
    if out.exists():
        return out
    global _pool
    with _pending_lock:
        future = _pending.get(out)
        if future is None:
            if _pool is None:  # two compilers at a time (CI has 2 cores)
                _pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
            future = _pending[out] = _pool.submit(_compile, out, main, flags, shared)
    return future.result() if wait else None


def build_kernels(variant: str = "plain", defines: tuple[str, ...] = (), wait: bool = True) -> Path:
    """The emulated kernel library for a variant ("plain", "tsan", "asan"), with optional
    -D switches (the planted-defect tests). Returns the .so path (cached); wait=False only
    starts the build in the background."""
    flags = COMMON_FLAGS + SANITIZER_FLAGS[variant] + [f"-D{d}" for d in defines]
    kind = "-".join(["self_similarity_emulated", variant, *[d.lower() for d in defines]])
    return _build(kind, KERNEL_SOURCES, EMULATION / "self_similarity_emulated.cpp", flags, shared=True, wait=wait)


def build_rules(variant: str = "plain", wait: bool = True) -> Path:
    """The executable of small kernels that break the emulator's rules on purpose."""
    flags = COMMON_FLAGS + SANITIZER_FLAGS[variant]
    return _build(f"emulation_rules-{variant}", [*EMULATION_SOURCES, RULES_SOURCE], RULES_SOURCE, flags,
                  shared=False, wait=wait)


def sanitizer_env(variant: str, extra: dict | None = None) -> dict:
    """Environment of a child process running a sanitizer variant."""
    env = dict(os.environ)
    runtime = sanitizer_runtime(variant)
    if runtime is not None:
        env["LD_PRELOAD"] = runtime
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:second_deadlock_stack=1"
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------
# Running (numpy arrays; bf16 as uint16 bit patterns)
# ---------------------------------------------------------------------------------------
_f32p = ctypes.POINTER(ctypes.c_float)


def _ptr(a: np.ndarray | None):
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


class Kernels:
    """The C interface of an emulated kernel library: the launchers of
    csrc/cuda/self_similarity_kernels.h on host memory."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        ci = ctypes.c_int
        self.lib.fastntxent_emulated_self_forward.argtypes = [vp, i64, i64, i64, ci, vp, vp, i64, ci,
                                                              vp, vp, vp, vp, vp]
        self.lib.fastntxent_emulated_self_backward.argtypes = [vp, i64, i64, i64, ci, vp, vp, i64, ci,
                                                               vp, vp, vp, vp]
        for name in ("float_to_half", "float_to_bfloat16", "half_to_float", "bfloat16_to_float"):
            getattr(self.lib, f"fastntxent_emulated_{name}").argtypes = [vp, vp, i64]

    @staticmethod
    def _check_rows(u: np.ndarray, type_code: int) -> None:
        expected = np.float32 if type_code == 0 else (np.float16 if type_code == 1 else np.uint16)
        assert u.ndim == 2 and u.dtype == expected, (u.shape, u.dtype, type_code)
        assert u.strides[1] == u.itemsize, "unit column stride required"

    def forward(self, u: np.ndarray, type_code: int, temperature: float, labels: np.ndarray | None,
                period: int, decoupled: bool = False) -> tuple[np.ndarray, ...]:
        """(lse, pos_sum, pos_count, ps_sum, top1), each (M,) fp32, poisoned with NaN first."""
        self._check_rows(u, type_code)
        M, D = u.shape
        tau = np.array([temperature], dtype=np.float32)
        labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        outs = [np.full(M, np.nan, dtype=np.float32) for _ in range(5)]
        rc = self.lib.fastntxent_emulated_self_forward(_ptr(u), M, D, u.strides[0] // u.itemsize, type_code,
                                                       _ptr(tau), _ptr(labels), period, int(decoupled),
                                                       *map(_ptr, outs))
        if rc != 0:
            raise RuntimeError(f"self_forward returned cudaError {rc}")
        return tuple(outs)

    def backward(self, u: np.ndarray, type_code: int, temperature: float, labels: np.ndarray | None,
                 period: int, lse: np.ndarray, grad_lse: np.ndarray, grad_pos: np.ndarray,
                 decoupled: bool = False) -> np.ndarray:
        """grad_u (M, D) fp32, poisoned with NaN first."""
        self._check_rows(u, type_code)
        M, D = u.shape
        tau = np.array([temperature], dtype=np.float32)
        labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        rows = [np.ascontiguousarray(a, dtype=np.float32) for a in (lse, grad_lse, grad_pos)]
        grad = np.full((M, D), np.nan, dtype=np.float32)
        rc = self.lib.fastntxent_emulated_self_backward(_ptr(u), M, D, u.strides[0] // u.itemsize, type_code,
                                                        _ptr(tau), _ptr(labels), period, int(decoupled),
                                                        *map(_ptr, rows),
                                                        _ptr(grad))
        if rc != 0:
            raise RuntimeError(f"self_backward returned cudaError {rc}")
        return grad

    def convert(self, name: str, x: np.ndarray) -> np.ndarray:
        """The emulation's 16-bit conversions: float_to_half / float_to_bfloat16 (float32 ->
        uint16 bits), half_to_float / bfloat16_to_float (uint16 bits -> float32)."""
        src_dtype, dst_dtype = (np.float32, np.uint16) if name.startswith("float_to") else (np.uint16, np.float32)
        x = np.ascontiguousarray(x, dtype=src_dtype)
        out = np.empty(x.shape, dtype=dst_dtype)
        getattr(self.lib, f"fastntxent_emulated_{name}")(_ptr(x), _ptr(out), x.size)
        return out


# ---------------------------------------------------------------------------------------
# Cases in a file, for a child process (the sanitizer variants)
# ---------------------------------------------------------------------------------------
def write_cases(path: Path, cases: list[dict]) -> None:
    """cases: dicts with u (np, 2-D), type (int code), tau, labels (np or None), period,
    grad_lse, grad_pos (np (M,)), optionally decoupled (bool, default False)."""
    arrays, meta = {}, []
    for i, c in enumerate(cases):
        arrays[f"u{i}"] = c["u"]
        arrays[f"grad_lse{i}"] = c["grad_lse"]
        arrays[f"grad_pos{i}"] = c["grad_pos"]
        if c["labels"] is not None:
            arrays[f"labels{i}"] = c["labels"]
        meta.append({"type": c["type"], "tau": c["tau"], "period": c["period"], "labels": c["labels"] is not None,
                     "decoupled": bool(c.get("decoupled", False))})
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def run_cases(lib: Path | str, cases_path: Path | str, out_path: Path | str) -> None:
    """Forward, then backward with the forward's lse (as autograd does), for every case."""
    kernels = Kernels(lib)
    data = np.load(cases_path)
    meta = json.loads(str(data["meta"]))
    out = {}
    for i, m in enumerate(meta):
        u = data[f"u{i}"]
        labels = data[f"labels{i}"] if m["labels"] else None
        dcl = m.get("decoupled", False)
        stats = kernels.forward(u, m["type"], m["tau"], labels, m["period"], dcl)
        for name, a in zip(("lse", "pos_sum", "pos_count", "ps_sum", "top1"), stats):
            out[f"{name}{i}"] = a
        out[f"grad{i}"] = kernels.backward(u, m["type"], m["tau"], labels, m["period"], stats[0],
                                           data[f"grad_lse{i}"], data[f"grad_pos{i}"], dcl)
    np.savez(out_path, **out)


def run_cases_in_child(lib: Path, variant: str, cases_path: Path, out_path: Path, timeout: float = 600,
                       env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `run_cases` in a child python with the variant's sanitizer runtime preloaded."""
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), "run", str(lib), str(cases_path),
                           str(out_path)], env=sanitizer_env(variant, env_extra), capture_output=True, text=True,
                          timeout=timeout)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "run":
        run_cases(*sys.argv[2:])
    else:
        sys.exit("usage: python tests/cuda_emulation.py run LIB CASES.npz OUT.npz")
