"""Decoupled contrastive loss (DCL, Yeh et al. 2022): `decoupled=True` of the self family.

The reference against a literal formula written from the paper; every backend (CPU C++,
Triton under TRITON_INTERPRET=1, CUDA C++ / Triton on a GPU) against the float64 reference:
loss, ∂z and ∂τ, odd sizes across tile blocks, labels and implicit views, a positive that
dominates its row at τ = 0.01 (the negatives' exps shifted by their own max, else they
underflow), rows without a negative (−inf), the module option and keyword-only use.
lightly's DCLLoss / DCLWLoss parity is in test_compat.py; the CUDA C++ kernels under host
emulation in test_cuda_emulation.py; the local-rows form in test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch

import fastntxent as fx
from helpers import BACKEND_CASES, TOLERANCE, assert_rel_close


def literal_dcl(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors with a positive of −mean_{p∈P(i)} s_ip/τ + log Σ_{j∉P(i)∪{i}} e^{s_ij/τ}."""
    u = z / z.norm(dim=1, keepdim=True)
    s = u @ u.T / tau
    M = z.shape[0]
    losses = []
    for i in range(M):
        pos = [j for j in range(M) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(M) if j != i and labels[j] != labels[i]]
        if pos:
            losses.append(torch.logsumexp(s[i, neg], 0) - s[i, pos].mean())
    return torch.stack(losses).mean()


def _call(mode, z, labels, t, **kw):
    if mode == "nt_xent":
        n = z.shape[0] // 2
        return fx.nt_xent(z[:n], z[n:], t, **kw)
    if mode == "multiview":
        return fx.multiview_nt_xent(z.view(3, -1, z.shape[1]), t, **kw)
    return fx.supcon(z, labels, t, **kw)


