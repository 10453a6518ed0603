"""Triton backend of the self-similarity family (fastntxent/_triton/self_similarity.py).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py) at
small sizes, where tl.dot is exact fp32; the CUDA cases (larger M, tf32 / bf16 / fp16 tensor
cores) skip cleanly without a GPU. Everything is compared with the float64 reference: loss, ∂z
and ∂τ, with an upstream gradient that is not 1.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import fastntxent as fx
from fastntxent import reference
from fastntxent.backends import _triton_import_error, resolve
import helpers
from helpers import assert_rel_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_OK = _triton_import_error() is None
CUDA_OK = torch.cuda.is_available() and TRITON_OK

needs_interpreter = pytest.mark.skipif(not (INTERPRET and TRITON_OK),
                                       reason="needs TRITON_INTERPRET=1 and triton")
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and triton")

if TRITON_OK:
    from fastntxent._triton import self_similarity as ts
else:  # pragma: no cover
    ts = None


make_call = helpers.self_family_inputs
loss_and_grads = helpers.loss_and_grads
check_against_reference = functools.partial(helpers.check_against_reference, backend="triton")


@needs_interpreter
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("mode", ["nt_xent", "supcon"])
def test_column_splits_merge(monkeypatch, splits, mode):
    """The occupancy path (several column splits, lse merge, fp32 partial gradients)."""
    monkeypatch.setattr(ts, "SPLITS", splits)
    for M, D, tau in [(2, 5, 0.5), (37, 130, 0.01), (96, 20, 0.5)]:
        z, call = make_call(mode, M, D, "cpu")
        check_against_reference(call, z, tau, torch.float32, "cpu", "none", what=f"splits={splits} M={M}")


def _rows_vs_reference(u, tau, labels, period):
    M = u.shape[0]
    t = torch.tensor(tau)
    got = ts.self_forward(u, t, labels, period)
    lab = labels if labels is not None else reference.implicit_labels(M, period)
    ref = reference.self_similarity_rows(u.double(), t.double(), lab)
    return got, ref


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 3])
def test_row_statistics_and_top1_ties(monkeypatch, splits):
    """The op's five row outputs; duplicated rows make exact ties: the first index wins."""
    monkeypatch.setattr(ts, "SPLITS", splits)
    M, D = 70, 12
    u = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    # Row 5 has exact copies at 40 (positive) and 65 (negative) -> argmax is 40 for row 5,
    # rows 40 and 65 see row 5 first. Row 10's copies: 12 (negative) before 50 (positive).
    u[40] = u[5]
    u[65] = u[5]
    u[12] = u[10]
    u[50] = u[10]
    labels = torch.randint(0, 6, (M,))
    labels[40] = labels[5]
    labels[65] = labels[5] + 100
    labels[12] = labels[10] + 100
    labels[50] = labels[10]
    for lab, period in [(labels, 1), (None, 35), (None, 1)]:
        got, ref = _rows_vs_reference(u, 0.1, lab, period)
        for name, g, r in zip(("lse", "pos_sum", "pos_count", "ps_sum"), got[:4], ref[:4]):
            assert g.dtype == torch.float32 and g.shape == (M,)
            assert_rel_close(g, r, 1e-5, name)
        assert torch.equal(got[4], ref[4].float()), "top1"
        if lab is not None:
            assert got[4][5] == 1 and got[4][10] == 0


@needs_interpreter
def test_single_row_and_no_positive():
    t = torch.tensor(0.5)
    lse, pos_sum, cnt, ps, top1 = ts.self_forward(torch.randn(1, 4), t, None, 1)
    assert lse.item() == float("-inf") and ps.item() == 0 and cnt.item() == 0 and top1.item() == 0
    grad = ts.self_backward(torch.randn(1, 4), t, None, 1, lse, torch.zeros(1), torch.zeros(1))
    assert torch.equal(grad, torch.zeros(1, 4))
    for z, call in [
        (torch.randn(1, 4), lambda zz: fx.supcon(zz, torch.zeros(1, dtype=torch.long), 0.5, backend="triton")),
        (torch.randn(5, 4), lambda zz: fx.supcon(zz, torch.arange(5), 0.5, backend="triton")),
        (torch.randn(1, 3, 4), lambda zz: fx.multiview_nt_xent(zz, 0.5, backend="triton")),
    ]:
        zz = z.requires_grad_(True)
        loss = call(zz)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(zz.grad, torch.zeros_like(zz))


@needs_interpreter
def test_zero_one_and_many_positives():
    labels = torch.tensor([7, 1, 1, 2, 2, 2, 2, 2, 2, 2, 9])
    z = torch.randn(11, 16, dtype=torch.float64)
    call = lambda zz, t, **kw: fx.supcon(zz, labels, t, **kw)  # noqa: E731
    for reduction in ("mean", "sum", "none"):
        check_against_reference(call, z, 0.1, torch.float32, "cpu", reduction, tol=1e-5, what=reduction)


