"""Shared suite of the self-similarity family (NT-Xent, multi-view, SupCon) over every backend.

Each fused backend is compared with the float64 reference on fresh random inputs: loss, ∂z and
∂τ (temperature as a tensor that requires grad), for every reduction, with an upstream gradient
that is not 1.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastntxent as fx
from helpers import (BACKEND_CASES, assert_rel_close, check_against_reference, loss_and_grads,
                     self_family_inputs)

# (M rows, D, τ): odd sizes, one block exactly, sizes across block edges, low and high τ.
CPU_SHAPES = [(1, 3, 0.5), (2, 1, 0.1), (7, 5, 0.01), (64, 64, 0.07), (65, 33, 0.2),
              (130, 129, 1.0), (257, 200, 10.0), (300, 17, 0.01)]
INTERPRET_SHAPES = [(1, 3, 0.5), (2, 1, 0.1), (7, 5, 0.01), (37, 33, 0.2), (96, 130, 0.07)]
CUDA_SHAPES = CPU_SHAPES + [(1000, 128, 0.1), (4099, 77, 0.01)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shapes_for(backend, device):
    if device == "cuda":
        return CUDA_SHAPES
    return INTERPRET_SHAPES if backend == "triton" else CPU_SHAPES


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("mode", ["nt_xent", "multiview", "supcon"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(backend, device, mode, dtype, reduction):
    for M, D, tau in shapes_for(backend, device):
        z, call = self_family_inputs(mode, M, D, device)
        check_against_reference(call, z, tau, dtype, device, reduction, backend, what=f"M={M} D={D} tau={tau}")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_float64_tight(backend, device):
    if backend == "triton":
        pytest.skip("triton computes in fp32 (fp64 goes to the cpu/reference backends)")
    for M, D, tau in shapes_for(backend, device):
        z, call = self_family_inputs("supcon", M, D, device)
        up = torch.rand(z.shape[0], dtype=torch.float64)
        ref = loss_and_grads(call, z, tau, torch.float64, device, "reference", "none", up)
        got = loss_and_grads(call, z, tau, torch.float64, device, backend, "none", up)
        for name, g, r in zip(("loss", "dz", "dtau"), got, ref):
            assert_rel_close(g, r, 1e-10, f"{name} M={M} D={D}")


def test_gradcheck_cpu_kernel():
    if not fx._extension.has_cpu_kernels():
        pytest.skip("fastntxent._C not built")
    z = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 5, 5, 5])
    for reduction in ("mean", "none"):
        f = lambda zz, tt: fx.supcon(zz, labels, tt, backend="cpu", reduction=reduction)
        assert torch.autograd.gradcheck(f, (z, t))
        g = lambda zz, tt: fx.multiview_nt_xent(zz[:9].view(3, 3, 6), tt, backend="cpu", normalize=False)
        assert torch.autograd.gradcheck(g, (z, t))


def test_reference_equals_simclr_cross_entropy_form():
    """The oracle itself against the way SimCLR code writes NT-Xent (cat, normalise, mask, CE)."""
    N, D, tau = 9, 13, 0.3
    z1, z2 = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(N)])
    expected = F.cross_entropy(logits, target)
    assert_rel_close(fx.nt_xent(z1, z2, tau, backend="reference"), expected, 1e-12, "reference")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_positive_sets_with_zero_one_and_many(backend, device):
    # Labels: a singleton (no positive), a pair (one), a big class (many).
    labels = torch.tensor([7, 1, 1, 2, 2, 2, 2, 2, 2, 2, 9], device=device)
    z = torch.randn(11, 16, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        up = torch.rand(11, dtype=torch.float64)
        call = lambda zz, t, **kw: fx.supcon(zz, labels, t, **kw)
        ref = loss_and_grads(call, z, 0.1, torch.float64, device, "reference", reduction, up)
        got = loss_and_grads(call, z, 0.1, torch.float32, device, backend, reduction, up)
        for name, g, r in zip(("loss", "dz", "dtau"), got, ref):
            assert_rel_close(g, r, 1e-5, name)
    none = fx.supcon(z.float().to(device), labels, 0.1, backend=backend, reduction="none")
    assert none[0] == 0 and none[-1] == 0 and (none[1:10] > 0).all()


@pytest.mark.parametrize("backend,device", BACKEND_CASES + [pytest.param("reference", "cpu", id="reference")])
def test_no_positive_gives_zero_loss_and_zero_grad(backend, device):
    for z, call in [
        (torch.randn(1, 4), lambda zz: fx.supcon(zz, torch.zeros(1, dtype=torch.long, device=device), 0.5,
                                                  backend=backend)),
        (torch.randn(5, 4), lambda zz: fx.supcon(zz, torch.arange(5, device=device), 0.5, backend=backend)),
        (torch.randn(1, 3, 4), lambda zz: fx.multiview_nt_xent(zz, 0.5, backend=backend)),
    ]:
        zz = z.to(device).requires_grad_(True)
        loss = call(zz)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(zz.grad, torch.zeros_like(zz))


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(40, 2, 24, dtype=torch.float64)
    z1, z2 = base[:20, 0, ::2], base[20:, 1, 1::2]  # strided views
    assert not z1.is_contiguous()
    expected = fx.nt_xent(z1, z2, 0.2, backend="reference")
    got = fx.nt_xent(z1.float().to(device), z2.float().to(device), 0.2, backend=backend)
    assert_rel_close(got, expected, 1e-5, "loss")
    # A transposed (column-major) input.
    zt = torch.randn(24, 30, dtype=torch.float64).T
    labels = torch.randint(0, 5, (30,))
    expected = fx.supcon(zt, labels, 0.2, backend="reference")
    got = fx.supcon(zt.float().to(device), labels.to(device), 0.2, backend=backend)
    assert_rel_close(got, expected, 1e-5, "loss")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_temperature_half_precision_is_finite(backend, device, dtype):
    # Near-duplicate rows at τ = 0.01: logits near 100, exp would overflow fp16 without max-subtraction.
    z = torch.randn(48, 32).repeat(2, 1) + 1e-3 * torch.randn(96, 32)
    zz = z.to(device=device, dtype=dtype).requires_grad_(True)
    loss = fx.nt_xent(zz[:48], zz[48:], 0.01, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zz.grad).all()
    ref = fx.nt_xent(z.double()[:48], z.double()[48:], 0.01, backend="reference")
    assert abs(loss.item() - ref.item()) <= 2e-2 * max(1.0, abs(ref.item())) + 0.05


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_statistics_match_reference(backend, device):
    z = torch.randn(60, 20, dtype=torch.float64)
    z[30:] = z[:30] + 0.8 * torch.randn(30, 20, dtype=torch.float64)  # positives are close
    _, ref = fx.nt_xent(z[:30], z[30:], 0.3, backend="reference", return_stats=True)
    _, got = fx.nt_xent(z[:30].float().to(device), z[30:].float().to(device), 0.3, backend=backend,
                        return_stats=True)
    assert 0.5 < ref["top1_accuracy"].item() <= 1.0
    for key in ("top1_accuracy", "positive_cosine", "negative_cosine"):
        assert abs(got[key].item() - ref[key].item()) < 1e-5, key
    # Top-1 from first principles.
    u = F.normalize(z, dim=1)
    s = (u @ u.T).fill_diagonal_(-2)
    target = torch.cat([torch.arange(30, 60), torch.arange(30)])
    assert abs(ref["top1_accuracy"].item() - (s.argmax(1) == target).double().mean().item()) < 1e-12


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_training_lowers_the_loss(backend, device):
    """Regression for the classic silent failure: a loss stuck at ln(2N−1) does not train."""
    torch.manual_seed(1)
    N, D_in = 32, 16
    x = torch.randn(N, D_in, device=device)
    head = torch.nn.Sequential(torch.nn.Linear(D_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(device)
    loss_fn = fx.NTXentLoss(temperature=0.5, backend=backend)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        v1 = x + 0.1 * torch.randn_like(x)
        v2 = x + 0.1 * torch.randn_like(x)
        loss = loss_fn(head(v1), head(v2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert abs(losses[-1] - math.log(2 * N - 1)) > 0.3


def test_learnable_temperature_module_trains_temperature():
    loss_fn = fx.SupConLoss(temperature=0.5, learnable_temperature=True)
    z = torch.randn(20, 8)
    labels = torch.randint(0, 3, (20,))
    loss = loss_fn(z, labels)
    loss.backward()
    g = loss_fn.log_temperature.grad
    # Compare with the reference's gradient w.r.t. log τ.
    log_t = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    fx.supcon(z.double(), labels, log_t.exp(), backend="reference").backward()
    assert_rel_close(g, log_t.grad, 1e-5, "d log tau")
    assert "learnable_temperature=True" in repr(loss_fn)


def test_modules_match_functional():
    z1, z2 = torch.randn(10, 7), torch.randn(10, 7)
    assert torch.equal(fx.NTXentLoss(0.3)(z1, z2), fx.nt_xent(z1, z2, 0.3))
    loss, stats = fx.NTXentLoss(0.3, reduction="sum")(z1, z2, return_stats=True)
    assert loss.shape == () and "top1_accuracy" in stats
    assert fx.NTXentLoss(0.3, reduction="none")(z1, z2).shape == (20,)
