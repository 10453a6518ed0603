"""No silent wrong answer from non-finite or extreme inputs (docs/maths.md §5).

A NaN or inf anywhere in the embeddings (or the queue) makes the loss, every per-row loss,
every statistic and every gradient NaN, in every backend and reduction; rows of huge or tiny
magnitude are normalised scale-safely and match the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

import fastntxent as fx
from helpers import BACKEND_CASES, assert_rel_close

NAN, INF = float("nan"), float("inf")


def _calls():
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    queue = torch.randn(5, 6)
    return {
        "nt_xent": lambda z, t, **kw: fx.nt_xent(z[:4], z[4:], t, **kw),
        "multiview": lambda z, t, **kw: fx.multiview_nt_xent(z.view(2, 4, 6), t, **kw),
        "supcon": lambda z, t, **kw: fx.supcon(z, labels.to(z.device), t, **kw),
        "info_nce": lambda z, t, **kw: fx.info_nce(z[:4], z[4:], None, t, **kw),
        "info_nce_queue": lambda z, t, **kw: fx.info_nce(z[:4], z[4:], queue.to(z.device, z.dtype), t, **kw),
        "clip": lambda z, t, **kw: fx.clip_loss(z[:4], z[4:], 1 / t, **{k: v for k, v in kw.items() if k != "reduction"}),
    }


def _poisoned_inputs():
    one_nan = torch.randn(8, 6)
    one_nan[2, 3] = NAN
    one_inf = torch.randn(8, 6)
    one_inf[5, 0] = INF
    neg_inf = torch.randn(8, 6)
    neg_inf[7, 5] = -INF
    return {"one_nan": one_nan, "all_nan": torch.full((8, 6), NAN), "one_inf": one_inf, "neg_inf": neg_inf}


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("loss", list(_calls()))
@pytest.mark.parametrize("kind", list(_poisoned_inputs()))
@pytest.mark.parametrize("normalize", [True, False])
def test_nonfinite_input_gives_nan_everywhere(backend, device, loss, kind, normalize):
    if backend == "cuda" and loss.startswith(("info", "clip")):
        pytest.skip("the CUDA C++ kernels cover the self family")
    call = _calls()[loss]
    z = _poisoned_inputs()[kind].to(device).requires_grad_(True)
    t = torch.tensor(0.3, device=device, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        z.grad = t.grad = None
        out = call(z, t, normalize=normalize, reduction=reduction, backend=backend)
        assert torch.isnan(out).all(), f"{loss} {kind} {reduction}: {out}"
        out.sum().backward()
        assert torch.isnan(z.grad).all(), f"{loss} {kind} {reduction}: dz {z.grad}"
        assert torch.isnan(t.grad), f"{loss} {kind} {reduction}: dtau {t.grad}"
    _, stats = call(z.detach(), 0.3, normalize=normalize, backend=backend, return_stats=True)
    assert torch.isnan(stats["top1_accuracy"])


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_nan_in_queue_reaches_every_query(backend, device):
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels cover the self family")
    queue = torch.randn(7, 6, device=device)
    queue[4, 1] = NAN
    q = torch.randn(4, 6, device=device, requires_grad=True)
    loss = fx.info_nce(q, torch.randn(4, 6, device=device), queue, 0.2, reduction="none", backend=backend)
    assert torch.isnan(loss).all()
    loss.sum().backward()
    assert torch.isnan(q.grad).all()


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e35])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_and_tiny_rows_match_the_reference(backend, device, scale, dtype):
    """Rows of magnitude 1e20 (squared norm overflows fp32) and 1e-20 (underflows): the
    normalisation is scale-safe, so the loss is that of the unit rows."""
    z64 = torch.randn(8, 6, dtype=torch.float64)
    z = (z64 * scale).to(dtype)
    if not torch.isfinite(z).all():
        pytest.skip("not representable in this dtype")
    ref = fx.supcon(z.double(), torch.arange(8) % 3, 0.2, backend="reference")
    z = z.to(device).requires_grad_(True)
    got = fx.supcon(z, torch.arange(8, device=device) % 3, 0.2, backend=backend)
    got.backward()
    assert torch.isfinite(z.grad).all()
    assert_rel_close(got, ref, 1e-5 if dtype == torch.float32 else 2e-2, f"scale {scale}")


def test_zero_row_is_finite():
    """An all-zero row normalises to zero (max(‖z‖, eps)), not NaN: the loss is finite."""
    z = torch.randn(8, 6)
    z[3] = 0
    for backend in ("cpu", "reference"):
        assert torch.isfinite(fx.nt_xent(z[:4], z[4:], 0.5, backend=backend))
