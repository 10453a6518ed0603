"""Large M against a chunked float64 reference (no M×M matrix is held at once).

Used for the GPU case past the 2³¹ index line (M = 65 536 rows, D = 64: 2³² similarities) and
to verify a backend at the timing sizes. Compared, all exactly in float64 from the same
rounded inputs:
- every row's loss (reduction="none", random upstream weights w in [0.5, 1.5));
- the gradient rows of a sample of rows k (the first, the last and random ones):
  ∂L/∂u_k = (1/τ) Σ_j (G_kj + G_jk) u_j with G_ij = w_i (P_ij − [j positive of i]) needs only
  the similarities of row k and every row's logsumexp, then the projection through the
  normalisation (g − u (u·g)) / ‖z_k‖;
- the temperature gradient Σ_i w_i (1/τ)(s_i,pos − Σ_j P_ij s_ij), from per-row sums
  accumulated in the chunked pass.
Cases: nt_xent (self family, positive of row i is i ± N) and info_nce without a queue (cross
family: queries against keys, positive on the diagonal; gradients of both q and k rows).
"""
from __future__ import annotations

import math

import torch

import fastntxent as fx
from fastntxent import reference

from .compare import FLOOR, CaseResult, accumulation_dtype, rel_err, tolerance

CHUNK_ELEMENTS = 1 << 26  # float64 similarities per chunk (512 MiB)


def _row_stats(rows: torch.Tensor, cols: torch.Tensor, tau: float, pos_col: torch.Tensor,
               exclude_self: bool):
    """lse, positive logit and Σ_j P_ij s_ij of every row of rows @ colsᵀ / τ, in chunks."""
    M = rows.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // cols.shape[0])
    lse, pos, ps = (torch.empty(M, dtype=torch.float64, device=rows.device) for _ in range(3))
    for c0 in range(0, M, chunk):
        idx = torch.arange(c0, min(M, c0 + chunk), device=rows.device)
        s = rows[idx] @ cols.T / tau
        pos[idx] = s.gather(1, pos_col[idx, None]).squeeze(1)
        if exclude_self:
            s[torch.arange(len(idx), device=s.device), idx] = -math.inf
        lse[idx] = torch.logsumexp(s, 1)
        p = torch.exp(s - lse[idx, None])
        ps[idx] = torch.where(p > 0, p * s, torch.zeros_like(s)).sum(1)
    return lse, pos, ps


