"""Shared test helpers: tolerances by dtype, relative errors that never let NaN pass,
and the list of backends every parametrized test runs over."""
from __future__ import annotations

import os

import pytest
import torch

import fastntxent._extension as ext

# Relative-error bounds per input dtype (SPEC §3 / developers' brief).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64; inf when actual has NaN/inf.

    The floor keeps quantities that are exactly zero in theory (D = 1 gradients through the
    normalisation, say) from turning rounding noise into a huge relative error."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.norm().clamp_min(floor)
    return float((actual - expected).norm() / scale)


def assert_rel_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _cuda_ok():
    return torch.cuda.is_available()


def _triton_ok():
    from fastntxent._dispatch import _triton_available

    return _triton_available()[0]


# (backend, device) pairs; a backend joins the shared suite by adding a line here.
BACKEND_CASES = [
    pytest.param("cpu", "cpu", id="cpu",
                 marks=pytest.mark.skipif(not ext.has_cpu_kernels(), reason="fastntxent._C not built")),
    pytest.param("triton", "cpu", id="triton-interpret",
                 marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not _triton_ok(),
                                          reason="needs TRITON_INTERPRET=1 and fastntxent._triton")),
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=pytest.mark.skipif(not (_cuda_ok() and _triton_ok()), reason="needs a CUDA GPU")),
    pytest.param("cuda", "cuda", id="cuda",
                 marks=pytest.mark.skipif(not (_cuda_ok() and ext.has_cuda_kernels()),
                                          reason="needs a CUDA GPU and the CUDA build")),
]
