"""Triton backend of the cross-similarity family (fastntxent/_triton/cross_similarity.py).

What is specific to this backend: the operator with offsets and column splits, top-1 ties
across splits, strides, opcheck, resolution, torch.compile, determinism. The losses against
the float64 reference over shapes, dtypes and reductions are the shared suite
(tests/test_cross_suite.py). Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (set by conftest.py); the CUDA cases skip cleanly.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastntxent as fx
from fastntxent import reference
from fastntxent.backends import _triton_import_error, resolve
from helpers import assert_rel_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_OK = _triton_import_error() is None
CUDA_OK = torch.cuda.is_available() and TRITON_OK

needs_interpreter = pytest.mark.skipif(not (INTERPRET and TRITON_OK), reason="needs TRITON_INTERPRET=1 and triton")
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and triton")

if TRITON_OK:
    from fastntxent._triton import cross_similarity as tc
else:  # pragma: no cover
    tc = None

def _op_rows_vs_reference(q, k, queue, s, off, in_batch):
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    ss = s.clone().requires_grad_()
    got = tc.cross_forward(qq, kk, queue, ss, off, in_batch)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    s64 = s.double().requires_grad_()
    ref = reference.cross_similarity_rows(q64, k64, None if queue is None else queue.double(), s64, off, in_batch)
    for name, x, y in zip(("lse", "pos", "ps_sum"), got[:3], ref[:3]):
        assert x.dtype == torch.float32 and x.shape == (q.shape[0],)
        assert_rel_close(x, y, 1e-5, name)
    M = q.shape[0]
    wa, wb = torch.rand(M, device=q.device), torch.randn(M, device=q.device)
    g = torch.autograd.grad((got[0] * wa + got[1] * wb).sum(), [qq, kk, ss])
    r = torch.autograd.grad((ref[0] * wa.double() + ref[1] * wb.double()).sum(), [q64, k64, s64])
    for name, x, y in zip(("grad q", "grad k", "grad scale"), g, r):
        assert_rel_close(x, y, 1e-5, name)
    return got, ref


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("in_batch,K", [(True, 0), (True, 70), (False, 70), (False, 0)])
def test_operator_with_offset_and_splits(monkeypatch, splits, in_batch, K):
    """Local rows against more keys (the distributed path): positive of row i = key i + off;
    several column splits (flash-decoding merge) cross the key/queue boundary."""
    monkeypatch.setattr(tc, "SPLITS", splits)
    M, N, D, off = 37, 100, 70, 40
    q = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
    queue = torch.randn(K, D) if K else None
    got, ref = _op_rows_vs_reference(q, k, queue, torch.tensor(4.0), off, in_batch)
    assert torch.equal(got[3], ref[3].float()), "top1"


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 2, 5])
@pytest.mark.parametrize("in_batch", [True, False])
def test_top1_ties_first_column_wins(monkeypatch, splits, in_batch):
    """Small-integer rows make exact ties in any summation order: the first column reaching
    the maximum counts, across tiles, splits and the key/queue boundary."""
    monkeypatch.setattr(tc, "SPLITS", splits)
    M, N, D, off = 6, 70, 8, 40
    gen = torch.Generator().manual_seed(3)
    q = torch.zeros(M, D)
    k = torch.zeros(N, D)
    queue = torch.zeros(40, D)
    for x in (q, k, queue):  # small-integer noise in the last two dimensions
        x[:, 6:] = torch.randint(-2, 3, (x.shape[0], 2), generator=gen).float()
    for i in range(M):
        q[i, i] = 8.0
        k[i + off] = 0.0
        k[i + off, i] = 9.0  # the positive of row i: logit 72·scale, the others are small
    k[5] = k[0 + off]       # row 0: tied by a key in an earlier tile       (in-batch top1 0)
    k[65] = k[1 + off]      # row 1: tied by a key in a later tile          (1)
    queue[33] = k[2 + off]  # row 2: tied by a queue entry, after every key  (1)
    queue[10, 3] = 10.0     # row 3: beaten by a queue entry                 (0)
    k[35] = k[4 + off]      # row 4: tied earlier in the same tile           (in-batch top1 0)
    s = torch.tensor(0.5)
    got = tc.cross_forward(q, k, queue, s, off, in_batch)
    ref = reference.cross_similarity_rows(q.double(), k.double(), queue.double(), s.double(), off, in_batch)
    assert torch.equal(got[3], ref[3].float())
    expected = [0.0, 1.0, 1.0, 0.0, 0.0, 1.0] if in_batch else [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert got[3].tolist() == expected


@needs_interpreter
def test_one_dimensional_embeddings():
    """D = 1: normalised rows are ±1, the gradients through the normalisation vanish."""
    q, k = torch.randn(6, 1, requires_grad=True), torch.randn(6, 1, requires_grad=True)
    queue = torch.randn(4, 1)
    for loss, ref in ((fx.info_nce(q, k, queue, 0.5, backend="triton"),
                       reference.info_nce_loss(q.double(), k.double(), queue.double(), 0.5)),
                      (fx.clip_loss(q, k, 3.0, backend="triton"), reference.clip_loss(q.double(), k.double(), 3.0))):
        assert_rel_close(loss, ref, 1e-5, "loss")
        gq, gk = torch.autograd.grad(loss, [q, k])
        assert gq.abs().max() < 1e-5 and gk.abs().max() < 1e-5


@needs_interpreter
def test_non_contiguous_inputs_and_queue_dtype():
    base = torch.randn(30, 2 * 33)
    q = base[:, ::2]
    k = torch.randn(33, 30).t()
    queue = torch.randn(33, 20, dtype=torch.float64).t()
    assert not (q.is_contiguous() or k.is_contiguous() or queue.is_contiguous())
    s = torch.tensor(3.0)
    for in_batch in (True, False):
        got = tc.cross_forward(q, k, queue, s, 0, in_batch)
        exp = tc.cross_forward(q.contiguous(), k.contiguous(), queue.float().contiguous(), s, 0, in_batch)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
        a, b = torch.rand(30), -torch.rand(30)
        g = tc.cross_backward(q, k, queue, s, 0, in_batch, got[0], a, b, True)
        e = tc.cross_backward(q.contiguous(), k.contiguous(), queue.float().contiguous(), s, 0, in_batch,
                              exp[0], a, b, True)
        for x, y in zip(g, e):
            assert x.is_contiguous()
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_need_grad_k_false_and_queue_gets_no_gradient():
    q = torch.randn(9, 5, requires_grad=True)
    k = torch.randn(9, 5)
    queue = torch.randn(13, 5, requires_grad=True)
    s = torch.tensor(5.0)
    lse = tc.cross_forward(q.detach(), k, queue, s, 0, True)[0]
    gq, gk = tc.cross_backward(q.detach(), k, queue, s, 0, True, lse, torch.rand(9), torch.rand(9), False)
    assert torch.equal(gk, torch.zeros_like(k)) and gq.abs().sum() > 0
    loss = fx.info_nce(q, k, queue, 0.2, backend="triton")
    loss.backward()
    assert queue.grad is None and k.grad is None
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cross_ops(dtype):
    q = torch.nn.functional.normalize(torch.randn(13, 5), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(20, 5), dim=1).to(dtype)
    queue = torch.randn(9, 5).to(dtype)
    s = torch.tensor(3.0)
    grad = dtype != torch.bfloat16
    for qu, off, in_batch in ((None, 0, True), (queue, 7, True), (queue, 2, False)):
        args = (q.clone().requires_grad_(grad), k.clone().requires_grad_(grad), qu, s.clone().requires_grad_(True),
                off, in_batch)
        torch.library.opcheck(tc.cross_forward, args)
        lse = tc.cross_forward(q, k, qu, s, off, in_batch)[0]
        for need_k in (True, False):
            torch.library.opcheck(tc.cross_backward, (q, k, qu, s, off, in_batch, lse, torch.rand(13),
                                                      -torch.rand(13), need_k))


@needs_interpreter
def test_backend_resolution_and_errors():
    assert resolve("cross", "triton", torch.device("cpu"), torch.float32).name == "triton"
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    with Spy():
        fx.clip_loss(a, b, 10.0, backend="triton").backward()
    assert any("cross_forward_triton" in s for s in seen), seen
    assert any("cross_backward_triton" in s for s in seen), seen
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        fx.info_nce(x, x, backend="triton")
    with pytest.raises(ValueError, match="cpu.*reference|reference.*cpu"):
        tc.cross_forward(x, x, None, torch.tensor(2.0), 0, True)
    with pytest.raises(ValueError, match="pos_offset"):
        tc.cross_forward(x.float(), x.float(), None, torch.tensor(2.0), 1, True)


@pytest.mark.skipif(not TRITON_OK, reason="needs triton")
def test_cpu_tensors_without_interpreter_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, backend="triton")


@needs_interpreter
def test_torch_compile_fullgraph():
    """The triton operators are opaque custom ops with fake kernels: torch.compile traces them."""
    head = torch.nn.Linear(6, 5)
    log_s = torch.tensor(2.0, requires_grad=True)
    params = (*head.parameters(), log_s)

    def f(x, y, queue):
        a, b = head(x), head(y)
        return (fx.clip_loss(a, b, log_s.exp(), backend="triton")
                + fx.info_nce(a, b, queue, 0.2, backend="triton"))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x, y, queue = torch.randn(9, 6), torch.randn(9, 6), torch.randn(12, 5)
    loss = compiled(x, y, queue)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    eager = f(x, y, queue)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("splits", [1, 7])
def test_cuda_splits_auto_backend_and_offset(monkeypatch, splits):
    assert resolve("cross", "auto", torch.device("cuda"), torch.bfloat16).name == "triton"
    monkeypatch.setattr(tc, "SPLITS", splits)
    M, N, D, off = 300, 1200, 96, 600
    q = torch.nn.functional.normalize(torch.randn(M, D, device="cuda"), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D, device="cuda"), dim=1)
    queue = torch.randn(3000, D, device="cuda")
    try:
        tc.set_fp32_precision("ieee")
        for in_batch in (True, False):
            _op_rows_vs_reference(q, k, queue, torch.tensor(4.0, device="cuda"), off, in_batch)
    finally:
        tc.set_fp32_precision(None)


@needs_cuda
def test_cuda_deterministic():
    q = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    queue = torch.randn(8192, 128, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        q.grad = k.grad = None
        (fx.info_nce(q, k, queue, 0.1, backend="triton") + fx.clip_loss(q, k, 20.0, backend="triton")).backward()
        grads.append((q.grad.clone(), k.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@needs_interpreter
@pytest.mark.parametrize("in_batch,K", [(True, 0), (False, 70), (True, 40)])
def test_interior_tiles_selective_outputs_and_negative_scale(in_batch, K):
    """Key tiles without the positive (the interpreter's 32-wide tiles, N = 160, offset 40) take
    the mask-free branch; each `outputs` mask computes what it asks for, the rest stays NaN;
    a negative scale (the sign fold) matches the reference too."""
    M, N, D, off = 64, 160, 20, 40
    q = torch.nn.functional.normalize(torch.randn(M, D), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
    queue = torch.randn(K, D) if K else None
    for scale, masks in ((5.0, (0, 1, 2, 3)), (-3.0, (3,))):
        ref = reference.cross_similarity_rows(q.double(), k.double(), None if queue is None else queue.double(),
                                              torch.tensor(scale).double(), off, in_batch)
        for outputs in masks:
            got = tc.cross_forward(q, k, queue, torch.tensor(scale), off, in_batch, False, outputs)
            assert_rel_close(got[0], ref[0], 1e-5, f"lse outputs={outputs}")
            assert_rel_close(got[1], ref[1], 1e-5, f"pos outputs={outputs}")
            if outputs & 2:
                assert_rel_close(got[2], ref[2], 1e-5, "expected_logit")
            else:
                assert torch.isnan(got[2]).all()
            if outputs & 1:
                assert torch.equal(got[3], ref[3].float()), "top1"
            else:
                assert torch.isnan(got[3]).all()
