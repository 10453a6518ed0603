"""GPU-path decisions that can be checked without a GPU: which code a GPU gets, the device
guard, grid limits, flags for older GPUs, NaN-poisoned outputs (docs/gpu.md)."""
from __future__ import annotations

import pytest
import torch

import fastntxent._extension as ext
from fastntxent import backends


def test_cuda_code_rule_sass_and_ptx():
    sass, ptx = (80, 90), (90,)
    assert ext.cuda_code_missing((8, 0), sass, ptx) is None      # A100: sm_80 code
    assert ext.cuda_code_missing((8, 6), sass, ptx) is None      # RTX 30: sm_80 code runs on 8.6
    assert ext.cuda_code_missing((8, 9), sass, ptx) is None      # L4 / RTX 40
    assert ext.cuda_code_missing((9, 0), sass, ptx) is None      # H100
    assert ext.cuda_code_missing((10, 0), sass, ptx) is None     # B200: PTX of compute_90, JIT
    assert ext.cuda_code_missing((12, 0), sass, ptx) is None     # RTX 50: PTX
    for old in ((7, 5), (7, 0), (6, 1)):
        why = ext.cuda_code_missing(old, sass, ptx)
        assert why is not None and f"{old[0]}.{old[1]}" in why and "sm_80" in why and "FASTNTXENT_CUDA_ARCHS" in why
    assert "nothing" in ext.cuda_code_missing((9, 0), (), ())


@pytest.mark.skipif(not ext.has_cuda_kernels(), reason="the extension was built without CUDA kernels")
def test_cuda_build_records_its_code():
    assert ext.CUDA_SASS and ext.CUDA_PTX, "the CUDA build must record sass/ptx lists"
    assert max(ext.CUDA_PTX) == max(ext.CUDA_SASS), "PTX of the newest arch, for later GPUs"


def test_backend_cuda_refuses_a_gpu_without_code(monkeypatch):
    monkeypatch.setattr(ext, "_HAS_CUDA", True)
    monkeypatch.setattr(ext, "CUDA_SASS", (80, 90))
    monkeypatch.setattr(ext, "CUDA_PTX", (90,))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    why = backends.refusal("cuda", "self", torch.device("cuda:0"), torch.float16)
    assert why is not None and "7.5" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert backends.refusal("cuda", "self", torch.device("cuda:0"), torch.float16) is None
    assert "self-similarity family only" in backends.refusal("cuda", "cross", torch.device("cuda:0"), torch.float16)


triton_ok = backends._triton_import_error() is None
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not importable")


@needs_triton
def test_device_guard_targets_the_inputs_gpu():
    from fastntxent._triton import common

    guard = common.device_guard(torch.device("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with common.device_guard(torch.device("cpu")):
        pass  # a no-op context for the interpreter


@needs_triton
def test_every_triton_launch_is_guarded():
    """Each kernel launch in the launchers sits inside `with common.device_guard(...)`."""
    import ast
    import inspect

    from fastntxent._triton import cross_similarity, self_similarity

    for module in (self_similarity, cross_similarity):
        tree = ast.parse(inspect.getsource(module))
        launches, guarded = 0, 0
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and "device_guard" in ast.unparse(node.items[0]):
                guarded += sum(isinstance(n, ast.Subscript) and ast.unparse(n).endswith("[grid]")
                               for n in ast.walk(node))
            if isinstance(node, ast.Subscript) and ast.unparse(node).endswith("[grid]"):
                launches += 1
        assert launches > 0 and launches == guarded, module.__name__


@needs_triton
def test_kernel_flags_per_gpu_generation():
    from fastntxent._triton import common

    for dtype in (torch.bfloat16, torch.float16):
        f = common.kernel_flags(dtype, 128, (7, 5))   # T4: no bf16 MMA, no tf32
        assert f.cast_f32 and f.prec == "ieee" and not f.h_bf16
        f = common.kernel_flags(dtype, 128, (8, 0))
        assert not f.cast_f32 and f.h_bf16 == (dtype == torch.float16)
    common.set_fp32_precision("tf32")
    try:
        assert common.kernel_flags(torch.float32, 128, (7, 5)).prec == "ieee"
        assert common.kernel_flags(torch.float32, 128, (9, 0)).prec == "tf32"
    finally:
        common.set_fp32_precision(None)
    # tl.dot needs every dimension >= 16: D < 16 is padded to a 16-wide tile.
    assert common.kernel_flags(torch.bfloat16, 1, (9, 0)).block_d >= 16


@needs_triton
def test_grid_limits_are_a_clear_error():
    from fastntxent._triton import common

    common.check_grid((2**31 - 1, 64, 65535))
    with pytest.raises(ValueError, match="grid"):
        common.check_grid((10, 1, 65536))
    with pytest.raises(ValueError, match="grid"):
        common.check_grid((2**31, 1))


@needs_triton
def test_old_gpu_refused_by_triton(monkeypatch):
    from fastntxent._triton import common

    monkeypatch.setattr(common, "device_capability", lambda device: (7, 0))
    why = backends.refusal("triton", "self", torch.device("cuda:0"), torch.float16)
    assert why is not None and "7.5" in why