@needs_interpreter
def test_non_contiguous_input():
    base = torch.randn(40, 2 * 33)
    labels = torch.randint(0, 5, (40,))
    views = {
        "strided columns": base[:, ::2],
        "transposed": base[:, :33].t().contiguous().t(),
        "strided rows": torch.randn(80, 33)[::2],
    }
    t = torch.tensor(0.2)
    for name, u in views.items():
        u64 = u.double()
        assert not u.is_contiguous(), name
        got = ts.self_forward(u, t, labels, 1)
        exp = ts.self_forward(u.contiguous(), t, labels, 1)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
        a, b = torch.rand(40), -torch.rand(40)
        g = ts.self_backward(u, t, labels, 1, got[0], a, b)
        e = ts.self_backward(u.contiguous(), t, labels, 1, exp[0], a, b)
        assert g.is_contiguous()
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
        # through the API without normalisation, the strided rows reach the kernel as they are
        zz = u.detach().requires_grad_(True)
        loss = fx.supcon(zz, labels, 0.2, normalize=False, backend="triton")
        loss.backward()
        uu = u64.clone().requires_grad_(True)
        ref = fx.supcon(uu, labels, 0.2, normalize=False, backend="reference")
        ref.backward()
        assert_rel_close(loss, ref, 1e-5, name)
        assert_rel_close(zz.grad, uu.grad, 1e-5, name)


@needs_interpreter
def test_float64_refused_with_clear_error():
    u = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cpu.*reference|reference.*cpu"):
        ts.self_forward(u, torch.tensor(0.5, dtype=torch.float64), None, 2)
    with pytest.raises(ValueError, match="float64"):
        fx.nt_xent(u[:2], u[2:], 0.5, backend="triton")


@needs_interpreter
def test_fp32_precision_switch():
    assert ts.get_fp32_precision() in ("tf32", "tf32x3", "ieee")
    try:
        ts.set_fp32_precision("ieee")
        assert ts.get_fp32_precision() == "ieee"
        z = torch.randn(20, 9)
        loss_ieee = fx.supcon(z, torch.arange(20) % 4, 0.3, backend="triton")
        ts.set_fp32_precision("tf32")
        loss_tf32 = fx.supcon(z, torch.arange(20) % 4, 0.3, backend="triton")
        # The interpreter does not emulate tf32: both are exact fp32 here.
        torch.testing.assert_close(loss_ieee, loss_tf32)
        with pytest.raises(ValueError, match="precision"):
            ts.set_fp32_precision("fp16")
    finally:
        ts.set_fp32_precision(None)


def test_fp32_precision_follows_torch_by_default():
    ts.set_fp32_precision(None)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert ts.get_fp32_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert ts.get_fp32_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


@needs_interpreter
def test_opcheck():
    M, D = 13, 7
    u = torch.nn.functional.normalize(torch.randn(M, D), dim=1).requires_grad_(True)
    t = torch.tensor(0.3)
    labels = torch.randint(0, 3, (M,))
    for lab, period in [(labels, 1), (None, 6)]:
        torch.library.opcheck(ts.self_forward, (u, t, lab, period))
        lse = ts.self_forward(u.detach(), t, lab, period)[0]
        args = (u.detach(), t, lab, period, lse, torch.rand(M), -torch.rand(M))
        torch.library.opcheck(ts.self_backward, args)


@needs_interpreter
def test_backend_resolution_picks_triton():
    chosen = resolve("self", "triton", torch.device("cpu"), torch.float32)
    assert chosen.name == "triton"
    ops = chosen.operators("self")
    assert ops.forward is ts.self_forward and ops.backward is ts.self_backward
    assert ops.forward is torch.ops.fastntxent.self_forward_triton
    # backend="triton" runs these operators (the autograd graph records them).
    z = torch.randn(8, 5, requires_grad=True)
    seen = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        fx.nt_xent(z[:4], z[4:], 0.5, backend="triton").backward()
    assert any("self_forward_triton" in s for s in seen), seen
    assert any("self_backward_triton" in s for s in seen), seen


# ----------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------
CUDA_SHAPES = [(1000, 128, 0.01), (4099, 77, 0.01), (513, 300, 0.1), (4099, 256, 0.5)]


@needs_cuda
def test_cuda_fp32_ieee_is_tight():
    try:
        ts.set_fp32_precision("ieee")
        for M, D, tau in CUDA_SHAPES[:2]:
            z, call = make_call("supcon", M, D, "cuda")
            check_against_reference(call, z, tau, torch.float32, "cuda", "none", tol=1e-4, what=f"M={M}")
    finally:
        ts.set_fp32_precision(None)


