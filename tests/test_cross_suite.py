"""Shared suite of the cross-similarity family (MoCo InfoNCE in-batch and with a queue, CLIP)
over every backend that implements it: loss, ∂q, ∂k and ∂τ (or ∂ logit_scale, as a tensor
that requires grad) against the float64 reference on fresh random inputs, every reduction,
an upstream gradient that is not 1. A backend joins by adding a line to helpers.BACKEND_CASES."""
from __future__ import annotations

import pytest
import torch

from helpers import CROSS_BACKEND_CASES, assert_rel_close, check_against_reference, cross_family_inputs, loss_and_grads

# (M, D, K, τ): one row, two rows, odd sizes across block edges, queues longer than the batch
# (D = 1, where every gradient is 0 in theory, has its own tests in the backend files).
CPU_SHAPES = [(1, 3, 1, 0.5), (2, 2, 5, 0.1), (7, 5, 3, 0.01), (67, 9, 300, 0.2), (130, 33, 257, 0.07),
              (300, 17, 50, 1.0)]
INTERPRET_SHAPES = [(1, 3, 1, 0.5), (2, 2, 5, 0.1), (7, 5, 3, 0.01), (37, 2, 96, 5.0), (64, 77, 45, 0.01)]
CUDA_SHAPES = CPU_SHAPES + [(1000, 128, 4096, 0.2), (4099, 77, 999, 0.01)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["info_nce", "info_nce_queue", "clip"]


def shapes_for(backend, device):
    if device == "cuda":
        return CUDA_SHAPES
    return INTERPRET_SHAPES if backend == "triton" else CPU_SHAPES


@pytest.mark.parametrize("backend,device", CROSS_BACKEND_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(backend, device, mode, dtype, reduction):
    if mode == "clip" and reduction != "mean":
        pytest.skip("clip_loss is a mean")
    for M, D, K, tau in shapes_for(backend, device):
        z, call = cross_family_inputs(mode, M, D, K, device)
        check_against_reference(call, z, tau, dtype, device, reduction, backend, split=M, upstream_rows=M,
                                what=f"{mode} M={M} D={D} K={K} tau={tau}")


@pytest.mark.parametrize("backend,device", [c for c in CROSS_BACKEND_CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("mode", MODES)
def test_float64_tight(backend, device, mode):
    for M, D, K, tau in shapes_for(backend, device):
        z, call = cross_family_inputs(mode, M, D, K, device)
        up = torch.rand(M, dtype=torch.float64)
        reduction = "mean" if mode == "clip" else "none"
        ref = loss_and_grads(call, z, tau, torch.float64, device, "reference", reduction, up)
        got = loss_and_grads(call, z, tau, torch.float64, device, backend, reduction, up)
        for name, g, r in zip(("loss", "dz", "dtau"), got, ref):
            assert_rel_close(g, r, 1e-10, f"{mode} {name} M={M} D={D} K={K}")