def _labels(mode, M, seed=0):
    if mode == "nt_xent":
        return torch.arange(M) % (M // 2)
    if mode == "multiview":
        return torch.arange(M) % (M // 3)
    return torch.randint(0, max(2, M // 5), (M,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["nt_xent", "multiview", "supcon"])
def test_reference_is_the_papers_formula(mode):
    M, D = 12, 5
    z = torch.randn(M, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = _labels(mode, M, seed=2)
    got = _call(mode, z, labels, 0.3, backend="reference", decoupled=True)
    assert_rel_close(got, literal_dcl(z, labels, 0.3), 1e-12, mode)
    coupled = _call(mode, z, labels, 0.3, backend="reference")
    assert got < coupled  # the positive left the denominator: every row's loss falls


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,M,D", [("nt_xent", 6, 5), ("nt_xent", 140, 33), ("multiview", 99, 17),
                                      ("supcon", 70, 9), ("supcon", 300, 8)])
def test_backends_match_the_reference(backend, device, dtype, mode, M, D):
    if backend == "triton" and device == "cpu" and M > 140:
        pytest.skip("interpreter: small cases only (slow)")
    if backend == "cpu" and dtype == torch.bfloat16 and M > 140:
        pytest.skip("one bf16 size")
    g = torch.Generator().manual_seed(M + D)
    z64 = torch.randn(M, D, dtype=torch.float64, generator=g)
    labels = _labels(mode, M, seed=M)
    z = z64.to(dtype)
    tol = TOLERANCE[dtype]

    def run(x, t, b, dev):
        x = x.to(dev).requires_grad_(True)
        t = t.to(dev).requires_grad_(True)
        loss = _call(mode, x, labels.to(dev), t, backend=b, decoupled=True, reduction="none")
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=dev)
        gz, gt = torch.autograd.grad((loss * w).sum(), (x, t))
        return loss, gz, gt

    tau = torch.tensor(0.2)
    got = run(z, tau, backend, device)
    want = run(z.double(), tau.double(), "reference", "cpu")
    for a, b, name in zip(got, want, ("loss", "grad z", "grad tau")):
        assert_rel_close(a.cpu(), b, tol, f"{backend} {mode} {dtype} {name}")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_dominant_positive_at_low_temperature(backend, device):
    """Views 0.01 apart at τ = 0.01: each positive's logit is ~100 above its negatives. A shift by
    the row max including the positive would put the negatives' exps at e^-100 (0 in fp32)."""
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(40, 16, generator=g, dtype=torch.float64)
    z2 = z1 + 0.01 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    want = fx.nt_xent(z1, z2, 0.01, backend="reference", decoupled=True)
    a, b = z1.float().to(device).requires_grad_(True), z2.float().to(device).requires_grad_(True)
    got = fx.nt_xent(a, b, 0.01, backend=backend, decoupled=True)
    assert torch.isfinite(got)
    assert_rel_close(got.cpu(), want, 1e-5, f"{backend} loss")
    r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    fx.nt_xent(r1, r2, 0.01, backend="reference", decoupled=True).backward()
    got.backward()
    assert_rel_close(a.grad.cpu(), r1.grad, 1e-5, f"{backend} grad z1")
    assert_rel_close(b.grad.cpu(), r2.grad, 1e-5, f"{backend} grad z2")


@pytest.mark.parametrize("backend,device", BACKEND_CASES + [pytest.param("reference", "cpu", id="reference")])
def test_a_row_without_a_negative_has_loss_minus_infinity(backend, device):
    """Every other row a positive: the decoupled denominator is empty, log 0 = −inf (not a finite
    number); the other rows' losses and gradients stay finite."""
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)).to(device)
    per_row = fx.supcon(z, torch.zeros(7, dtype=torch.long, device=device), 0.5, backend=backend, decoupled=True,
                        reduction="none")
    assert torch.isneginf(per_row).all()
    mixed = torch.tensor([0, 0, 1, 1, 2, 2, 2]).to(device)
    x = z.clone().requires_grad_(True)
    loss = fx.supcon(x, mixed, 0.5, backend=backend, decoupled=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_module_option_and_keyword_only():
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    mod = fx.NTXentLoss(0.3, decoupled=True)
    assert "decoupled=True" in repr(mod)
    assert torch.equal(mod(z1, z2), fx.nt_xent(z1, z2, 0.3, decoupled=True))
    labels = torch.arange(16) % 5
    z = torch.cat([z1, z2])
    assert torch.equal(fx.SupConLoss(0.1, decoupled=True)(z, labels), fx.supcon(z, labels, 0.1, decoupled=True))
    with pytest.raises(TypeError):
        fx.nt_xent(z1, z2, 0.3, True)  # a positional flag never changes meaning
    with pytest.raises(TypeError, match="decoupled"):
        fx.nt_xent(z1, z2, 0.3, decoupled="yes")
    with pytest.raises(TypeError, match="decoupled"):
        fx.NTXentLoss(decoupled=1)


# ---------------------------------------------------------------------------------------
# The cross family: InfoNCE (in-batch, MoCo's queue) and CLIP
# ---------------------------------------------------------------------------------------
def literal_cross_dcl(q, k, queue, scale):
    """Mean over queries of −s_i,pos + log Σ_{negatives} e^{s}: in-batch, the other keys; with a
    queue, the queue only (the positive is the one key)."""
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    pos = (q * k).sum(1) * scale
    if queue is None:
        s = q @ k.T * scale
        neg = s.masked_fill(torch.eye(q.shape[0], dtype=torch.bool), float("-inf"))
    else:
        neg = q @ (queue / queue.norm(dim=1, keepdim=True)).T * scale
    return (torch.logsumexp(neg, 1) - pos).mean()


def _cross_call(kind, x, t, **kw):
    if kind == "clip":
        return fx.clip_loss(x[0], x[1], t, **kw)
    return fx.info_nce(x[0], x[1], x[2] if kind == "queue" else None, t, **kw)


def test_cross_reference_is_the_literal_formula():
    g = torch.Generator().manual_seed(3)
    q, k, queue = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (9, 9, 13))
    for kind, qu in (("inbatch", None), ("queue", queue)):
        got = _cross_call(kind, [q, k, qu], 0.2, backend="reference", decoupled=True)
        assert_rel_close(got, literal_cross_dcl(q, k, qu, 5.0), 1e-12, kind)
    got = fx.clip_loss(q, k, 5.0, backend="reference", decoupled=True)
    assert_rel_close(got, (literal_cross_dcl(q, k, None, 5.0) + literal_cross_dcl(k, q, None, 5.0)) / 2, 1e-12, "clip")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("kind,M,D", [("inbatch", 5, 7), ("inbatch", 140, 33), ("queue", 20, 9), ("clip", 70, 17),
                                      ("clip", 300, 8)])
def test_cross_backends_match_the_reference(backend, device, kind, M, D):
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels cover the self family only")
    if backend == "triton" and device == "cpu" and M > 140:
        pytest.skip("interpreter: small cases only (slow)")
    g = torch.Generator().manual_seed(M * 3 + D)
    xs64 = [torch.randn(M, D, generator=g, dtype=torch.float64) for _ in range(2)]
    xs64.append(torch.randn(37, D, generator=g, dtype=torch.float64))

    def run(xs, t, b, dev):
        xs = [x.to(dev).requires_grad_(i < 2) for i, x in enumerate(xs)]
        t = t.to(dev).requires_grad_(True)
        loss = _cross_call(kind, xs, t, backend=b, decoupled=True)
        return [loss] + list(torch.autograd.grad(loss, xs[:2] + [t]))

    t = torch.tensor(10.0 if kind == "clip" else 0.1)
    got = run([x.float() for x in xs64], t, backend, device)
    want = run(xs64, t.double(), "reference", "cpu")
    for a, b, name in zip(got, want, ("loss", "grad q", "grad k", "grad scale")):
        assert_rel_close(a.cpu(), b, 1e-5, f"{backend} {kind} {name}")


@pytest.mark.parametrize("backend,device", BACKEND_CASES + [pytest.param("reference", "cpu", id="reference")])
def test_cross_without_a_negative_is_minus_infinity(backend, device):
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernels cover the self family only")
    q, k = torch.randn(1, 4).to(device), torch.randn(1, 4).to(device)
    assert torch.isneginf(fx.info_nce(q, k, None, 0.5, backend=backend, decoupled=True))
    assert torch.isneginf(fx.clip_loss(q, k, 2.0, backend=backend, decoupled=True))
