"""Large M on a GPU (skipped without one): 2N·2N passes 2³¹ at M = 46 341, so any 32-bit
index arithmetic over the similarity matrix would break here. The float64 check is chunked:
row logsumexps of all rows, then losses and gradients of a sample of rows."""
import pytest
import torch

import fastntxent as fx
from helpers import BACKEND_CASES, assert_rel_close

GPU_CASES = [c for c in BACKEND_CASES if c.values[1] == "cuda"]


def chunked_reference(u, labels, tau, rows, chunk=4096):
    """ℓ_i for all i and ∂(Σ_i w_i ℓ_i)/∂u_k for k in `rows`, float64, O(chunk·M) memory."""
    M = u.shape[0]
    lse = torch.empty(M, dtype=torch.float64, device=u.device)
    pos_mean = torch.empty_like(lse)
    idx = torch.arange(M, device=u.device)
    for c0 in range(0, M, chunk):
        s = u[c0:c0 + chunk] @ u.T / tau
        self_mask = idx[c0:c0 + chunk, None] == idx[None, :]
        pos = (labels[c0:c0 + chunk, None] == labels[None, :]) & ~self_mask
        lse[c0:c0 + chunk] = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), 1)
        pos_mean[c0:c0 + chunk] = (s * pos).sum(1) / pos.sum(1).clamp_min(1)
    loss = lse - pos_mean
    cnt = torch.bincount(labels)[labels] - 1
    w = 1.0 / M  # every row has a positive in these inputs: mean over M anchors
    grads = []
    for k in rows.tolist():
        s = u[k] @ u.T / tau  # s_kj = s_jk
        not_self = idx != k
        pos = (labels == labels[k]) & not_self
        g_kj = w * (torch.exp(s - lse[k]) * not_self - pos / cnt[k])
        g_jk = w * (torch.exp(s - lse) * not_self - pos / cnt)
        grads.append(((g_kj + g_jk) @ u) / tau)
    return loss, torch.stack(grads)


@pytest.mark.parametrize("backend,device", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_m_matches_chunked_reference(backend, device, dtype):
    M, D, tau = 46_400, 64, 0.05
    z = torch.randn(M, D, device=device, dtype=torch.float64)
    labels = torch.arange(M // 2, device=device).repeat(2)
    zq = z.to(dtype)
    u = torch.nn.functional.normalize(zq.double(), dim=1)  # what the kernel sees, in float64
    rows = torch.randint(0, M, (16,), device=device)
    ref_loss, ref_grad = chunked_reference(u, labels, tau, rows)
    uu = u.to(dtype).requires_grad_(True)
    loss = fx.supcon(uu, labels, tau, normalize=False, backend=backend, reduction="none")
    loss.mean().backward()
    tol = 1e-3 if dtype == torch.float32 else 2e-2  # fp32 may run as tf32 on the GPU
    assert torch.isfinite(loss).all() and torch.isfinite(uu.grad).all()
    assert_rel_close(loss, ref_loss, tol, "loss")
    assert_rel_close(uu.grad[rows], ref_grad, tol, "grad rows")