@needs_cuda
def test_cuda_splits_and_auto_backend(monkeypatch):
    assert resolve("self", "auto", torch.device("cuda"), torch.bfloat16).name == "triton"
    for splits in (1, 5):
        monkeypatch.setattr(ts, "SPLITS", splits)
        z, call = make_call("multiview", 3000, 128, "cuda")
        check_against_reference(call, z, 0.05, torch.bfloat16, "cuda", "sum", what=f"splits={splits}")


@needs_cuda
def test_cuda_deterministic():
    z = torch.randn(2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        z.grad = None
        fx.nt_xent(z[:1024], z[1024:], 0.1, backend="triton").backward()
        grads.append(z.grad.clone())
    assert torch.equal(grads[0], grads[1])


@needs_interpreter
def test_torch_compile_fullgraph():
    """The triton operators are opaque custom ops with fake kernels: torch.compile traces them."""
    head = torch.nn.Linear(6, 5)
    t = torch.tensor(0.3, requires_grad=True)

    def f(a, b, temp):
        return fx.nt_xent(head(a), head(b), temp, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    a, b = torch.randn(9, 6), torch.randn(9, 6)
    loss = compiled(a, b, t)
    loss.backward()
    grads = [p.grad.clone() for p in (*head.parameters(), t)]
    for p in (*head.parameters(), t):
        p.grad = None
    eager = f(a, b, t)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, (*head.parameters(), t)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 3])
def test_interior_tiles_selective_outputs_and_negative_temperature(monkeypatch, splits):
    """Sizes with mask-free interior column tiles (no diagonal, no positive, not the last tile:
    the interpreter's 32×32 tiles at M = 160 / 210 / 200 with several views) next to the masked
    ones; each `outputs` mask computes what it asks for and leaves the rest NaN; a negative
    temperature (the operator's sign fold) still matches the reference."""
    monkeypatch.setattr(ts, "SPLITS", splits)
    names = ("lse", "pos_sum", "pos_count", "ps_sum")
    cases = [(160, 80, None, 0.1, (0, 1, 2, 3)), (210, 70, None, 0.5, (3,)),
             (200, 1, torch.randint(0, 7, (200,)), 0.2, (0, 3)), (160, 80, None, -0.3, (3,))]
    for M, period, lab, tau, masks in cases:
        u = torch.nn.functional.normalize(torch.randn(M, 24), dim=1)
        ref_lab = lab if lab is not None else reference.implicit_labels(M, period)
        ref = reference.self_similarity_rows(u.double(), torch.tensor(tau).double(), ref_lab)
        for outputs in masks:
            got = ts.self_forward(u, torch.tensor(tau), lab, period, False, outputs)
            for name, g, r in zip(names[:3], got[:3], ref[:3]):
                assert_rel_close(g, r, 1e-5, f"{name} M={M} outputs={outputs}")
            if outputs & 2:
                assert_rel_close(got[3], ref[3], 1e-5, f"ps_sum M={M}")
            else:
                assert torch.isnan(got[3]).all()
            if outputs & 1:
                assert torch.equal(got[4], ref[4].float()), f"top1 M={M}"
            else:
                assert torch.isnan(got[4]).all()


@needs_interpreter
def test_loss_asks_only_for_what_it_needs(monkeypatch):
    """nt_xent passes the outputs mask: no statistics and a fixed τ → 0; return_stats → top1;
    a τ that requires grad → expected_logit (and its gradient matches the reference)."""
    seen = []
    real = ts.self_forward

    def spy(*args):
        seen.append(args[5] if len(args) > 5 else None)  # (u, τ, labels, rows_per_view, decoupled, outputs)
        return real(*args)

    import dataclasses

    import fastntxent.backends as backends

    ops = backends.BACKENDS["triton"].operators("self")
    monkeypatch.setitem(backends.BACKENDS, "triton", dataclasses.replace(
        backends.BACKENDS["triton"], operators=lambda family: ops._replace(forward=spy)))
    z1, z2 = torch.randn(40, 8), torch.randn(40, 8)
    fx.nt_xent(z1, z2, 0.5, backend="triton")
    fx.nt_xent(z1, z2, 0.5, backend="triton", return_stats=True)
    tau = torch.tensor(0.5, requires_grad=True)
    loss = fx.nt_xent(z1, z2, tau, backend="triton")
    loss.backward()
    assert seen == [0, 1, 2]
    tau64 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fx.nt_xent(z1.double(), z2.double(), tau64, backend="reference").backward()
    assert_rel_close(tau.grad, tau64.grad, 1e-5, "dL/dtau")