def _project(g: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """∂/∂z from ∂/∂u through u = z / max(‖z‖, eps), row-wise."""
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(reference.EPS)
    return (g - u * (u * g).sum(1, keepdim=True)) / norm


def _sample_rows(M: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    picks = torch.randint(0, M, (max(0, samples - 2),), generator=gen)
    return torch.unique(torch.cat([torch.tensor([0, M - 1]), picks]))


def _verdict(got: dict, want: dict, naive: dict | None, dtype, device_type: str,
             floors: dict) -> CaseResult:
    """Errors of `got` against `want`; for bf16/fp16 the bound also takes twice the error of
    `naive` (the same reference on rows rounded to the dtype, as backend="reference" sees them)."""
    result = CaseResult()
    for name in got:
        floor = floors.get(name, FLOOR)
        base = rel_err(naive[name], want[name], floor) if naive is not None else None
        result.errors[name] = (rel_err(got[name], want[name], floor), tolerance(dtype, device_type, base))
    return result


def _rounded_units(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    low = dtype in (torch.bfloat16, torch.float16)
    return u.to(dtype).double() if low else None


def _inputs(shape, dtype, device, gen):
    """Fresh random rows rounded to dtype: (leaf in dtype, the same values in float64)."""
    z = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return z.clone().requires_grad_(True), z.double()


def nt_xent_sampled(backend: str, device, dtype: torch.dtype, N: int, D: int, tau: float, *,
                    samples: int = 256, seed: int = 0) -> CaseResult:
    """nt_xent on 2N rows against the chunked float64 reference (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    M = 2 * N
    leaf, z = _inputs((M, D), dtype, device, gen)
    w = (torch.rand(M, generator=gen, dtype=torch.float64) + 0.5).to(device)
    k = _sample_rows(M, samples, gen).to(device)
    t = torch.tensor(tau, dtype=accumulation_dtype(dtype), device=device, requires_grad=True)
    try:
        loss = fx.nt_xent(leaf[:N], leaf[N:], t, backend=backend, reduction="none")
        (loss * w.to(loss.dtype)).sum().backward()
    except Exception as exc:  # noqa: BLE001
        return CaseResult(message=f"{type(exc).__name__}: {exc}"[:300])
    u = reference.normalize_rows(z)
    want = _nt_xent_expected(u, z, w, k, tau, N)
    rounded = _rounded_units(u, dtype)
    naive = _nt_xent_expected(rounded, z, w, k, tau, N) if rounded is not None else None
    got = {"loss": loss, "dz[sampled rows]": leaf.grad[k], "dtemperature": t.grad}
    floors = {"loss": math.sqrt(M) / tau, "dtemperature": float(w.sum()) / tau ** 2}
    return _verdict(got, want, naive, dtype, torch.device(device).type, floors)


def _nt_xent_expected(u, z, w, k, tau: float, N: int) -> dict:
    M = u.shape[0]
    idx = torch.arange(M, device=u.device)
    partner = (idx + N) % M
    lse, pos, ps = _row_stats(u, u, tau, partner, exclude_self=True)
    s = u[k] @ u.T / tau  # (samples, M), s_kj = s_jk
    not_self = idx[None, :] != k[:, None]
    coef = (w[k, None] * torch.exp(s - lse[k, None]) + w[None, :] * torch.exp(s - lse[None, :])) * not_self
    coef = coef - (w[k] + w[partner[k]])[:, None] * (idx[None, :] == partner[k][:, None])
    return {"loss": lse - pos, "dz[sampled rows]": _project(coef @ u / tau, u[k], z[k]),
            "dtemperature": (w * (pos - ps)).sum() / tau}


def info_nce_sampled(backend: str, device, dtype: torch.dtype, M: int, D: int, tau: float, *,
                     samples: int = 256, seed: int = 0) -> CaseResult:
    """info_nce in-batch (M queries, M keys) against the chunked float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    q_leaf, q = _inputs((M, D), dtype, device, gen)
    k_leaf, k = _inputs((M, D), dtype, device, gen)
    w = (torch.rand(M, generator=gen, dtype=torch.float64) + 0.5).to(device)
    r = _sample_rows(M, samples, gen).to(device)
    t = torch.tensor(tau, dtype=accumulation_dtype(dtype), device=device, requires_grad=True)
    try:
        loss = fx.info_nce(q_leaf, k_leaf, None, t, backend=backend, reduction="none")
        (loss * w.to(loss.dtype)).sum().backward()
    except Exception as exc:  # noqa: BLE001
        return CaseResult(message=f"{type(exc).__name__}: {exc}"[:300])
    uq, uk = reference.normalize_rows(q), reference.normalize_rows(k)
    want = _info_nce_expected(uq, uk, q, k, w, r, tau)
    naive = None
    if _rounded_units(uq, dtype) is not None:
        naive = _info_nce_expected(_rounded_units(uq, dtype), _rounded_units(uk, dtype), q, k, w, r, tau)
    got = {"loss": loss, "dq[sampled rows]": q_leaf.grad[r], "dk[sampled rows]": k_leaf.grad[r],
           "dtemperature": t.grad}
    floors = {"loss": math.sqrt(M) / tau, "dtemperature": float(w.sum()) / tau ** 2}
    return _verdict(got, want, naive, dtype, torch.device(device).type, floors)


def _info_nce_expected(uq, uk, q, k, w, r, tau: float) -> dict:
    M = uq.shape[0]
    idx = torch.arange(M, device=uq.device)
    lse, pos, ps = _row_stats(uq, uk, tau, idx, exclude_self=False)
    diag = (idx[None, :] == r[:, None]).to(torch.float64)
    p_rows = torch.exp(uq[r] @ uk.T / tau - lse[r, None])  # P_rj
    p_cols = torch.exp(uk[r] @ uq.T / tau - lse[None, :])  # P_ir, as rows over i
    return {"loss": lse - pos,
            "dq[sampled rows]": _project(w[r, None] * ((p_rows - diag) @ uk) / tau, uq[r], q[r]),
            "dk[sampled rows]": _project(((w[None, :] * (p_cols - diag)) @ uq) / tau, uk[r], k[r]),
            "dtemperature": (w * (pos - ps)).sum() / tau}
